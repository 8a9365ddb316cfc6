"""Print the micro Krea 2's figures: prompt following of Raw (28 steps, CFG) and Turbo (8 steps, no CFG) over 64
seeded `a {colour} {shape} on a {colour} background` prompts, and the seconds to sample one 128 px image on CPU.

    python scripts/measure_micro.py                  # the shipped model (manifest verified)
    python scripts/measure_micro.py --root DIR       # a folder in the shipped layout
    python scripts/measure_micro.py --grid out.png   # also save the sampled images as a labelled grid
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

TARGETS = {"raw": 0.80, "turbo": 0.75}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=None, help="model folder (default: the shipped micro model)")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--grid", default=None, help="write the Raw and Turbo samples to this PNG")
    p.add_argument("--style-folder", default="datasets/demo",
                   help="images whose VAE round trip is measured (style distance; '' to skip)")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from krea2_train.evaluate.prompt_following import measure_all

    figures = measure_all(args.root, count=args.prompts, seed=args.seed, verify=args.root is None,
                          keep_images=bool(args.grid), style_folder=args.style_folder or None)
    images = {v: figures[v].pop("images", None) for v in ("raw", "turbo")}
    print(json.dumps(figures, indent=2))
    for variant, target in TARGETS.items():
        got = figures[variant]["colour_accuracy"]
        print(f"{variant}: colour follows the prompt in {got:.0%} of {args.prompts} (target {target:.0%}) "
              f"{'ok' if got >= target else 'MISSED'}; {figures[variant]['seconds_per_image']:.2f} s per 128 px image")
    if args.grid:
        from krea2_train.evaluate.prompt_following import save_grid

        save_grid(images, figures["prompt_list"], args.grid)
        print(f"grid: {args.grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
