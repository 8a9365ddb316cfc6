"""Flow-matching maths shared by training and sampling (FACTS.md: 'Flow matching and the schedule').

x_t = (1 - sigma) * x0 + sigma * noise; the model predicts the velocity noise - x0 from x_t and sigma.
"""

from __future__ import annotations

import math

import torch

from krea2_train import facts


def time_shift(mu: float, sigma):
    """sigma' = e^mu / (e^mu + (1/sigma - 1)): pushes sigmas towards noise as mu grows (floats or tensors)."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))


def raw_mu(image_seq_len: int) -> float:
    """Raw's resolution-aware shift: linear in image tokens, 0.5 at 256 tokens (256 px) to 1.15 at 6400 (1280 px)."""
    slope = (facts.MAX_SHIFT - facts.BASE_SHIFT) / (facts.MAX_SEQ_LEN - facts.BASE_SEQ_LEN)
    return facts.BASE_SHIFT + slope * (image_seq_len - facts.BASE_SEQ_LEN)


def image_seq_len(height: int, width: int) -> int:
    return (height // facts.PIXEL_MULTIPLE) * (width // facts.PIXEL_MULTIPLE)


def mu_for(variant: str, height: int, width: int) -> float:
    return facts.TURBO_MU if variant == "turbo" else raw_mu(image_seq_len(height, width))


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C*4), channel order (c, ph, pw)."""
    b, c, h, w = latents.shape
    p = facts.PATCH
    x = latents.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpack_latents(packed: torch.Tensor, latent_h: int, latent_w: int) -> torch.Tensor:
    b, _, d = packed.shape
    p = facts.PATCH
    c = d // (p * p)
    x = packed.view(b, latent_h // p, latent_w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, latent_h, latent_w)


def position_ids(text_len: int, grid_h: int, grid_w: int, device=None) -> torch.Tensor:
    """(text_len + grid_h*grid_w, 3) rotary coordinates: text at (0,0,0), image token (row, col) at (0, row, col)."""
    text = torch.zeros(text_len, 3, device=device)
    rows = torch.arange(grid_h, device=device).repeat_interleave(grid_w)
    cols = torch.arange(grid_w, device=device).repeat(grid_h)
    image = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).float()
    return torch.cat([text, image], dim=0)


def make_scheduler():
    """diffusers' Euler flow-matching scheduler configured with the Krea 2 shift (the pipeline's own settings)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, use_dynamic_shifting=True, base_shift=facts.BASE_SHIFT, max_shift=facts.MAX_SHIFT,
        base_image_seq_len=facts.BASE_SEQ_LEN, max_image_seq_len=facts.MAX_SEQ_LEN, time_shift_type="exponential",
    )


def sampling_sigmas(steps: int, mu: float) -> torch.Tensor:
    """The shifted sigma schedule for `steps` Euler steps (without the final 0)."""
    base = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    return time_shift(mu, base).float()
