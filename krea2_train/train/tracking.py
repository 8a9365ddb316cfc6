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
            drop_rows_after(self.run_dir / "metrics.jsonl", start_step)
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
        if "val_loss" in values:  # rare and worth seeing: a line of its own, above the bar
            self.note(f"step {step}: validation loss {values['val_loss']:.4f}")
        if self.acc.trackers:
            self.acc.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)

    def note(self, text: str) -> None:
        """A line on the console that does not break the progress bar."""
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def write_curve(self, state) -> None:
        """loss.png: training loss, validation loss and the stage boundaries (main process)."""
        if self.active:
            from krea2_train.train.optim import stage_boundaries

            write_loss_curve(state.history, self.run_dir / "loss.png", val_history=state.val_history,
                             boundaries=stage_boundaries(self.cfg.train.stages)[1:])

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

    def close(self, state) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.close()
        self.metrics.close()
        self.write_curve(state)


def drop_rows_after(path: Path, step: int) -> None:
    """A resumed run repeats the steps after its checkpoint: drop what a killed run logged past `step`, so
    metrics.jsonl holds one row per step and kind (rewritten atomically; nothing to do on most starts)."""
    if not path.exists():
        return
    from krea2_train.utils.io import write_text_atomic

    lines = path.read_text().splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            row_step = json.loads(line).get("step", 0)
        except ValueError:
            continue  # a half-written last line from a kill -9
        if row_step <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
    if len(keep) != len(lines):
        log.info("metrics.jsonl: dropped %d rows logged after step %d by the interrupted run", len(lines) - len(keep),
                 step)
        write_text_atomic(path, "".join(keep))


class _TqdmBar:
    def __init__(self, total, start):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def update(self, step, text):
        self.bar.n = step
        self.bar.set_postfix_str(text, refresh=False)
        self.bar.refresh()

    def write(self, text):
        self.bar.write(text)

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

    def write(self, text):
        self.progress.console.print(text)

    def close(self):
        self.progress.stop()


def loss_figure(history, val_history=(), boundaries=()):
    """The loss-curve figure. history: [[step, loss], ...] (raw loss plus a moving average); val_history:
    [[step, val_loss], ...]; boundaries: the first step of each stage after the first (dashed lines: a loss jump
    there is the resolution change, not a divergence)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h[0] for h in history]
    losses = [h[1] for h in history]
    k = max(1, len(losses) // 20)
    smooth = [sum(losses[max(0, i - k + 1): i + 1]) / len(losses[max(0, i - k + 1): i + 1]) for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, alpha=0.35, label="loss")
    ax.plot(steps, smooth, label=f"moving average ({k})")
    if val_history:
        ax.plot([v[0] for v in val_history], [v[1] for v in val_history], "o-", color="C3", label="validation")
    for i, b in enumerate(boundaries):
        ax.axvline(b, color="grey", linestyle="--", linewidth=1, label="stage start" if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def write_loss_curve(history, path, val_history=(), boundaries=()) -> None:
    """loss.png (atomically): see `loss_figure`."""
    if not history and not val_history:
        return
    import io

    import matplotlib.pyplot as plt

    from krea2_train.utils.io import write_bytes_atomic

    fig = loss_figure(history, val_history, boundaries)
    buf = io.BytesIO()
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
