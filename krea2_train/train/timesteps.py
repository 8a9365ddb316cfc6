"""Which sigmas a training step sees.

Sampling: logit-normal (sigmoid of a normal, SD3's default) or uniform. Shift: by default the same
resolution-aware time shift Raw uses at inference (mu from the packed token count), so training spends its
steps where sampling at that resolution does; `fixed` uses `timesteps.mu`, `none` leaves sigmas as drawn.
"""

from __future__ import annotations

import torch

from krea2_train.schedule import raw_mu, time_shift


def shift_mu(cfg, image_seq_len: int) -> float | None:
    if cfg.shift == "raw":
        return raw_mu(image_seq_len)
    if cfg.shift == "fixed":
        return float(cfg.mu)
    return None


def sample_sigmas(cfg, batch: int, image_seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """(batch,) float32 sigmas in (0, 1), drawn on the CPU from `generator` (same values on any device)."""
    if cfg.sampling == "logit_normal":
        u = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(batch, generator=generator))
    else:
        u = torch.rand(batch, generator=generator)
    u = u.clamp(1e-4, 1 - 1e-4)  # sigma 0 or 1 gives a degenerate target
    mu = shift_mu(cfg, image_seq_len)
    return (time_shift(mu, u.double()).float() if mu is not None else u).float()


def loss_weights(cfg, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample weights for the velocity MSE: diffusers' SD3 weightings (none | sigma_sqrt | cosmap)."""
    if cfg.weighting == "none":
        return torch.ones_like(sigmas)
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    # sigma_sqrt is sigma^-2: clamp so a sigma near 0 cannot dominate the batch
    return compute_loss_weighting_for_sd3(cfg.weighting, sigmas.float()).clamp(max=1e3)
