"""The shared inference core: one sampler for `krea2-train sample`, training previews and export verification.

Matches diffusers' `Krea2Pipeline` (tests compare latents on the tiny models):
    * Euler flow matching with diffusers' `FlowMatchEulerDiscreteScheduler`
    * Raw: resolution-aware shift mu (0.5 @ 256 tokens .. 1.15 @ 6400), guidance on when g > 0
    * Turbo: fixed mu = 1.15, 8 steps, no guidance
    * guidance convention v = cond + g * (cond - uncond) (standard CFG scale 1 + g), negative prompt "" by default
Differences on purpose: text is not padded to 512 tokens (padded tokens are masked keys, so image tokens see the same
thing) and noise is drawn on the CPU from the seed, so a seed gives the same image on any device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from krea2_train import facts
from krea2_train.schedule import make_scheduler, mu_for, pack_latents, position_ids, unpack_latents

log = logging.getLogger(__name__)


def predict_velocity(transformer, packed, sigma, embeds, mask, grid: tuple[int, int]):
    """One transformer call: packed latents (B, N, 64) on a (rows, cols) token grid, sigma (B,) in [0, 1] ->
    velocity (B, N, 64)."""
    b, n, _ = packed.shape
    gh, gw = grid
    if gh * gw != n:
        raise ValueError(f"token grid {gh}x{gw} does not match {n} packed latent tokens")
    pos = position_ids(embeds.shape[1], gh, gw, device=packed.device)
    if mask is not None and bool(mask.all()):
        mask = None  # nothing padded: skip the mask so the fastest attention kernel can run
    dtype = transformer.img_in.weight.dtype  # the compute dtype (norms and tables stay float32)
    sigma = sigma.expand(b) if sigma.ndim == 1 and sigma.shape[0] == 1 else sigma
    return transformer(
        hidden_states=packed.to(dtype), encoder_hidden_states=embeds.to(dtype), timestep=sigma.to(dtype),
        position_ids=pos, encoder_attention_mask=mask, return_dict=False,
    )[0]


@dataclass
class SampleSettings:
    height: int = 256
    width: int = 256
    steps: int = facts.RAW_STEPS
    guidance: float = facts.RAW_GUIDANCE
    variant: str = "raw"  # "raw": resolution-aware shift; "turbo": mu 1.15
    seed: int = 0
    mu: float | None = None  # override the variant's shift

    @classmethod
    def turbo(cls, **kw):
        return cls(**{"steps": facts.TURBO_STEPS, "guidance": 0.0, "variant": "turbo", **kw})

    @classmethod
    def raw(cls, **kw):
        return cls(**{"steps": facts.RAW_STEPS, "guidance": facts.RAW_GUIDANCE, "variant": "raw", **kw})


def initial_noise(batch: int, height: int, width: int, seed: int, channels: int = 16) -> torch.Tensor:
    """Packed starting noise, drawn like the pipeline's `randn_tensor` on a CPU generator."""
    if height % facts.PIXEL_MULTIPLE or width % facts.PIXEL_MULTIPLE:
        from krea2_train.errors import UserError

        raise UserError(f"height and width must be multiples of {facts.PIXEL_MULTIPLE}, got {height}x{width} "
                        f"(try {round(height / 16) * 16}x{round(width / 16) * 16})")
    gen = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn((batch, channels, height // facts.VAE_SCALE, width // facts.VAE_SCALE), generator=gen)
    return pack_latents(noise)


@torch.no_grad()
def sample_latents(transformer, embeds, mask, settings: SampleSettings, negative_embeds=None, negative_mask=None,
                   noise: torch.Tensor | None = None, progress: bool = False) -> torch.Tensor:
    """Run the Euler sampler; returns normalised latents (B, 16, H/8, W/8) in float32."""
    device = next(transformer.parameters()).device
    b = embeds.shape[0]
    s = settings
    latents = (noise if noise is not None else initial_noise(b, s.height, s.width, s.seed)).to(device, torch.float32)
    grid = (s.height // facts.PIXEL_MULTIPLE, s.width // facts.PIXEL_MULTIPLE)
    mu = s.mu if s.mu is not None else mu_for(s.variant, s.height, s.width)
    scheduler = make_scheduler()
    scheduler.set_timesteps(sigmas=torch.linspace(1.0, 1.0 / s.steps, s.steps).tolist(), mu=mu, device=device)
    scheduler.set_begin_index(0)
    embeds, mask = embeds.to(device), (mask.to(device) if mask is not None else None)
    guided = s.guidance > 0
    if guided and negative_embeds is None:
        raise ValueError("guidance > 0 needs negative embeddings (encode the negative prompt, '' by default)")
    timesteps = scheduler.timesteps
    iterator = timesteps
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(timesteps, desc="sampling", unit="step")
    for t in iterator:
        sigma = (t / 1000.0).expand(b)
        v = predict_velocity(transformer, latents, sigma, embeds, mask, grid).float()
        if guided:
            v_neg = predict_velocity(transformer, latents, sigma, negative_embeds.to(device),
                                     negative_mask.to(device) if negative_mask is not None else None, grid).float()
            v = v + s.guidance * (v - v_neg)
        latents = scheduler.step(v, t, latents, return_dict=False)[0]
    return unpack_latents(latents, s.height // facts.VAE_SCALE, s.width // facts.VAE_SCALE)


# ----------------------------------------------------------------------------------------------------------- LoRA
def apply_lora(transformer, path_or_state, strength: float = 1.0, adapter_name: str | None = None) -> str:
    """Load one LoRA (any layout we read: diffusers, ComfyUI, musubi, ai-toolkit, ours) onto `transformer` through
    diffusers/PEFT and make it the only active adapter, at `strength`; returns the adapter name."""
    return apply_loras(transformer, [(path_or_state, strength)], [adapter_name] if adapter_name else None)[0]


def apply_loras(transformer, loras, names: list[str] | None = None) -> list[str]:
    """Load several (LoRA, strength) pairs and activate them together; returns their adapter names."""
    from krea2_train.lora.writers import read_lora_for_diffusers  # knows every peer layout, not only diffusers' own

    taken = set(getattr(transformer, "peft_config", {}) or {})
    chosen = []
    for i, (source, _) in enumerate(loras):
        name = names[i] if names else (Path(source).stem if isinstance(source, (str, Path)) else "lora")
        name = base = name.replace(".", "_")
        n = 1
        while name in taken:  # two files may share a stem (pytorch_lora_weights): keep both
            n += 1
            name = f"{base}_{n}"
        state, metadata = read_lora_for_diffusers(source)
        transformer.load_lora_adapter(state, prefix="transformer", adapter_name=name, metadata=metadata)
        taken.add(name)
        chosen.append(name)
    transformer.set_adapters(chosen, weights=[float(s) for _, s in loras])
    return chosen


# ----------------------------------------------------------------------------------------------------- images
class Generator:
    """Prompts -> images with a transformer, a text encoder and a VAE (the `sample` command and previews)."""

    def __init__(self, transformer, text_encoder, vae):
        self.transformer, self.text_encoder, self.vae = transformer, text_encoder, vae

    def encode(self, prompts: list[str]):
        return self.text_encoder.encode(prompts)

    def __call__(self, prompts: list[str], settings: SampleSettings, negative_prompt: str = "", progress=False):
        from krea2_train.models.vae import to_pil

        embeds, mask = self.encode(prompts)
        neg = neg_mask = None
        if settings.guidance > 0:
            neg, neg_mask = self.encode([negative_prompt] * len(prompts))
        latents = sample_latents(self.transformer, embeds, mask, settings, neg, neg_mask, progress=progress)
        return to_pil(self.vae.decode(latents))
