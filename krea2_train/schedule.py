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


# ------------------------------------------------------------------------------------------- ComfyUI's schedulers
# ComfyUI samples Krea 2 with `ModelSamplingFlux(shift=1.15)` (comfy/supported_models.py `Krea2`, Raw and Turbo
# alike): a table of 10000 float32 sigmas, time_shift(mu, t) at t = 1/10000 .. 1, which its schedulers index.
COMFY_TIMESTEPS = 10000
SCHEDULERS = ("simple", "beta")


def comfy_model_sigmas(mu: float = facts.TURBO_MU) -> torch.Tensor:
    """ComfyUI's `model_sampling.sigmas` for a flow model with shift `mu`: (10000,) float32, ascending, last 1.0.
    The same float32 arithmetic as comfy/model_sampling.py `ModelSamplingFlux.set_parameters`."""
    t = torch.arange(1, COMFY_TIMESTEPS + 1, 1) / COMFY_TIMESTEPS
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) (continued fraction, modified Lentz; Numerical Recipes 6.4)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below the mean: use the symmetry
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-16:
            break
    return front * f


def beta_ppf(p: float, a: float, b: float) -> float:
    """Inverse of the Beta(a, b) CDF (what `scipy.stats.beta.ppf` computes), by bisection to float64 precision:
    no scipy dependency for one schedule."""
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if _betainc(a, b, mid) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def beta_sigmas(steps: int, mu: float = facts.TURBO_MU, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    """ComfyUI's `beta` scheduler (comfy/samplers.py `beta_scheduler`, after arXiv 2407.12173): `steps` points
    1 - linspace(0, 1, steps, endpoint=False) through the Beta(alpha, beta) quantile, rounded (half to even, as
    numpy.rint) to indices of the model's sigma table, consecutive repeats dropped, then 0. Returns float32 sigmas,
    descending from 1.0, ending with 0 (at most steps + 1 values)."""
    table = comfy_model_sigmas(mu)
    total = len(table) - 1
    sigmas, last = [], None
    step = 1.0 / steps  # numpy.linspace's own arithmetic: i * (1 / steps)
    for i in range(steps):
        t = round(beta_ppf(1.0 - i * step, alpha, beta) * total)  # round() is half-to-even like numpy.rint
        if t != last:
            sigmas.append(float(table[t]))
        last = t
    return torch.tensor(sigmas + [0.0], dtype=torch.float32)


def simple_sigmas(steps: int, mu: float = facts.TURBO_MU) -> torch.Tensor:
    """ComfyUI's `simple` scheduler over the same table (for comparison; the sampler's own `simple` path is
    diffusers' Krea 2 schedule, `sampling_sigmas`: equal to this where `steps` divides 10000, else within one
    table entry, ~1e-4, since ComfyUI truncates the index)."""
    table = comfy_model_sigmas(mu)
    ss = len(table) / steps
    return torch.tensor([float(table[-(1 + int(x * ss))]) for x in range(steps)] + [0.0], dtype=torch.float32)
