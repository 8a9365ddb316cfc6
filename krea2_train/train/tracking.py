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
            if kind != "none":
                if kind == "rich":
                    try:
                        import warnings

                        from tqdm.rich import tqdm
                        warnings.filterwarnings("ignore", message=".*rich is experimental.*")
                    except ImportError:
                        from tqdm import tqdm
                else:
                    from tqdm import tqdm
                self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

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
            self.bar.n = step
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items() if k in ("loss", "lr", "s_per_step")},
                                 refresh=False)
            self.bar.refresh()
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


def write_loss_curve(history, path) -> None:
    """history: [[step, loss], ...] (raw loss plus a moving average)."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..utils.io import write_bytes_atomic

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
