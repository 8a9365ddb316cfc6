"""Pretrain the micro Krea 2 on the procedural world and ship it (krea2_train/models/micro_weights/).

    python scripts/pretrain_micro.py                 # the full run (about 2 hours, 1 thread, on a busy 2-core CPU), resumable
    python scripts/pretrain_micro.py --smoke         # a few steps of every stage, into a scratch folder

Stages and their results live under --work; rerunning skips what is done and resumes the stage in progress from its
last checkpoint. With --ship (default for the full run) the result is copied into the package, measured
(scripts/measure_micro.py's figures) and the manifest written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/micro_pretrain", help="stage results and checkpoints")
    p.add_argument("--smoke", action="store_true", help="a few steps of each stage (checks the pipeline)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 leaves the other core free)")
    p.add_argument("--no-ship", action="store_true", help="do not copy into the package / measure / write manifest")
    p.add_argument("--out", default=None, help="shipped folder (default: the package's micro_weights)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--note", default=None, help="free text kept in the manifest (how this build was run)")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from krea2_train.models import micro
    from krea2_train.train.micro_pretrain import PretrainSettings, pretrain

    kw = {"seed": args.seed} if args.seed is not None else {}
    settings = PretrainSettings.smoke(**kw) if args.smoke else PretrainSettings(**kw)
    t0 = time.perf_counter()
    timings = pretrain(args.work, settings)
    print("pretraining stage seconds:", json.dumps({k: round(v, 1) for k, v in timings.items()}))
    if args.no_ship:
        return 0
    from krea2_train.evaluate.prompt_following import measure_all

    out = micro.assemble(args.work, args.out)
    posters = Path(__file__).resolve().parents[1] / "datasets" / "demo"
    figures = measure_all(out, style_folder=posters if posters.is_dir() else None)
    info = {
        "name": "micro",
        "command": "python scripts/pretrain_micro.py" + (" --smoke" if args.smoke else "")
                   + (f" --seed {args.seed}" if args.seed is not None else ""),
        "seed": settings.seed,
        "settings": settings.__dict__,
        "pretrain_seconds": {k: round(v, 1) for k, v in timings.items()},
        "threads": args.threads,
        **({"note": args.note} if args.note else {}),
        "figures": figures,
        "architecture": {"transformer": micro.MICRO_TRANSFORMER, "text": micro.MICRO_TEXT, "vae": micro.MICRO_VAE},
    }
    manifest = micro.write_manifest(out, info)
    print(json.dumps({"figures": figures, "total_bytes": manifest["total_bytes"]}, indent=2))
    print(f"shipped to {out} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
