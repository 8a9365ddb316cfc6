"""Bucketed training batches read from the cache, reproducible from a seed and resumable from a step.

API the trainer calls
---------------------
    loader = make_loader(manifest, resolution, batch_size, seed, start_step=0, num_steps=None,
                         num_workers=2, process_index=None, num_processes=None, drop_last=False)
    for batch in loader: ...          # one batch per training step (per process), from one bucket

    val = validation_batches(manifest, resolution, batch_size)   # list of batches, fixed order, no flip/dropout

Batch dict:
    latents      (B, 16, h, w) bfloat16   normalised VAE latents (bucket size / 8)
    text         (B, L, 12, D) bfloat16   tapped hidden states, padded to the longest caption in the batch
    text_mask    (B, L) bool              True on valid tokens (padding at the end)
    ids          list[str]                item ids ("<dataset index>:<relative path>")
    captions     list[str]                the caption used ("" when dropped)
    sample_seeds (B,) int64               fixed per image: seeds for validation noise / sigmas
    flipped, dropped (B,) bool
    bucket (w, h), step int, epoch int

Order: for epoch e the training items (each `repeats` times) are shuffled within their bucket from
Random(seed, resolution, e), cut into batches, and the batches shuffled. Global batch g = step * num_processes +
process_index, so `start_step` resumes exactly and each process of a DDP run sees different batches. Flip and
caption dropout are drawn per (g, position), so they do not depend on worker count or on resuming.
"""

from __future__ import annotations

import math
import random
from functools import lru_cache

import numpy as np
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset

from .cache import Manifest, entry_path


class BatchPlan:
    """Which items (and flip / dropout) make up global batch g. Pure bookkeeping: no tensors are read."""

    def __init__(self, manifest: Manifest, resolution: int, batch_size: int, seed: int, split: str = "train",
                 drop_last: bool = False):
        from ..errors import UserError

        self.manifest, self.resolution, self.batch_size, self.seed = manifest, int(resolution), int(batch_size), seed
        self.drop_last = drop_last
        res = str(self.resolution)
        if self.batch_size < 1:
            raise UserError(f"batch size {batch_size} must be >= 1")
        if self.resolution not in [int(r) for r in manifest.resolutions]:
            raise UserError(f"the cache has resolutions {manifest.resolutions}, not {resolution}; run "
                            "`krea2-train cache CONFIG` for the current stages")
        self.items = [i for i in manifest.items if i["split"] == split and res in i["latents"]]
        if not self.items:
            raise UserError(f"no {split} images at {resolution} px (all held out, or smaller than their bucket; see "
                            "check-data, data.allow_upscale, data.validation_images)")
        self.buckets: dict[tuple, list[int]] = {}
        for n, item in enumerate(self.items):
            self.buckets.setdefault(tuple(item["latents"][res]["bucket"]), []).extend([n] * int(item["repeats"]))
        per = [len(v) // batch_size if drop_last else math.ceil(len(v) / batch_size) for v in self.buckets.values()]
        self.batches_per_epoch = sum(per)
        if self.batches_per_epoch == 0:
            raise UserError(f"batch size {batch_size} is larger than every bucket at {resolution} px with "
                            "data.drop_last: true; lower the batch size or set data.drop_last: false")

    @lru_cache(maxsize=4)
    def epoch(self, e: int) -> list:
        rng = random.Random(f"{self.seed}:{self.resolution}:{e}")
        batches = []
        for bucket in sorted(self.buckets):
            members = list(self.buckets[bucket])
            rng.shuffle(members)
            for i in range(0, len(members), self.batch_size):
                chunk = members[i:i + self.batch_size]
                if len(chunk) == self.batch_size or not self.drop_last:
                    batches.append((bucket, chunk))
        rng.shuffle(batches)
        return batches

    def batch(self, g: int) -> dict:
        e, i = divmod(g, self.batches_per_epoch)
        bucket, members = self.epoch(e)[i]
        rng = random.Random(f"{self.seed}:sample:{self.resolution}:{g}")
        entries = []
        for n in members:
            item = self.items[n]
            flip = self.manifest.flip and rng.random() < 0.5
            dropped = rng.random() < float(item["caption_dropout"])
            entries.append((item, flip, dropped))
        return {"epoch": e, "bucket": bucket, "entries": entries}


@lru_cache(maxsize=64)
def _read_text(path: str) -> torch.Tensor:
    return load_file(path)["text"]


def _stack(tensors: list) -> torch.Tensor:
    """torch.stack through numpy: torch's small parallel ops stall for milliseconds when the cores are busy (OpenMP
    spin-waits), numpy's copies do not. bf16 travels as int16 bits."""
    dtype = tensors[0].dtype
    bits = torch.int16 if dtype == torch.bfloat16 else dtype
    return torch.from_numpy(np.stack([t.view(bits).numpy() for t in tensors])).view(dtype)


def pad_text(texts: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_i, 12, D) tensors -> (B, max L, 12, D) zero-padded at the end, and the (B, max L) bool mask."""
    longest = max(t.shape[0] for t in texts)
    dtype = texts[0].dtype
    bits = torch.int16 if dtype == torch.bfloat16 else dtype
    out = np.zeros((len(texts), longest, *texts[0].shape[1:]), dtype=texts[0].view(bits).numpy().dtype)
    mask = np.zeros((len(texts), longest), dtype=bool)
    for i, t in enumerate(texts):
        out[i, : t.shape[0]] = t.view(bits).numpy()
        mask[i, : t.shape[0]] = True
    return torch.from_numpy(out).view(dtype), torch.from_numpy(mask)


def read_batch(manifest: Manifest, resolution: int, entries: list, **extra) -> dict:
    """Load and collate the cached tensors for [(item, flip, dropped), ...]."""
    res, cache_dir = str(resolution), manifest.cache_dir
    latents, texts = [], []
    for item, flip, dropped in entries:
        lat = item["latents"][res]
        key = lat["flip_key"] if flip else lat["key"]
        latents.append(load_file(str(entry_path(cache_dir, "latents", key)))["latent"])
        tkey = manifest.empty_text if dropped else item["text"]
        texts.append(_read_text(str(entry_path(cache_dir, "text", tkey))))
    text, mask = pad_text(texts)
    return {
        "latents": _stack(latents),
        "text": text,
        "text_mask": mask,
        "ids": [e[0]["id"] for e in entries],
        "captions": ["" if e[2] else e[0]["caption"] for e in entries],
        "sample_seeds": torch.tensor([e[0]["sample_seed"] for e in entries], dtype=torch.int64),
        "flipped": torch.tensor([e[1] for e in entries], dtype=torch.bool),
        "dropped": torch.tensor([e[2] for e in entries], dtype=torch.bool),
        **extra,
    }


class CachedBatches(Dataset):
    """Map-style dataset indexed by training step: item `step` is this process's batch for that step."""

    def __init__(self, plan: BatchPlan, process_index: int = 0, num_processes: int = 1):
        self.plan, self.process_index, self.num_processes = plan, process_index, num_processes

    def __len__(self):  # nominal; the sampler decides how many steps are drawn
        return 2**62

    def __getitem__(self, step: int) -> dict:
        g = step * self.num_processes + self.process_index
        b = self.plan.batch(g)
        return read_batch(self.plan.manifest, self.plan.resolution, b["entries"], bucket=b["bucket"], step=step,
                          epoch=b["epoch"])


class _Steps(torch.utils.data.Sampler):
    def __init__(self, start: int, count):
        self.start, self.count = start, count

    def __iter__(self):
        stop = None if self.count is None else self.start + self.count
        step = self.start
        while stop is None or step < stop:
            yield step
            step += 1

    def __len__(self):
        if self.count is None:
            raise TypeError("infinite loader: pass num_steps for a length")
        return self.count


def make_loader(manifest: Manifest, resolution: int, batch_size: int, seed: int, start_step: int = 0,
                num_steps: int | None = None, num_workers: int = 2, process_index: int | None = None,
                num_processes: int | None = None, drop_last: bool = False, prefetch_factor: int = 4) -> DataLoader:
    """A DataLoader yielding this process's batches for steps start_step, start_step+1, ... (num_steps of them, or
    forever). Steps count per stage: pass the step within the current stage."""
    if process_index is None or num_processes is None:
        from .cache import _state

        state = _state()
        process_index, num_processes = state.process_index, state.num_processes
    plan = BatchPlan(manifest, resolution, batch_size, seed, "train", drop_last)
    dataset = CachedBatches(plan, process_index, num_processes)
    kwargs = dict(num_workers=num_workers, persistent_workers=False)
    if num_workers > 0:
        kwargs.update(prefetch_factor=prefetch_factor)
    return DataLoader(dataset, batch_size=None, sampler=_Steps(start_step, num_steps), **kwargs)


def validation_batches(manifest: Manifest, resolution: int, batch_size: int, max_samples: int | None = None) -> list:
    """Held-out images at `resolution`, in a fixed order (by id), grouped by bucket; no flip, no caption dropout.
    Use `sample_seeds` for fixed noise so validation losses are comparable across runs."""
    res = str(resolution)
    items = sorted((i for i in manifest.items if i["split"] == "validation" and res in i["latents"]),
                   key=lambda i: i["id"])[:max_samples]
    by_bucket: dict[tuple, list] = {}
    for item in items:
        by_bucket.setdefault(tuple(item["latents"][res]["bucket"]), []).append(item)
    out = []
    for bucket in sorted(by_bucket):
        group = by_bucket[bucket]
        for i in range(0, len(group), batch_size):
            entries = [(item, False, False) for item in group[i:i + batch_size]]
            out.append(read_batch(manifest, int(resolution), entries, bucket=bucket, step=-1, epoch=-1))
    return out
