#!/usr/bin/env python
"""Data pipeline benchmark: how fast the cache is read (what a GPU would wait on) and how fast it is made.

    python scripts/bench_data.py [--samples 256] [--batch 4] [--workers 2] [--text-dim 2560] [--seconds 5] [--threads 1]

1. Cached read rate at the 512 and 1024 px buckets (1:1 and 3:2), through `make_loader` (prefetch threads, and for
   comparison worker processes), from a
   warm page cache. Latents are (16, h/8, w/8) bf16 as cached; text entries have the real model's width by default
   (--text-dim 2560, 12 layers, 60-120 tokens), i.e. 1.5-3 MB per caption. Entries are written in the real cache
   format by the real writer; their values are random (reading does not care).
2. Naive baseline in the same run: decode the source JPEG, resize, crop and convert each sample every step (no VAE,
   no text encoder: already slower than reading the cache, before any model runs).
3. Caching rate on the tiny models (text captions/s, VAE images/s at 256 and 512 px) with `build_caches`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from krea2_train.data.buckets import apply, make_buckets, nearest_bucket, place  # noqa: E402
from krea2_train.data.cache import Manifest, _save_entry, entry_path  # noqa: E402
from krea2_train.data.loader import make_loader  # noqa: E402
from krea2_train.utils.io import write_json_atomic  # noqa: E402


def synthetic_cache(cache_dir: Path, n: int, resolutions, text_dim: int, seed=0) -> Manifest:
    rng = random.Random(seed)
    items = []
    empty = "0" * 32
    _save_entry(entry_path(cache_dir, "text", empty), "text", torch.zeros(1, 12, text_dim), {"key": empty})
    for k in range(n):
        tk = f"{k:032x}"
        length = rng.randint(60, 120)
        _save_entry(entry_path(cache_dir, "text", tk), "text", torch.randn(length, 12, text_dim), {"key": tk})
        lat = {}
        for r in resolutions:
            w, h = (r, r) if k % 2 == 0 else nearest_bucket(3, 2, make_buckets(r))
            lk = f"{r:08x}{k:024x}"
            _save_entry(entry_path(cache_dir, "latents", lk), "latent", torch.randn(16, h // 8, w // 8), {"key": lk})
            lat[str(r)] = {"bucket": [w, h], "resized": [w, h], "left": 0, "top": 0, "key": lk, "flip_key": None}
        items.append({"id": f"0:{k}", "name": f"{k}", "dataset": 0, "split": "train", "caption": "c", "text": tk,
                      "caption_dropout": 0.1, "repeats": 1, "sample_seed": k, "latents": lat})
    m = Manifest(str(cache_dir), list(resolutions), empty, items)
    write_json_atomic(cache_dir / "manifest.json", m.to_json())
    return m


def rate_loader(m, res, batch, workers, seconds, worker_type="thread") -> float:
    loader = make_loader(m, res, batch, seed=0, num_workers=workers, process_index=0, num_processes=1,
                         worker_type=worker_type)
    it = iter(loader)
    for _ in range(3):  # worker start-up and first reads are not the steady state
        next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += len(next(it)["ids"])
    return n / (time.perf_counter() - t0)


def rate_naive(src: Path, res, batch, seconds) -> float:
    files = sorted(src.glob("*.jpg"))
    n, t0, k = 0, time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        px = []
        for _ in range(batch):
            img = Image.open(files[k % len(files)]).convert("RGB")
            k += 1
            p = place(img.width, img.height, nearest_bucket(img.width, img.height, make_buckets(res)))
            px.append(torch.from_numpy(np.asarray(apply(img, p)).copy()).permute(2, 0, 1).float() / 127.5 - 1)
        if len({t.shape for t in px}) == 1:
            torch.stack(px)
        n += batch
    return n / (time.perf_counter() - t0)


def caching_rate(tmp: Path):
    from krea2_train.config.data import DataConfig, DatasetConfig
    from krea2_train.config.model import ModelConfig
    from krea2_train.data.cache import build_caches
    from krea2_train.models.tiny import make_tiny

    tiny = make_tiny(tmp / "tiny")
    ds = tmp / "ds"
    ds.mkdir()
    for k in range(8):
        Image.effect_noise((640, 640), 40 + k).convert("RGB").save(ds / f"{k}.jpg")
        (ds / f"{k}.txt").write_text(f"image number {k} with some noise and a caption of a few words")
    mc = ModelConfig(transformer="x", text_encoder=str(Path(tiny) / "text_encoder"), vae=str(Path(tiny) / "vae"))
    out = {}
    for res in (256, 512):
        cfg = DataConfig(datasets=[DatasetConfig(path=str(ds))], vae_batch_size=4)
        t0 = time.perf_counter()
        build_caches(cfg, mc, tmp / f"cache{res}", [res], progress=False)
        out[res] = 8 / (time.perf_counter() - t0)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--text-dim", type=int, default=2560)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--skip-caching", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steady numbers on a shared box)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {"cpu_count": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2)}
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (other processes slow every figure below)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        m = synthetic_cache(tmp / "cache", args.samples, (512, 1024), args.text_dim)
        src = tmp / "src"
        src.mkdir()
        for k in range(16):
            Image.effect_noise((1344, 1344) if k % 2 == 0 else (1600, 1067), 60).convert("RGB").save(
                src / f"{k}.jpg", quality=90)
        for res in (512, 1024):
            rate_loader(m, res, args.batch, args.workers, 1)  # warm the page cache
            cached = rate_loader(m, res, args.batch, args.workers, args.seconds)
            procs = rate_loader(m, res, args.batch, args.workers, args.seconds, "process")
            naive = rate_naive(src, res, args.batch, args.seconds)
            results[f"read_{res}"] = {"cached_samples_per_s": round(cached, 1), "cached_worker_processes_samples_per_s":
                                      round(procs, 1), "naive_decode_samples_per_s": round(naive, 1),
                                      "speedup": round(cached / naive, 1)}
            print(f"{res:5d} px  cached: {cached:7.1f} samples/s ({args.workers} threads; {procs:.1f} with worker "
                  f"processes; batch {args.batch}, text dim {args.text_dim})   naive decode+resize: {naive:5.1f} "
                  f"samples/s   cached is x{cached / naive:.0f} faster", flush=True)
        if not args.skip_caching:
            rates = caching_rate(tmp)
            for res, r in rates.items():
                print(f"caching on the tiny models at {res} px: {r:.2f} images/s (text + VAE, from cold)")
            results["caching_images_per_s"] = {str(k): round(v, 2) for k, v in rates.items()}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
