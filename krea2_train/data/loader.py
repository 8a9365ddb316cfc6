"""Bucketed training batches read from the cache, reproducible from a seed and resumable from a step.

API the trainer calls
---------------------
    loader = make_loader(manifest, resolution, batch_size, seed, start_step=0, num_steps=None,
                         num_workers=2, process_index=None, num_processes=None, drop_last=False,
                         worker_type="thread")   # or "process": torch DataLoader worker processes
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
    bucket       (w, h) tuple of pixel sides; step int (-1 in validation batches), epoch int

Order: for epoch e the training items (each `repeats` times) are shuffled within their bucket from
Random(seed, resolution, e), cut into batches, and the batches shuffled. Global batch g = step * num_processes +
process_index, so `start_step` resumes exactly and each process of a DDP run sees different batches. Flip and
caption dropout are drawn per (g, position), so they do not depend on worker count or on resuming.
"""

from __future__ import annotations

import json
import math
import random
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from krea2_train.data.cache import Manifest, entry_path


class BatchPlan:
    """Which items (and flip / dropout) make up global batch g. Pure bookkeeping: no tensors are read."""

    def __init__(self, manifest: Manifest, resolution: int, batch_size: int, seed: int, split: str = "train",
                 drop_last: bool = False):
        from krea2_train.errors import UserError

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

# Reading: one copy from the page cache straight into the batch tensor. A 1024 px latent is 0.5 MB and a real caption
# (100 tokens x 12 layers x 2560) is ~6 MB, so copies, not parsing, bound the rate: safetensors' load_file + stack +
# the DataLoader's move to shared memory would copy every byte three times. The format is 8 bytes of header length,
# a JSON header with each tensor's dtype, shape and byte offsets, then the raw little-endian data.
_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def _header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), 8 + n


@lru_cache(maxsize=1 << 16)  # entries are content-addressed: a path's header never changes meaning
def _tensor_info(path: str, name: str):
    try:
        header, base = _header(path)
        info = header[name]
    except (OSError, ValueError, KeyError) as exc:
        raise CacheReadError(f"cache entry {path} is missing or damaged ({exc}); run `krea2-train cache CONFIG` "
                             "to recompute it") from exc
    return _DTYPES[info["dtype"]], tuple(info["shape"]), base + info["data_offsets"][0], \
        info["data_offsets"][1] - info["data_offsets"][0]


def _read_into(path: str, offset: int, nbytes: int, out: torch.Tensor) -> None:
    view = memoryview(out.view(torch.uint8).numpy()).cast("B")
    if len(view) != nbytes:
        raise CacheReadError(f"cache entry {path} has {nbytes} bytes, expected {len(view)}; recompute the cache")
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        got = f.readinto(view)
    if got != nbytes:
        raise CacheReadError(f"cache entry {path} is truncated; run `krea2-train cache CONFIG` to recompute it")


def _empty(shape, dtype) -> torch.Tensor:
    """In a loader worker, allocate in shared memory (as default_collate does) so handing the batch to the training
    process copies nothing."""
    if torch.utils.data.get_worker_info() is not None:
        numel = int(np.prod(shape))
        storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(numel)
        return torch.empty(0, dtype=dtype).new(storage).view(shape)
    return torch.empty(shape, dtype=dtype)


class CacheReadError(RuntimeError):
    pass


def read_stack(paths: list, name: str) -> torch.Tensor:
    """Same-shape entries -> one (B, ...) tensor."""
    infos = [_tensor_info(p, name) for p in paths]
    dtype, shape = infos[0][0], infos[0][1]
    for p, info in zip(paths, infos):
        if info[1] != shape:
            raise CacheReadError(f"cache entry {p} has shape {info[1]}, expected {shape} (one bucket per batch)")
    out = _empty((len(paths), *shape), dtype)
    for i, (p, info) in enumerate(zip(paths, infos)):
        _read_into(p, info[2], info[3], out[i])
    return out


def read_padded(paths: list, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_i, ...) entries -> (B, max L, ...) zero-padded at the end, and the (B, max L) bool mask."""
    infos = [_tensor_info(p, name) for p in paths]
    dtype, rest = infos[0][0], infos[0][1][1:]
    longest = max(info[1][0] for info in infos)
    out = _empty((len(paths), longest, *rest), dtype)
    mask = torch.zeros(len(paths), longest, dtype=torch.bool)
    for i, (p, info) in enumerate(zip(paths, infos)):
        n = info[1][0]
        _read_into(p, info[2], info[3], out[i, :n])
        out[i, n:].view(torch.uint8).numpy().fill(0)  # numpy: no torch thread pool for small fills
        mask[i, :n] = True
    return out, mask


def read_batch(manifest: Manifest, resolution: int, entries: list, **extra) -> dict:
    """Load and collate the cached tensors for [(item, flip, dropped), ...]."""
    res, cache_dir = str(resolution), manifest.cache_dir
    lat_paths, text_paths = [], []
    for item, flip, dropped in entries:
        lat = item["latents"][res]
        lat_paths.append(str(entry_path(cache_dir, "latents", lat["flip_key"] if flip else lat["key"])))
        text_paths.append(str(entry_path(cache_dir, "text", manifest.empty_text if dropped else item["text"])))
    text, mask = read_padded(text_paths, "text")
    # a flipped target's references are flipped alike (data.flip with data.reference: reference_flip_keys)
    refs = [(e[0]["latents"][res].get("reference_flip_keys") if e[1] else e[0]["latents"][res].get("reference_keys"))
            or [] for e in entries]
    if any(refs):
        if len({len(r) for r in refs}) != 1:
            raise CacheReadError(f"batch mixes items with different reference counts: {[e[0]['id'] for e in entries]}")
        # per reference k: (B, 16, h, w) clean latents in the target's bucket (data.reference)
        extra = {"references": [read_stack([str(entry_path(cache_dir, "latents", r[k])) for r in refs], "latent")
                                for k in range(len(refs[0]))], **extra}
    return {
        "latents": read_stack(lat_paths, "latent"),
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


class ThreadLoader:
    """Prefetches batches with threads in the training process. Reading is file I/O and numpy copies, which release
    the GIL, and the batch never crosses a process boundary: with the real text width (6 MB per caption) worker
    processes spend their time page-faulting fresh shared memory for every batch (measured here: ~100 samples/s with 2
    processes vs ~800 with threads; scripts/bench_data.py)."""

    def __init__(self, dataset: "CachedBatches", sampler: "_Steps", num_workers: int, prefetch: int):
        self.dataset, self.sampler, self.num_workers, self.prefetch = dataset, sampler, num_workers, prefetch

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        steps = iter(self.sampler)
        pool = ThreadPoolExecutor(max_workers=self.num_workers, thread_name_prefix="krea2-data")
        pending = deque()
        try:
            for step in steps:
                pending.append(pool.submit(self.dataset.__getitem__, step))
                if len(pending) >= self.num_workers * self.prefetch:
                    break
            while pending:
                batch = pending.popleft().result()
                nxt = next(steps, None)
                if nxt is not None:
                    pending.append(pool.submit(self.dataset.__getitem__, nxt))
                yield batch
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


def make_loader(manifest: Manifest, resolution: int, batch_size: int, seed: int, start_step: int = 0,
                num_steps: int | None = None, num_workers: int = 2, process_index: int | None = None,
                num_processes: int | None = None, drop_last: bool = False, prefetch_factor: int = 2,
                worker_type: str = "thread"):
    """An iterable of this process's batches for steps start_step, start_step+1, ... (num_steps of them, or forever).
    Steps count per stage: pass the step within the current stage.

    worker_type "thread" (default; fastest, see ThreadLoader) or "process" (a torch DataLoader with worker
    processes). num_workers=0 reads in the calling thread. The batches are identical in every mode."""
    if process_index is None or num_processes is None:
        from krea2_train.data.cache import _state

        state = _state()
        process_index, num_processes = state.process_index, state.num_processes
    plan = BatchPlan(manifest, resolution, batch_size, seed, "train", drop_last)
    dataset = CachedBatches(plan, process_index, num_processes)
    sampler = _Steps(start_step, num_steps)
    if worker_type not in ("thread", "process"):
        raise ValueError(f"worker_type={worker_type!r}: use thread or process")
    if num_workers == 0:
        return _InThread(dataset, sampler)
    if worker_type == "thread":
        return ThreadLoader(dataset, sampler, num_workers, prefetch_factor)
    return DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=num_workers, collate_fn=_as_is,
                      prefetch_factor=prefetch_factor, persistent_workers=False)


def _as_is(batch):
    return batch  # batches are already collated; the default would turn the bucket tuple into a list


class _InThread:
    def __init__(self, dataset, sampler):
        self.dataset, self.sampler = dataset, sampler

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        return (self.dataset[step] for step in self.sampler)


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
            out.append(read_batch(manifest, int(resolution), entries, bucket=tuple(bucket), step=-1, epoch=-1))
    return out
