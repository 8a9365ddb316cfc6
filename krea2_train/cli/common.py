"""What the subcommand modules share."""

from __future__ import annotations

import argparse


def add_config_command(sub, name: str, help: str, func, overrides_help: str = "key=value overrides, e.g. "
                       "lora.rank=32 train.stages.0.steps=500") -> argparse.ArgumentParser:
    """A subcommand that takes a run config YAML plus key=value overrides (the areas add their own flags)."""
    p = sub.add_parser(name, help=help)
    p.add_argument("config", help="run config YAML (see configs/)")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.set_defaults(func=func)
    return p
