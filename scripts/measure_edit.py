"""Edit rate of an edit LoRA on the shipped micro Turbo ("make the shape red"; krea2_train/evaluate/edit.py).

    python scripts/measure_edit.py runs/edit_demo [--count 64] [--sheet edit_sheet.png]

Prints Turbo alone and Turbo + LoRA on `count` held-out references (seed evaluate.edit.SEED), and optionally writes
a labelled sheet (input, Turbo, Turbo + LoRA per reference). LORA: a run folder or an adapter / exported file.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def adapter_file(path: Path) -> Path:
    if path.is_dir():
        return path / "adapter" / "adapter_model.safetensors"
    return path


def main() -> None:
    from krea2_train.evaluate.edit import SEED, edit_rate, save_sheet
    from krea2_train.models.micro import load_micro

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("lora", type=Path)
    ap.add_argument("--count", type=int, default=64)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--strength", type=float, default=1.0)
    ap.add_argument("--method", choices=["index", "index_timestep_zero"], default=None,
                    help="reference method; default: train.reference_method of the run folder (needed for a file)")
    ap.add_argument("--sheet", type=Path, default=None)
    args = ap.parse_args()
    lora = adapter_file(args.lora)
    if not lora.exists():
        raise SystemExit(f"{lora} does not exist (train first: krea2-train configs/edit_demo.yaml)")
    method = args.method
    if method is None:
        if not (args.lora / "config.yaml").exists():
            raise SystemExit(f"{args.lora}: not a run folder, so its reference method is unknown; pass --method")
        from krea2_train.cli.sample import _trained_method

        method = _trained_method([args.lora])  # the method trained is the one a graph must run
    parts = load_micro("turbo")
    t0 = time.perf_counter()
    kw = dict(count=args.count, seed=args.seed, method=method, keep_images=args.sheet is not None)
    base = edit_rate(*parts, **kw)
    with_lora = edit_rate(*parts, lora=str(lora), strength=args.strength, **kw)
    if args.sheet is not None:
        save_sheet(base.pop("references")[:16], {"Turbo": base.pop("images")[:16],
                                                 f"Turbo + LoRA {args.strength:g}": with_lora.pop("images")[:16]},
                   args.sheet)
        with_lora.pop("references")
        print(f"sheet: {args.sheet}")
    print(json.dumps({"threads": torch.get_num_threads(), "lora": str(lora), "strength": args.strength,
                      "turbo": base, "turbo_lora": with_lora, "seconds": round(time.perf_counter() - t0, 1)},
                     indent=2))


if __name__ == "__main__":
    main()
