"""What the subcommand modules share."""

from __future__ import annotations

import argparse


def add_config_command(sub, name: str, help: str, func, overrides_help: str = "key=value overrides, e.g. "
                       "lora.rank=32 train.stages.0.steps=500") -> argparse.ArgumentParser:
    """A subcommand that takes a run config YAML plus key=value overrides (the areas add their own flags)."""
    p = sub.add_parser(name, help=help)
    p.add_argument("config", help="run config YAML (see configs/)" + (
        ", or a data folder (images + .txt captions" + ("" if not FOLDER_NEEDS[name] else
                                                        "; the model paths then come as key=value overrides") + ")"
        if name in FOLDER_NEEDS else ""))
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.set_defaults(func=func)
    return p


# What each command needs from `model:` when it is given a data folder instead of a config (check-data: nothing).
FOLDER_NEEDS = {"check-data": (), "caption": (), "config": ("model.transformer", "model.text_encoder", "model.vae"),
                "cache": ("model.text_encoder", "model.vae"),
                "train": ("model.transformer", "model.text_encoder", "model.vae"),
                "run": ("model.transformer", "model.text_encoder", "model.vae")}


def load_run_config(args, warn_paths: bool = True):
    """The run config of a CONFIG [key=value ...] command. CONFIG may also be a data folder (what people try first):
    it becomes `data.datasets.0.path`, with the defaults for everything else; the model paths the command needs must
    then come as overrides, else the error shows the exact command to type."""
    from pathlib import Path

    from krea2_train.config import load_config
    from krea2_train.errors import UserError

    src = Path(args.config).expanduser()
    if not src.is_dir():
        return load_config(args.config, args.overrides, warn_paths=warn_paths)
    given = {o.split("=", 1)[0].strip() for o in args.overrides or [] if "=" in o}
    missing = [k for k in FOLDER_NEEDS.get(args.command, ()) if k not in given]
    if missing:
        example = {"model.transformer": "/models/krea2/krea2-raw.safetensors",
                   "model.text_encoder": "/models/Qwen3-VL-4B-Instruct", "model.vae": "/models/krea2/vae"}
        paths = " ".join(f"{k}={example[k]}" for k in missing)
        raise UserError(f"{src} is a folder; `krea2-train {args.command}` also needs the model paths ("
                        f"{', '.join(missing)}). Either give them: `krea2-train {args.command} {src} {paths}`, or put "
                        f"the folder in a config: `krea2-train {args.command} configs/style.yaml "
                        f"data.datasets.0.path={src}` (after setting its model: paths).")
    # check-data reads no model: placeholders keep the required keys filled (model_path_problems skips "")
    base = {"data": {"datasets": [{"path": str(src)}]},
            "model": {k: "" for k in ("transformer", "text_encoder", "vae")}}
    return load_config(None, args.overrides, warn_paths=warn_paths, base=base, source=f"folder {src}")


def say(text: str) -> None:
    """print() on the main process only: under `accelerate launch` every process runs the command (RANK is set by
    the launcher), and each line would otherwise appear once per GPU."""
    import os

    if os.environ.get("RANK", "0") == "0":
        print(text, flush=True)
