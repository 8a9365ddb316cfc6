"""`krea2-train`: the whole job from one config, or each step as a subcommand.

    krea2-train CONFIG [key=value ...]      check-data -> cache -> train -> export -> verify
    krea2-train SUBCOMMAND ...              see `krea2-train --help`

Each area registers its own subcommands (cli/models.py, data.py, train.py, export.py, sample.py); this file only
wires them together. `python -m krea2_train.cli` is the same command (what `accelerate launch -m` runs).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="krea2-train", description="LoRA fine-tuning for Krea 2: train on Raw, "
                                     "deploy on Turbo. `krea2-train CONFIG.yaml` runs the whole job.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from krea2_train.cli import data, export, models, sample, train

    for area in (models, data, train, export, sample):  # pipeline order; each module has `register(subparsers)`
        area.register(sub)
    return parser


def setup_logging() -> None:
    """INFO to stderr on the main process only: under `accelerate launch` every process runs the same code and would
    print each line once per GPU (RANK is set by the launcher; errors still show on every process)."""
    import warnings

    main_process = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(level=os.environ.get("KREA2_LOG", "INFO") if main_process else "ERROR",
                        format="%(levelname)s %(name)s: %(message)s")
    # accelerate logs a line per file of its own; PIL/matplotlib/http clients are chatty at INFO
    for noisy in ("httpx", "urllib3", "PIL", "matplotlib", "bitsandbytes", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not main_process:
        warnings.simplefilter("ignore")  # the main process shows each Python warning once


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging()
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
    from krea2_train.errors import UserError

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
