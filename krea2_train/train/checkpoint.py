"""Checkpoints: adapter, optimiser, LR scheduler, RNG states and the training position, written atomically, in
safetensors and JSON only: resuming a checkpoint someone sent you cannot run code (pickle files, what accelerate's
`save_state` writes, can). Older pickle checkpoints load only with `checkpoint.allow_pickle: true`.

Layout: RUN/checkpoints/step-000120/{adapter_model.safetensors, adapter_config.json, optimizer.safetensors (tensors;
param groups and scalars as JSON in its header), scheduler.json, rng_<rank>.safetensors (each process's Python,
NumPy, torch and CUDA generators), scaler.json (fp16 only), state.json (the TrainState: step = data position, since
batches are a pure function of seed and step)}. Under FSDP (runtime/sharding.py) the adapter file is the same
(gathered from the shards) and each process's optimiser shard is `optimizer_sharded/rank_<rank>.safetensors`. Each
is written into a hidden temporary folder that is renamed into place only when every process has finished, so a
killed run never leaves a half checkpoint that `resume` would pick; only the newest `keep_last` are kept.
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
    val_history: list = field(default_factory=list)  # [step, validation loss] pairs, drawn on the same curve

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


def check_checkpoint_kind(path, fsdp: bool, num_processes: int, allow_pickle: bool = False,
                          machines: int | None = None) -> None:
    """A checkpoint resumes only the way it was written: DDP or FSDP (their optimiser files differ), on as many
    machines (`machines`: this launch's, from the launcher), under FSDP on as many processes (each holds its own
    optimiser shard); an older pickle one only with `allow_pickle`. Checked before the model is loaded."""
    from krea2_train.runtime.distributed import node_layout
    from krea2_train.runtime.sharding import OPTIMIZER_DIR

    path = Path(path)
    if not (path / "state.json").exists():
        return
    if not allow_pickle and is_legacy(path):
        raise UserError(f"{path} is an older checkpoint in pickle format ({', '.join(pickle_files(path)[:4])}): "
                        "loading it can run any code stored in it. If you wrote it yourself (or trust who did), "
                        "resume with checkpoint.allow_pickle=true; otherwise start a new run_name, or point "
                        "checkpoint.resume at a pickle-free checkpoint.")
    if fsdp != (path / OPTIMIZER_DIR).exists():
        how = ("with FSDP; resume it the way it was trained (train.fsdp=true, or configs/accelerate/fsdp.yaml)"
               if not fsdp else "without FSDP; resume it the way it was trained (train.fsdp=false and a "
               "non-FSDP accelerate config)")
        raise UserError(f"{path} was written by a run {how}, or start a new run_name")
    saved = json.loads((path / "state.json").read_text())
    written = saved.get("num_processes", 1)
    machines = node_layout()[0] if machines is None else machines
    on = saved.get("machines", 1)  # older checkpoints: one machine
    if on != machines:
        raise UserError(
            f"{path} was written on {on} machine(s) ({written} processes); this launch has {machines} machine(s) "
            f"({num_processes} processes). Resume it on {on} machine(s), starting every one with its same "
            "`accelerate launch` command (README: Multi-node), or start a new run_name")
    if fsdp and written != num_processes:
        raise UserError(f"{path} was written by {written} FSDP processes, each with its own optimiser shard; resume "
                        f"it with {written} (accelerate launch --num_processes {written}), or start a new run_name")


LEGACY_FILES = ("optimizer.bin", "scheduler.bin", "scaler.pt")  # plus *.pkl and optimizer_sharded/*.pt


def pickle_files(path) -> list[str]:
    """The files of an older (accelerate save_state) checkpoint that only unpickling can read."""
    path = Path(path)
    found = [n for n in LEGACY_FILES if (path / n).exists()] + sorted(p.name for p in path.glob("*.pkl"))
    return found + sorted(f"{p.parent.name}/{p.name}" for p in path.glob("optimizer_sharded/*.pt"))


def is_legacy(path) -> bool:
    return not (Path(path) / OPTIMIZER_FILE).exists() and not (Path(path) / "rng_0.safetensors").exists() \
        and bool(pickle_files(path))


OPTIMIZER_FILE = "optimizer.safetensors"
SCHEDULER_FILE = "scheduler.json"
SCALER_FILE = "scaler.json"


def rng_file(path, rank: int) -> Path:
    return Path(path) / f"rng_{rank}.safetensors"


class Checkpointer:
    def __init__(self, accelerator, run_dir, keep_last: int, transformer, peft_config, state: TrainState,
                 settings: dict | None = None, fsdp: tuple | None = None, optimizer=None, scheduler=None,
                 allow_pickle: bool = False):
        """`optimizer`, `scheduler`: what the trainer steps (accelerate's wrappers are fine). `fsdp`: (sharded model,
        optimizer, scheduler) when training under FSDP: the optimiser is then saved one shard per process.
        `allow_pickle`: also resume older checkpoints written with pickle (checkpoint.allow_pickle)."""
        self.acc = accelerator
        self.settings = settings  # training_settings(cfg), stored so a resume can compare its config
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.transformer = transformer  # unwrapped: PEFT helpers need the module names without a DDP prefix
        self.peft_config = peft_config
        self.state = state
        self.fsdp = fsdp
        self.optimizer = fsdp[1] if fsdp is not None else optimizer
        self.scheduler = fsdp[2] if fsdp is not None else scheduler
        self.allow_pickle = allow_pickle

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

    def _write(self, tmp: Path) -> None:
        """Every process writes its part of the checkpoint into `tmp` (collective under FSDP: the adapter gather)."""
        from krea2_train.utils.tensorstate import save_json_state, save_optimizer_state, save_rng_state

        main = self.acc.is_main_process
        if self.fsdp is not None or main:
            adapter = lora.adapter_state_dict(self.transformer)  # under FSDP a gather every process joins
            if main:
                lora.save_adapter(self.transformer, self.peft_config, tmp, state=adapter)
        if self.fsdp is not None:
            from krea2_train.runtime.sharding import save_optimizer

            save_optimizer(self.optimizer, tmp, self.acc.process_index)
        elif main and self.optimizer is not None:  # DDP: every process holds the same states
            save_optimizer_state(self.optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        if main:
            if self.scheduler is not None:
                save_json_state(self.scheduler.state_dict(), tmp / SCHEDULER_FILE)
            if self.acc.scaler is not None:
                save_json_state(self.acc.scaler.state_dict(), tmp / SCALER_FILE)
        save_rng_state(rng_file(tmp, self.acc.process_index))

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
        self._write(tmp)
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            from krea2_train.runtime.distributed import node_layout

            info = {"step": self.state.step, "reason": reason, "num_processes": self.acc.num_processes,
                    "machines": node_layout()[0],
                    "position": self._position(), "train_state": self.state.state_dict()}
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
        check_checkpoint_kind(path, self.fsdp is not None, self.acc.num_processes, self.allow_pickle)
        legacy = is_legacy(path)
        if saved.get("num_processes", 1) != self.acc.num_processes:
            # RNG files exist per rank; with another world size the data order differs but training is still valid.
            log.warning("checkpoint %s was written by %s processes, resuming with %s: the run will not be bitwise "
                        "identical to an uninterrupted one", path, saved.get("num_processes"), self.acc.num_processes)
            name = "random_states_{}.pkl" if legacy else "rng_{}.safetensors"
            missing = [r for r in range(self.acc.num_processes) if not (path / name.format(r)).exists()]
            if missing:
                raise UserError(f"{path} has no RNG state for process(es) {missing}: resume with "
                                f"{saved.get('num_processes')} processes, as the checkpoint was written")
        if legacy:
            self._load_legacy(path)
        else:
            self._load(path, saved)
        log.info("resumed from %s at step %d", path, self.state.step)

    def _load(self, path: Path, saved: dict) -> None:
        """Only safetensors and JSON are read."""
        from krea2_train.utils.tensorstate import load_optimizer_state, load_rng_state

        lora.load_adapter_weights(self.transformer, path)
        if self.fsdp is not None:
            from krea2_train.runtime.sharding import load_optimizer

            load_optimizer(self.optimizer, path, self.acc.process_index)
        elif self.optimizer is not None:
            self.optimizer.load_state_dict(load_optimizer_state(path / OPTIMIZER_FILE)[0])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(json.loads((path / SCHEDULER_FILE).read_text()))
        if self.acc.scaler is not None and (path / SCALER_FILE).exists():
            self.acc.scaler.load_state_dict(json.loads((path / SCALER_FILE).read_text()))
        self.state.load_state_dict(saved["train_state"])
        load_rng_state(rng_file(path, self.acc.process_index))

    def _load_legacy(self, path: Path) -> None:
        """An accelerate `save_state` checkpoint (pickle), read the way it was written; only with allow_pickle."""
        log.warning("resuming %s from pickle files (checkpoint.allow_pickle=true); its next checkpoint is written "
                    "pickle-free", path)

        def load_hook(models, input_dir):  # the model is the adapter alone
            lora.load_adapter_weights(self.transformer, input_dir)
            models.clear()

        objects = [self.state] + ([self.scheduler] if self.fsdp is not None else [])
        before = list(self.acc._custom_objects)
        self.acc._custom_objects[:] = objects  # custom_checkpoint_<i>.pkl, in the order they were registered
        handle = self.acc.register_load_state_pre_hook(load_hook)
        try:
            self.acc.load_state(str(path))
        finally:
            handle.remove()
            self.acc._custom_objects[:] = before
        if self.fsdp is not None:
            from krea2_train.runtime.sharding import load_optimizer

            load_optimizer(self.optimizer, path, self.acc.process_index, allow_pickle=True)
