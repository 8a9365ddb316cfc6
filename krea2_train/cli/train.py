"""`krea2-train run CONFIG` (also the bare `krea2-train CONFIG`), `krea2-train train CONFIG`, `config` and
`estimate` (peak GPU memory per stage, estimate/)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def _config(args):
    from krea2_train.cli.common import load_run_config

    # the commands here check the model paths themselves (and stop): a warning first would say it twice
    return load_run_config(args, warn_paths=False)


def config_problems(cfg) -> list[str]:
    """Every path the config names that is not there (model files, then datasets), one message each."""
    from krea2_train.models.paths import model_path_problems

    problems = model_path_problems(cfg)
    for i, ds in enumerate(cfg.data.datasets):
        p = Path(os.path.expanduser(ds.path))
        if not p.exists():
            problems.append(f"config key `data.datasets.{i}.path`: dataset folder not found: {p}. Fix the path "
                            f"(relative paths start at {Path.cwd()}).")
    return problems


def run(args) -> int:
    from krea2_train.pipeline import run_all

    return run_all(_config(args))


def train(args) -> int:
    from krea2_train.models.tiny import ensure_tiny
    from krea2_train.pipeline import init_distributed
    from krea2_train.train.trainer import Trainer

    cfg = _config(args)
    init_distributed()
    ensure_tiny(cfg)
    trainer = Trainer(cfg)  # its objective's source: the data caches, or a slider's prompts (train.mode)
    result = trainer.run()
    if not result.interrupted and trainer.acc.is_main_process:
        print(f"trained {result.step} steps; adapter: {result.adapter_dir} (export with `krea2-train CONFIG`, "
              "which skips the finished training)")
    return 130 if result.interrupted else 0


def show_config(args) -> int:
    """Check a config without doing any work and print it fully resolved (every default filled in)."""
    from krea2_train.config import to_yaml

    cfg = _config(args)
    print(to_yaml(cfg), end="")
    problems = config_problems(cfg)
    if problems:  # `config` is how people check a config: a missing file is not "ok"
        print(f"# NOT ok: {len(problems)} missing or wrong path(s):")
        for problem in problems:
            print(f"#   {problem}")
        return 1
    print(f"# ok: {cfg.total_steps} steps in {len(cfg.train.stages)} stage(s) -> {cfg.run_dir}")
    return 0


def page(args) -> int:
    from krea2_train.errors import UserError
    from krea2_train.runpage import write_run_page

    run = Path(args.run).expanduser()
    if not (run / "config.yaml").exists():
        raise UserError(f"{run} is not a training run folder (no config.yaml); give runs/NAME")
    print(write_run_page(run))
    return 0


def estimate(args) -> int:
    from krea2_train.estimate.command import estimate_command

    return estimate_command(args)


def register(sub) -> None:
    from krea2_train.cli.common import add_config_command

    add_config_command(sub, "run", "the whole job: check-data, cache, train, export, verify (each skipped when "
                       "already done)", run)
    add_config_command(sub, "train", "train the LoRA only (caches are built first if missing); resumes from the "
                       "latest checkpoint", train)
    add_config_command(sub, "config", "check a run config, including that every model and dataset path exists "
                       "(no work done; exit 1 naming each missing path), and print it with every default filled in",
                       show_config)
    p = sub.add_parser("page", help="write RUN/index.html: the run's settings, curves, previews, data report, "
                       "verification and exports on one page that opens from disk (the whole job writes it too)")
    p.add_argument("run", help="training run folder (runs/NAME)")
    p.set_defaults(func=page)
    p = add_config_command(sub, "estimate", "estimate the peak GPU memory of each training stage, on the CPU, before "
                           "any download (which card the config needs)", estimate)
    p.add_argument("--gpus", type=int, default=1, help="processes (GPUs); with FSDP the figures are per GPU (default 1)")
    p.add_argument("--fsdp", action="store_true", help="estimate FSDP sharding (as train.fsdp: true)")
    p.add_argument("--card", type=float, default=None,
                   help="GPU memory in GB to check against (default: the memory preset's size, else 24)")
    p.add_argument("--caption-tokens", type=int, default=128,
                   help="valid caption tokens per image (of the 512-token text; default 128)")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests: the tiny architecture
