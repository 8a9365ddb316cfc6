"""`krea2-train`: the whole job from one config, or each step as a subcommand.

    krea2-train CONFIG [key=value ...]      check-data -> cache -> train -> export -> verify
    krea2-train SUBCOMMAND ...              see `krea2-train --help`

Each area registers its own subcommands (one module per concern); this file only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# Areas that contribute subcommands, in pipeline order. Each module has `register(subparsers)`.
_AREAS = ["krea2_train.models.cli", "krea2_train.data.cli", "krea2_train.train.cli", "krea2_train.export.cli",
          "krea2_train.inference_cli"]


def add_config_command(sub, name: str, help: str, func, overrides_help: str = "key=value overrides, e.g. "
                       "lora.rank=32 train.stages.0.steps=500") -> argparse.ArgumentParser:
    """A subcommand that takes a run config YAML plus key=value overrides (the areas add their own flags)."""
    p = sub.add_parser(name, help=help)
    p.add_argument("config", help="run config YAML (see configs/)")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="krea2-train", description="LoRA fine-tuning for Krea 2: train on Raw, "
                                     "deploy on Turbo. `krea2-train CONFIG.yaml` runs the whole job.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for area in _AREAS:
        try:
            module = importlib.import_module(area)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("krea2_train"):
                logging.getLogger(__name__).warning("commands of %s unavailable: %s", area, exc)
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=os.environ.get("KREA2_LOG", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    # bitsandbytes warns at import about optional CPU kernels a LoRA run never uses
    for noisy in ("httpx", "urllib3", "PIL", "matplotlib", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if argv and argv[0].endswith((".yaml", ".yml")):
        argv = ["run", *argv]  # the bare config form runs the whole job
    parser = build_parser()
    # `key=value` overrides may follow flags (`estimate CFG --gpus 2 memory.preset=24gb`): argparse leaves those
    # unparsed, so they join the command's overrides; anything else is still an error
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            parser.parse_args(argv)  # the usual argparse error and exit
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .errors import UserError

    try:
        result = args.func(args)
    except UserError as exc:
        if os.environ.get("RANK", "0") == "0":  # under accelerate launch every process fails alike: say it once
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
