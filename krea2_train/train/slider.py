"""Concept sliders (`train.mode: slider`): one LoRA that moves an attribute up at +strength and down at -strength,
taught by the frozen Raw model itself, with no images needed.

Source: Gandikota et al. 2023, "Concept Sliders: LoRA Adaptors for Precise Control in Diffusion Models"
(arXiv:2311.12092), in the flow-matching form of ai-toolkit's generic concept-slider job. For a slider target with
prompts c_t (target), c+ (positive), c- (negative), anchors c_a and guidance g, at a noisy latent x_t and sigma:

    base, adapter off:   v_t = v(x_t, c_t)   d = v(x_t, c+) - v(x_t, c-)   v_a = v(x_t, c_a)
    LoRA at +s:          v_{+s}(x_t, c_t)  ->  v_t + g d        v_{+s}(x_t, c_a)  ->  v_a
    LoRA at -s:          v_{-s}(x_t, c_t)  ->  v_t - g d        v_{-s}(x_t, c_a)  ->  v_a

    L = sum over sign in (+1, -1) of  mean_b w(sigma_b) [ |v_{sign s}(c_t) - (v_t + sign g d)|^2
                                                         + anchor_weight |v_{sign s}(c_a) - v_a|^2 ]
(|.|^2: the mean over tokens and channels, as the flow-matching MSE; w: timesteps.weighting.) The strength s is 1:
the trained file is used at +1 / -1 and in between. x_t = (1 - sigma) x0 + sigma noise with x0 the latents of the
target's `images`, else x_t = noise (pure noise at the sampled sigma). One optimiser step trains both signs: the
two sign losses are backpropagated one after the other into the same gradients (one graph at a time in memory).

The base predictions come from the same transformer with the adapter's scale set to 0 (no second copy, and no
toggling of requires_grad, which FSDP2 would remember); the signs set the scale to +s and -s (`adapter_scale`).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

log = logging.getLogger(__name__)

TRAIN_STRENGTH = 1.0
PREVIEW_STRENGTHS = (-2.0, -1.0, 0.0, 1.0, 2.0)


@contextmanager
def adapter_scale(model, strength: float):
    """Every active PEFT LoRA / LoKr layer of `model` scaled by `strength` while inside (0: exactly the base model,
    negative: the opposite direction); the scales are restored on exit. DoRA is not linear in its scale (config
    refuses it for sliders)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    saved = []
    for m in model.modules():
        if isinstance(m, BaseTunerLayer) and isinstance(getattr(m, "scaling", None), dict):
            for name in m.active_adapters:
                if name in m.scaling:
                    saved.append((m, name, m.scaling[name]))
                    m.scaling[name] = m.scaling[name] * float(strength)
    try:
        yield
    finally:
        for m, name, value in saved:
            m.scaling[name] = value


def noisy_latents(latents: torch.Tensor | None, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_t (B, N, 64): (1 - sigma) x0 + sigma noise for packed starting latents x0 (B, N, 64), else the noise."""
    if latents is None:
        return noise.float()
    s = sigmas.float().view(-1, 1, 1)
    return (1 - s) * latents.float() + s * noise.float()


def slider_step(velocity, transformer, batch: dict, weights: torch.Tensor, run_part,
                strength: float = TRAIN_STRENGTH) -> torch.Tensor | None:
    """The slider loss of one batch (module docstring), as two parts (sign +1, then -1) handed to `run_part`.

    `velocity(text (B, L, 12, D), grad: bool) -> (B, N, 64)`: the transformer at the batch's fixed x_t and sigmas
    (grad=False: called under no_grad for the base predictions); `transformer`: the PEFT-adapted model whose scale
    `adapter_scale` sets; `batch`: data/slider_source's keys (target, positive, negative, anchor, guidance,
    anchor_weight); `weights` (B,): per-sample loss weights. Returns the summed loss of both signs (detached), or
    None when `run_part` reported a non-finite part."""
    g, wa = float(batch["guidance"]), float(batch["anchor_weight"])
    anchor = batch.get("anchor") if wa > 0 else None
    with torch.no_grad(), adapter_scale(transformer, 0.0):
        v_t = velocity(batch["target"], False).float()
        direction = velocity(batch["positive"], False).float() - velocity(batch["negative"], False).float()
        v_a = velocity(anchor, False).float() if anchor is not None else None
    weights = weights.float().to(v_t.device)
    total = None
    for sign in (1.0, -1.0):
        goal = v_t + sign * g * direction

        def loss(goal=goal):
            per = ((velocity(batch["target"], True).float() - goal) ** 2).mean(dim=(1, 2))
            if v_a is not None:
                per = per + wa * ((velocity(anchor, True).float() - v_a) ** 2).mean(dim=(1, 2))
            return (per * weights).mean()

        part = run_part(loss, adapter_scale(transformer, sign * strength))
        if part is None:
            return None
        total = part if total is None else total + part
    return total


class Slider:
    """The trainer's objective for train.mode: slider (train/objective.py describes the interface)."""

    parts = 2

    def __init__(self, cfg):
        self.cfg = cfg

    def model_keys(self, cfg) -> list[str]:
        keys = ["model.text_encoder"]
        return keys + (["model.vae"] if any(s.images for s in cfg.train.sliders) else [])

    def prepare(self, trainer) -> None:
        """Slider prompts (and images) encoded before the transformer takes the accelerator."""
        if trainer.source is None:
            trainer.source = self.source(self.cfg, trainer.acc)

    def source(self, cfg, accelerator):
        from krea2_train.data.slider_source import SliderData, prepare_slider_cache

        return SliderData(cfg, accelerator, texts=prepare_slider_cache(cfg))

    def step(self, trainer, batch, generator, run_part):
        from krea2_train.schedule import pack_latents, position_ids
        from krea2_train.train.step import model_velocity
        from krea2_train.train.timesteps import loss_weights, sample_sigmas

        cfg, dev = self.cfg, trainer.acc.device
        b, c, h, w = batch["latent_shape"]
        n = (h // 2) * (w // 2)
        noise = torch.randn((b, n, c * 4), generator=generator)
        sigmas = sample_sigmas(cfg.timesteps, b, n, generator)
        lat = batch.get("latents")
        xt = noisy_latents(pack_latents(lat.float()) if lat is not None else None, noise, sigmas).to(dev)
        s = sigmas.to(dev)
        dtype = trainer.transformer.img_in.weight.dtype

        def velocity(text, grad):
            # grad: through the training wrapper (DDP's gradient sync); base: the bare transformer, no hooks
            model = trainer.model if grad else trainer.transformer
            pos = position_ids(text.shape[1], h // 2, w // 2, device=dev)
            return model_velocity(model, xt, s, text.to(dev), pos, None, dtype=dtype, autocast=trainer.acc.autocast())

        return slider_step(velocity, trainer.transformer, batch, loss_weights(cfg.timesteps, sigmas), run_part)

    def render_previews(self, cfg, transformer, run_dir, step, **kwargs):
        return render_slider_previews(cfg, transformer, run_dir, step, write=kwargs.get("write", True))


# ------------------------------------------------------------------------------------------------------ previews
@torch.no_grad()
def render_slider_previews(cfg, transformer, run_dir, step: int, strengths=PREVIEW_STRENGTHS, write: bool = True):
    """The slider's strength sweep: one column per strength (-2 .. 2), a row per preview prompt on Turbo (8 steps,
    the deployment) and on Raw (CFG), into RUN/previews/step-N.png. Turbo swaps the base weights in place
    (runtime/swap.py); a quantised base cannot be swapped, and then only Raw is shown."""
    import io

    from krea2_train.inference import SampleSettings, sample_latents
    from krea2_train.lora.workflow import embed_png_chunks, run_workflow_chunks
    from krea2_train.runtime.swap import copy_base_weights
    from krea2_train.train.preview import _decode, prompt_embeddings, write_steps_grid
    from krea2_train.utils.grid import grid_image
    from krea2_train.utils.io import write_bytes_atomic

    p = cfg.preview
    if not p.prompts:
        return {}
    emb, mask, neg, neg_mask = prompt_embeddings(cfg)
    device = next(transformer.parameters()).device
    was_training = transformer.training
    transformer.eval()
    size = dict(height=p.resolution, width=p.resolution, seed=p.seed)
    n = len(p.prompts)

    def sweep(settings, guided):
        out = []
        for st in strengths:
            with adapter_scale(transformer, st):
                out.append(torch.cat([sample_latents(transformer, emb[i:i + 1], mask[i:i + 1], settings,
                                                     neg[i:i + 1] if guided else None,
                                                     neg_mask[i:i + 1] if guided else None) for i in range(n)]))
        return out

    rows, per_strength = [], [[] for _ in strengths]
    try:
        if p.turbo and cfg.model.turbo:
            try:
                copy_base_weights(transformer, cfg.model.turbo)  # TypeError before touching anything if quantised
            except TypeError:
                log.warning("slider preview: Turbo rows skipped (a quantised base cannot be swapped in place)")
            else:
                try:
                    for i, lat in enumerate(sweep(SampleSettings.turbo(steps=p.turbo_steps, **size), False)):
                        per_strength[i].append(lat)
                finally:
                    copy_base_weights(transformer, cfg.model.transformer)
                rows += [f"Turbo {p.turbo_steps} steps: {q}" for q in p.prompts]
        raw = SampleSettings.raw(steps=p.raw_steps, guidance=p.raw_guidance, **size)
        for i, lat in enumerate(sweep(raw, raw.guidance > 0)):
            per_strength[i].append(lat)
        rows += [f"Raw CFG {p.raw_guidance:g}: {q}" for q in p.prompts]
    finally:
        transformer.train(was_training)
    if not write:
        return {}
    columns = _decode(cfg, [torch.cat(parts) for parts in per_strength], device)
    grid = grid_image(columns, [f"slider {st:+g}" for st in strengths], row_labels=rows)
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    path = Path(run_dir) / "previews" / f"step-{step:06d}.png"
    chunks = run_workflow_chunks(cfg, strength=1.0, prompt=p.prompts[0], width=p.resolution, height=p.resolution,
                                 seed=p.seed)
    write_bytes_atomic(path, embed_png_chunks(buf.getvalue(), chunks))
    write_steps_grid(Path(run_dir) / "previews")
    log.info("slider preview: %s", path)
    return {"preview": grid}


def run_part_without_backward(fn, context=None):
    """A `run_part` that only evaluates (no backward): for measuring the slider loss outside training."""
    with context if context is not None else nullcontext():
        return fn().detach()
