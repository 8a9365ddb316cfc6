"""Checkpoints: adapter, optimiser, LR scheduler, RNG states and the training position, written atomically.

Accelerate's `save_state` writes the optimiser, scheduler, every process's RNG states and the registered
`TrainState` (step = data position, since batches are a pure function of seed and step). A save hook replaces its
full-model dump with the adapter alone (a 12.9B base must not be copied into every checkpoint).

Layout: RUN/checkpoints/step-000120/{adapter_model.safetensors, adapter_config.json, optimizer.bin, scheduler.bin,
random_states_<rank>.pkl, custom_checkpoint_0.pkl, state.json}. Under FSDP (runtime/sharding.py) the adapter file is
the same (gathered from the shards), each process's optimiser shard is `optimizer_sharded/rank_<rank>.pt` and the
scheduler is `custom_checkpoint_1.pkl`. Each is written into a hidden temporary folder
that is renamed into place only when every process has finished, so a killed run never leaves a half checkpoint
that `resume` would pick; only the newest `keep_last` are kept.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from krea2_train.errors import UserError
from krea2_train.train import lora
from krea2_train.utils.io import write_json_atomic

log = logging.getLogger(__name__)
PATTERN = re.compile(r"^step-(\d+)$")


@dataclass
class TrainState:
    """What a resumed run needs beyond tensors: the optimiser step (= data position) and the NaN-guard counters."""

    step: int = 0
    nan_streak: int = 0
    skipped_steps: int = 0
    done: bool = False
    history: list = field(default_factory=list)  # [step, loss] pairs for the loss curve

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            setattr(self, k, v)


def list_checkpoints(run_dir) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and PATTERN.match(p.name) and (p / "state.json").exists()]
    return sorted(found, key=lambda p: int(PATTERN.match(p.name).group(1)))


def latest_checkpoint(run_dir) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def check_checkpoint_kind(path, fsdp: bool, num_processes: int) -> None:
    """A checkpoint resumes only the way it was written: DDP or FSDP (their optimiser files differ) and, under FSDP,
    on as many processes (each holds its own optimiser shard). Checked before the model is loaded."""
    from krea2_train.runtime.sharding import OPTIMIZER_DIR

    path = Path(path)
    if not (path / "state.json").exists():
        return
    if fsdp != (path / OPTIMIZER_DIR).exists():
        how = ("with FSDP; resume it the way it was trained (train.fsdp=true, or configs/accelerate/fsdp.yaml)"
               if not fsdp else "without FSDP; resume it the way it was trained (train.fsdp=false and a "
               "non-FSDP accelerate config)")
        raise UserError(f"{path} was written by a run {how}, or start a new run_name")
    written = json.loads((path / "state.json").read_text()).get("num_processes", 1)
    if fsdp and written != num_processes:
        raise UserError(f"{path} was written by {written} FSDP processes, each with its own optimiser shard; resume "
                        f"it with {written} (accelerate launch --num_processes {written}), or start a new run_name")


class Checkpointer:
    def __init__(self, accelerator, run_dir, keep_last: int, transformer, peft_config, state: TrainState,
                 settings: dict | None = None, fsdp: tuple | None = None):
        """`fsdp`: (sharded model, optimizer, scheduler) when training under FSDP: accelerate does not hold them,
        this class saves them (the adapter gathered, the optimiser one shard per process)."""
        self.acc = accelerator
        self.settings = settings  # training_settings(cfg), stored so a resume can compare its config
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.transformer = transformer  # unwrapped: PEFT helpers need the module names without a DDP prefix
        self.peft_config = peft_config
        self.state = state
        self.fsdp = fsdp
        accelerator.register_for_checkpointing(state)
        if fsdp is not None:
            accelerator.register_for_checkpointing(fsdp[2])  # the scheduler: custom_checkpoint_1.pkl
        accelerator.register_save_state_pre_hook(self._save_hook)
        accelerator.register_load_state_pre_hook(self._load_hook)

    # Accelerate hooks: the model is saved/loaded as its adapter only.
    def _save_hook(self, models, weights, output_dir):
        if self.fsdp is not None or self.acc.is_main_process:
            state = lora.adapter_state_dict(self.transformer)  # under FSDP a gather every process joins
            if self.acc.is_main_process:
                lora.save_adapter(self.transformer, self.peft_config, output_dir, state=state)
        while weights:
            weights.pop()

    def _load_hook(self, models, input_dir):
        lora.load_adapter_weights(self.transformer, input_dir)
        while models:
            models.pop()

    def _position(self) -> dict:
        return {"step": self.state.step, "nan_streak": self.state.nan_streak,
                "skipped_steps": self.state.skipped_steps}

    def already_saved(self) -> bool:
        """This exact training position is already a complete checkpoint (e.g. Ctrl-C right after a periodic
        save): saving again would only rewrite the same files."""
        info = self.root / f"step-{self.state.step:06d}" / "state.json"
        if not info.exists():
            return False
        try:
            saved = json.loads(info.read_text())
        except (OSError, ValueError):
            return False
        return saved.get("position") == self._position() and saved.get("num_processes") == self.acc.num_processes

    def save(self, reason: str = "periodic") -> Path:
        """Collective: every process must call it."""
        final = self.root / f"step-{self.state.step:06d}"
        tmp = self.root / f".tmp-step-{self.state.step:06d}"
        if self.acc.num_processes == 1:
            skip = self.already_saved()
        else:  # every process must take the same branch: the main process decides
            from accelerate.utils import broadcast_object_list

            skip = broadcast_object_list([self.already_saved() if self.acc.is_main_process else None])[0]
        if skip:
            log.info("checkpoint %s already holds step %d; not saved again (%s)", final, self.state.step, reason)
            return final
        if self.acc.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed mid-save
            tmp.mkdir()
        self.acc.wait_for_everyone()
        self.acc.save_state(str(tmp))
        if self.fsdp is not None:
            from krea2_train.runtime.sharding import save_optimizer

            save_optimizer(self.fsdp[1], tmp, self.acc.process_index)
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            info = {"step": self.state.step, "reason": reason, "num_processes": self.acc.num_processes,
                    "position": self._position()}
            if self.settings is not None:
                info["trained_with"] = self.settings
            write_json_atomic(tmp / "state.json", info)
            if final.exists():  # same step number, another position (e.g. a NaN stop after skipped steps)
                shutil.rmtree(final)
            tmp.rename(final)
            for old in list_checkpoints(self.root.parent)[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
            log.info("checkpoint saved: %s (%s)", final, reason)
        self.acc.wait_for_everyone()
        return final

    def load(self, path) -> None:
        path = Path(path)
        if not (path / "state.json").exists():
            raise UserError(f"{path} is not a complete checkpoint (no state.json). Point `checkpoint.resume` at a "
                            "folder under RUN/checkpoints/step-*, or use auto.")
        saved = json.loads((path / "state.json").read_text())
        if saved.get("num_processes", 1) != self.acc.num_processes:
            # RNG files exist per rank; with another world size the data order differs but training is still valid.
            log.warning("checkpoint %s was written by %s processes, resuming with %s: the run will not be bitwise "
                        "identical to an uninterrupted one", path, saved.get("num_processes"), self.acc.num_processes)
            missing = [r for r in range(self.acc.num_processes) if not (path / f"random_states_{r}.pkl").exists()]
            if missing:
                raise UserError(f"{path} has no RNG state for process(es) {missing}: resume with "
                                f"{saved.get('num_processes')} processes, as the checkpoint was written")
        check_checkpoint_kind(path, self.fsdp is not None, self.acc.num_processes)
        self.acc.load_state(str(path))
        if self.fsdp is not None:
            from krea2_train.runtime.sharding import load_optimizer

            load_optimizer(self.fsdp[1], path, self.acc.process_index)
        log.info("resumed from %s at step %d", path, self.state.step)
