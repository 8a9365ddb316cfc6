"""Qwen-Image VAE wrapper: images in [-1, 1] <-> normalised 16-channel latents (FACTS: z = (z - mean) / std)."""

from __future__ import annotations

import hashlib

import torch

from krea2_train.models.loading import load_vae
from krea2_train.models.text_encoder import files_fingerprint


class VAE:
    def __init__(self, vae, source: str = ""):
        self.vae = vae
        cfg = vae.config
        self.mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1)
        self.std = torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1)
        self.fingerprint = hashlib.sha256(f"{source}|{vae.dtype}|mode".encode()).hexdigest()[:16]

    @classmethod
    def from_path(cls, path, dtype="float32", device="cpu"):
        return cls(load_vae(path, dtype=dtype, device=device), source=files_fingerprint(path))

    @property
    def device(self):
        return next(self.vae.parameters()).device

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> normalised latents (B, 16, H/8, W/8), float32. Uses the posterior mode so the
        cache is deterministic."""
        x = pixels.to(self.device, self.vae.dtype).unsqueeze(2)  # the VAE is 5-D: (B, C, T=1, H, W)
        z = self.vae.encode(x).latent_dist.mode()[:, :, 0].float().cpu()
        return (z - self.mean) / self.std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, 16, h, w) -> pixels (B, 3, 8h, 8w) in [-1, 1], float32 on CPU."""
        from krea2_train.models.fast_vae import single_frame_convs

        z = latents.float().cpu() * self.std + self.mean
        with single_frame_convs():  # exact for one frame, ~3x faster on CPU (fast_vae.py)
            x = self.vae.decode(z.to(self.device, self.vae.dtype).unsqueeze(2)).sample[:, :, 0]
        return x.float().clamp(-1, 1).cpu()


def to_pil(pixels: torch.Tensor):
    """(B, 3, H, W) in [-1, 1] -> list of PIL images."""
    from PIL import Image

    arr = ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]
