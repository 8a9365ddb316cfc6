"""Write datasets/edit_demo (the edit demo's training pairs) and datasets/edit_demo_held_out (preview inputs).

    python scripts/make_edit_demo_dataset.py [--pairs 48] [--out datasets]

Pairs come from the micro world (krea2_train/data/world.edit_pair, "make the shape red"), deterministic:
    edit_demo/pair_NN.png             the target (the same scene, the shape recoloured red)
    edit_demo/pair_NN.txt             the instruction
    edit_demo/reference/pair_NN.png   the input
    edit_demo_held_out/input_N.png    preview inputs from another seed (backgrounds differ), never trained on
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from krea2_train.data import world

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SEED = 17
HELD_OUT_SEED = 1017  # previews and evaluate/edit.py use seeds other than the training one
HELD_OUT = 2

README = """# Edit demo pairs (micro world, CC0)

Procedural pictures of the micro Krea 2's world (krea2_train/data/world.py), written by
`python scripts/make_edit_demo_dataset.py` (seed {seed}): {n} pairs of a reference (`reference/NAME.png`) and its
target (`NAME.png`), the same scene with the shape recoloured {colour}, instruction `NAME.txt` = "{instruction}".
No reference has a {colour} shape or a {colour} background. Drawn by code, so free of any rights (CC0).
`../edit_demo_held_out/` holds the preview inputs (seed {held}), not trained on.
"""


def held_out() -> list:
    """The first HELD_OUT pairs of HELD_OUT_SEED with backgrounds all different (so the previews show the background
    kept on more than one colour)."""
    chosen, i = [], 0
    while len(chosen) < HELD_OUT:
        pair = world.edit_pair(HELD_OUT_SEED, i)
        if all(pair.scene.background != c.scene.background for c in chosen):
            chosen.append(pair)
        i += 1
    return chosen


def write(out: Path, pairs: int) -> None:
    data, held = out / "edit_demo", out / "edit_demo_held_out"
    for d in (data, held):
        if d.exists():
            shutil.rmtree(d)
    (data / "reference").mkdir(parents=True)
    held.mkdir(parents=True)
    for i in range(pairs):
        p = world.edit_pair(TRAIN_SEED, i)
        name = f"pair_{i:02d}"
        p.target.save(data / f"{name}.png", optimize=True)
        p.reference.save(data / "reference" / f"{name}.png", optimize=True)
        (data / f"{name}.txt").write_text(p.instruction + "\n")
    for i, pair in enumerate(held_out()):
        pair.reference.save(held / f"input_{i}.png", optimize=True)
    (data / "README.md").write_text(README.format(seed=TRAIN_SEED, n=pairs, colour=world.EDIT_COLOUR,
                                                  instruction=world.EDIT_INSTRUCTION, held=HELD_OUT_SEED))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=48)
    ap.add_argument("--out", type=Path, default=ROOT / "datasets")
    args = ap.parse_args()
    write(args.out, args.pairs)
    print(f"wrote {args.pairs} pairs to {args.out / 'edit_demo'} and {HELD_OUT} inputs to "
          f"{args.out / 'edit_demo_held_out'}")


if __name__ == "__main__":
    main()
