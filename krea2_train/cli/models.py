"""`krea2-train make-tiny DIR`: write the tiny embedded Krea 2 (used by tests and the demo)."""

from __future__ import annotations


def _make_tiny(args) -> int:
    from krea2_train.models.tiny import make_tiny

    out = make_tiny(args.dir, overwrite=args.overwrite)
    for p in sorted(out.iterdir()):
        print(p)
    return 0


def register(sub) -> None:
    p = sub.add_parser("make-tiny", help="write a tiny Krea 2 (Raw, Turbo, Qwen3-VL text encoder, VAE) in the real "
                       "on-disk formats, for tests and the demo")
    p.add_argument("dir", help="output folder")
    p.add_argument("--overwrite", action="store_true", help="rewrite even if the folder already has a tiny model")
    p.set_defaults(func=_make_tiny)
