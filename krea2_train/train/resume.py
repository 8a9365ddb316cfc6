"""Resume checks: which checkpoint a run continues from, and refusing one (or a finished run) trained with other
settings, before any model is loaded. What the adapter is made of is `training_settings(cfg)`, stored in each
checkpoint's state.json and in RUN/train_done.json."""

from __future__ import annotations

import json
from pathlib import Path

from krea2_train.config import RunConfig, load_config
from krea2_train.errors import UserError
from krea2_train.train import lora as lora_mod
from krea2_train.train.checkpoint import latest_checkpoint

DONE_FILE = "train_done.json"


def training_settings(cfg: RunConfig) -> dict:
    """The config keys that decide what the adapter is (not steps: more steps continue a finished run)."""
    from omegaconf import OmegaConf

    d = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    keep = {k: d[k] for k in ("model", "data", "lora", "optimizer", "timesteps", "seed")}
    # fsdp: how the work is split, not what is learnt (the checkpoint format differs; Checkpointer.load says so)
    keep["train"] = {k: v for k, v in d["train"].items() if k not in ("stages", "log_every", "fsdp")}
    keep["stages"] = [{k: v for k, v in st.items() if k != "steps"} for st in d["train"]["stages"]]
    for k in ("turbo", "allow_turbo_training"):
        keep["model"].pop(k, None)
    return keep


def _flat(d, prefix=""):
    out = {}
    for k, v in (d.items() if isinstance(d, dict) else enumerate(d)):
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flat(v, key) if isinstance(v, (dict, list)) and v else {key: v})
    return out


def different_settings_error(cfg: RunConfig, before: dict, what: str) -> UserError | None:
    """The error for re-using a run folder with other training settings (None when they match), listing the keys."""
    before, now = _flat(before or {}), _flat(training_settings(cfg))
    if not before:
        return None
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if not changed:
        return None
    return UserError(f"{cfg.run_dir} already holds {what} trained with different settings "
                     f"({', '.join(changed[:6])}{' ...' if len(changed) > 6 else ''}). Use a new run_name "
                     "(or delete that folder) to train with these settings, or restore the old values to "
                     "continue it.")


def resume_path(cfg: RunConfig) -> Path | None:
    """The checkpoint a run would continue from (checkpoint.resume: auto / never / a path)."""
    how = cfg.checkpoint.resume
    if how == "never":
        return None
    return latest_checkpoint(cfg.run_dir) if how == "auto" else Path(how)


def _checkpoint_settings(cfg: RunConfig, path: Path) -> dict | None:
    """training_settings() a checkpoint was written with: from its state.json, or (older checkpoints) from the
    run's saved config.yaml."""
    info = path / "state.json"
    if info.exists():
        try:
            saved = json.loads(info.read_text()).get("trained_with")
        except (OSError, ValueError):
            saved = None
        if saved:
            return saved
    resolved = path.parent.parent / "config.yaml"
    if resolved.exists():
        try:
            old = load_config(resolved, warn_paths=False)
        except Exception:  # an older schema: nothing reliable to compare
            return None
        if old.optimizer.name == "adamw8bit" and cfg.optimizer.name == "adamw":
            old.optimizer.name = "adamw"  # a memory preset's 8-bit switch, saved into config.yaml by setup
        return training_settings(old)
    return None


def check_resume_settings(cfg: RunConfig, path: Path | None = None) -> None:
    """Refuse to continue a checkpoint written with other training settings (lora.rank would otherwise fail inside
    PyTorch's state loading; an optimizer.lr change would resume silently)."""
    path = path if path is not None else resume_path(cfg)
    if path is None or not (Path(path) / "state.json").exists():
        return
    err = different_settings_error(cfg, _checkpoint_settings(cfg, Path(path)), f"checkpoints ({Path(path).name})")
    if err is not None:
        raise err


def training_done(cfg: RunConfig) -> bool:
    """The run finished all its steps and its adapter is on disk (the pipeline then skips training).

    A finished run whose training settings differ from `cfg` is an error (re-using its adapter would be wrong and
    silently retraining would overwrite it): the message lists the changed keys."""
    done = cfg.run_dir / DONE_FILE
    if not done.exists() or not (cfg.run_dir / "adapter" / lora_mod.ADAPTER_WEIGHTS).exists():
        return False
    info = json.loads(done.read_text())
    if info.get("step") != cfg.total_steps:
        return False
    err = different_settings_error(cfg, info.get("trained_with"), "a finished run")
    if err is not None:
        raise err
    return True
