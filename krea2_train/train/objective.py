"""What one training step optimises, as the trainer's one seam between the loop and the maths.

    objective = make_objective(cfg)          # train.mode: lora -> FlowMatching, slider -> train/slider.Slider
    loss = objective.step(trainer, batch, generator, run_part)

An objective says where its batches come from (`source`), prepares them before the transformer loads (`prepare`),
computes a step as one or more parts (`parts`; each part is a scalar loss whose backward runs before the next part
is built, so a two-part step peaks at the memory of one), and renders the run's previews (`render_previews`).

`run_part(fn, context=None)` is the trainer's: inside `context` (and DDP's no_sync for every part but the last of
an optimiser step) it calls `fn()` for a scalar loss, checks it is finite on every process, backpropagates it
divided by the accumulation count and returns it detached, or None when it was not finite (the step is skipped).
"""

from __future__ import annotations


class FlowMatching:
    """train.mode: lora: train/step.py's flow-matching loss on the data caches' (latent, caption) batches."""

    parts = 1

    def model_keys(self, cfg) -> list[str]:
        return []

    def prepare(self, trainer) -> None:
        pass  # the data caches are built by the pipeline / the source itself

    def source(self, cfg, accelerator):
        from krea2_train.data.source import CachedData

        return CachedData(cfg, accelerator)

    def step(self, trainer, batch, generator, run_part):
        return run_part(lambda: trainer.loss_on(batch, generator).mean())

    def render_previews(self, cfg, transformer, run_dir, step, **kwargs):
        from krea2_train.train.preview import render_previews

        return render_previews(cfg, transformer, run_dir, step, **kwargs)


def make_objective(cfg):
    if cfg.train.mode == "slider":
        from krea2_train.train.slider import Slider

        return Slider(cfg)
    return FlowMatching()
