"""Progress and metrics: a progress bar (loss, lr, s/step, ETA), metrics.jsonl, TensorBoard and wandb through
Accelerate's trackers, and a loss-curve PNG in the run folder.

wandb runs offline (files under RUN/wandb, sync later with `wandb sync`) when there is no login, so a run never
blocks on a prompt or fails for lack of network.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.path.expanduser("~/.netrc"))
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def tracker_names(cfg) -> list[str]:
    names = []
    if cfg.logging.tensorboard:
        names.append("tensorboard")
    if cfg.logging.wandb and os.environ.get("WANDB_MODE") != "disabled":
        if not wandb_logged_in():
            os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_DIR", str(cfg.run_dir))  # offline runs live with the run, not in the cwd
        names.append("wandb")
    return names


class Tracker:
    """Main-process-only progress and logging; other processes get a no-op."""

    def __init__(self, accelerator, cfg, run_dir, total_steps: int, start_step: int):
        self.acc, self.cfg, self.run_dir = accelerator, cfg, Path(run_dir)
        self.total, self.start = total_steps, start_step
        self.active = accelerator.is_main_process
        self.t0 = time.perf_counter()
        self.bar = None
        if self.active:
            self.metrics = open(self.run_dir / "metrics.jsonl", "a")
            kind = cfg.logging.progress
            if kind == "rich":
                self.bar = _RichBar(total_steps, start_step)
            elif kind == "tqdm":
                self.bar = _TqdmBar(total_steps, start_step)

    def log(self, step: int, values: dict) -> None:
        if not self.active:
            return
        done = step - self.start
        elapsed = time.perf_counter() - self.t0
        s_per_step = elapsed / max(1, done)
        values = {**values, "s_per_step": s_per_step, "eta_s": s_per_step * (self.total - step)}
        self.metrics.write(json.dumps({"step": step, **values}) + "\n")
        self.metrics.flush()
        if self.bar is not None and "loss" in values:
            self.bar.update(step, f"loss {values['loss']:.4f}  lr {values['lr']:.3g}  {s_per_step:.2f} s/step")
        if self.acc.trackers:
            self.acc.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)

    def log_images(self, step: int, images: dict) -> None:
        """images: name -> PIL image; sent to every tracker that takes images."""
        if not self.active or not self.acc.trackers:
            return
        import numpy as np

        for tracker in self.acc.trackers:
            try:
                if tracker.name == "tensorboard":
                    for k, im in images.items():
                        tracker.writer.add_image(k, np.asarray(im), step, dataformats="HWC")
                elif tracker.name == "wandb":
                    import wandb

                    tracker.log({k: wandb.Image(im) for k, im in images.items()}, step=step)
            except Exception as exc:  # a tracker failing must not kill a training run
                log.warning("could not log preview images to %s: %s", tracker.name, exc)

    def close(self, history) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.close()
        self.metrics.close()
        write_loss_curve(history, self.run_dir / "loss.png")


class _TqdmBar:
    def __init__(self, total, start):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def update(self, step, text):
        self.bar.n = step
        self.bar.set_postfix_str(text, refresh=False)
        self.bar.refresh()

    def close(self):
        self.bar.close()


class _RichBar:
    """rich progress: bar, step/total, loss, lr, s/step, elapsed and ETA."""

    def __init__(self, total, start):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                 TimeRemainingColumn())
        self.task = self.progress.add_task("train", total=total, completed=start, info="")
        self.progress.start()

    def update(self, step, text):
        self.progress.update(self.task, completed=step, info=text)

    def close(self):
        self.progress.stop()


def write_loss_curve(history, path) -> None:
    """history: [[step, loss], ...] (raw loss plus a moving average)."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from krea2_train.utils.io import write_bytes_atomic

    steps = [h[0] for h in history]
    losses = [h[1] for h in history]
    k = max(1, len(losses) // 20)
    smooth = [sum(losses[max(0, i - k + 1): i + 1]) / len(losses[max(0, i - k + 1): i + 1]) for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, alpha=0.35, label="loss")
    ax.plot(steps, smooth, label=f"moving average ({k})")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.legend()
    ax.grid(alpha=0.3)
    import io

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())


def reset_gpu_peak(device) -> None:
    """Start a new peak-memory window (each training stage gets its own peaks)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def gpu_memory(device) -> dict:
    """Peak GPU memory of the current window in GiB, as metrics.jsonl logs it (empty off the GPU): what the
    first GPU run compares with `krea2-train estimate`."""
    if torch.device(device).type != "cuda":
        return {}
    return {"gpu_peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "gpu_peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
