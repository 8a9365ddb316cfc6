"""On-disk text and latent caches, and the manifest the loader reads.

API the trainer calls
---------------------
    scan = scan_data(data_cfg, resolutions, cache_dir)               # krea2_train.data.checks (validation + buckets)
    manifest = build_caches(data_cfg, model_cfg, cache_dir, resolutions, scan=scan)   # -> Manifest
    # The text encoder and VAE are loaded only when something is missing and released before this returns.

Layout (all safetensors, bf16, each written atomically; content-addressed so entries are shared across runs/configs)
    <cache_dir>/text/<k[:2]>/<k>.safetensors      {"text": (L, 12, D)}  valid tokens only; header: caption, length
    <cache_dir>/latents/<k[:2]>/<k>.safetensors   {"latent": (16, h/8, w/8)} normalised; header: image, bucket, crop
    <cache_dir>/manifests/<digest>.json           one per (data, resolutions, encoders); <cache_dir>/manifest.json
                                                  is a copy of the latest
    <cache_dir>/scan_index.json                   image hash -> size, so re-checks skip decoding known images

Keys: a text key hashes (caption, text-encoder fingerprint); a latent key hashes (image bytes sha256, bucket, resize,
crop box, flip, alpha background, VAE fingerprint). A reference latent (data.reference) is keyed the same way by its
own bytes, whichever source gave it (a reference folder, a metadata.jsonl path, a dataset's image column). The
fingerprints cover the model files (names, sizes, mtimes), dtype and encoder settings, so anything that changes a
tensor changes its key; a changed entry is simply a new file and stale ones are never read. An entry whose file is
missing, truncated or for another key is (re)computed.

A killed run leaves only whole files (atomic rename) and resumes where it stopped. Under `accelerate launch` each
process of every machine encodes a disjoint share (round robin by global rank over the sorted missing keys, which
the main process lists); the main process writes the manifest.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from krea2_train import facts
from krea2_train.config.data import DataConfig
from krea2_train.data.buckets import Placement, apply
from krea2_train.data.checks import Item, Scan, scan_data
from krea2_train.data.images import ImageProblem, open_image, parse_colour
from krea2_train.utils.io import save_safetensors_atomic, write_json_atomic

log = logging.getLogger(__name__)

CACHE_VERSION = 1
RESIZE_FILTER = "lanczos-rg3"  # part of the latent key: a different resize gives different pixels


class CacheError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------ keys and paths
def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:32]


def resolve_encoder_dtype(name: str, device) -> str:
    if name == "auto":
        return "bfloat16" if torch.device(device).type == "cuda" else "float32"
    return name


def text_fingerprint(text_encoder_path, dtype: str) -> str:
    """Identifies everything that shapes a text embedding, without loading the model."""
    from krea2_train.models.text_encoder import files_fingerprint

    return _sha({"v": CACHE_VERSION, "files": files_fingerprint(os.path.expanduser(str(text_encoder_path))),
                 "dtype": dtype, "taps": list(facts.TEXT_TAP_LAYERS), "prefix": facts.PROMPT_PREFIX,
                 "suffix": facts.PROMPT_SUFFIX, "max": facts.MAX_PROMPT_TOKENS})


def vae_fingerprint(vae_path, dtype: str) -> str:
    from krea2_train.models.text_encoder import files_fingerprint

    return _sha({"v": CACHE_VERSION, "files": files_fingerprint(os.path.expanduser(str(vae_path))), "dtype": dtype,
                 "posterior": "mode", "normalised": True})


def text_key(caption: str, text_fp: str) -> str:
    return _sha({"caption": caption, "enc": text_fp})


def latent_key(image_sha: str, placement: Placement, flip: bool, background, vae_fp: str) -> str:
    return _sha({"image": image_sha, **placement.as_dict(), "flip": bool(flip), "bg": list(background),
                 "resize": RESIZE_FILTER, "enc": vae_fp})


def entry_path(cache_dir, kind: str, key: str) -> Path:
    return Path(cache_dir) / kind / key[:2] / f"{key}.safetensors"


def entry_valid(path: Path, key: str) -> bool:
    """The file exists, its header parses (not truncated) and it is the entry for `key`."""
    from safetensors import safe_open

    try:
        # safe_open rejects a file whose data does not cover what the header declares (truncated).
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("key") == key
    except Exception:
        return False


def _save_entry(path: Path, name: str, tensor: torch.Tensor, meta: dict) -> None:
    tensor = tensor.to(torch.bfloat16).contiguous()
    meta = {k: str(v) for k, v in meta.items()}
    save_safetensors_atomic({name: tensor}, path, metadata=meta)


# ------------------------------------------------------------------------------------------------ manifest
@dataclass
class Manifest:
    """What the loader needs: per item its caption's text key and, per resolution, its bucket and latent keys."""
    cache_dir: str
    resolutions: list
    empty_text: str                  # text key of "" (caption dropout)
    items: list                      # list of dicts, see build_caches
    flip: bool = False
    text_fingerprint: str = ""
    vae_fingerprint: str = ""
    path: Optional[str] = None
    problems: list = field(default_factory=list)  # items dropped while caching (file changed, decode failed)

    def to_json(self) -> dict:
        return {"version": CACHE_VERSION, "resolutions": self.resolutions, "empty_text": self.empty_text,
                "items": self.items, "flip": self.flip, "text_fingerprint": self.text_fingerprint,
                "vae_fingerprint": self.vae_fingerprint}

    @classmethod
    def load(cls, path, cache_dir=None) -> "Manifest":
        data = json.loads(Path(path).read_text())
        if data.get("version") != CACHE_VERSION:
            raise CacheError(f"{path}: cache manifest version {data.get('version')} is not {CACHE_VERSION}; run "
                             "`krea2-train cache CONFIG` again")
        data.pop("version")
        if cache_dir is None:  # <cache_dir>/manifest.json or <cache_dir>/manifests/<digest>.json
            parent = Path(path).resolve().parent
            cache_dir = parent.parent if parent.name == "manifests" else parent
        return cls(cache_dir=str(cache_dir), path=str(path), **data)

    def split(self, name: str) -> list:
        return [i for i in self.items if i["split"] == name]

    def text_path(self, key: str) -> Path:
        return entry_path(self.cache_dir, "text", key)

    def latent_path(self, key: str) -> Path:
        return entry_path(self.cache_dir, "latents", key)


# ------------------------------------------------------------------------------------------------ building
def _state():
    from krea2_train.runtime.distributed import process_state

    # Launched with several processes on a machine without GPUs: accelerate only sets up the (gloo) process group
    # when asked for CPU explicitly. An already initialised state (the trainer's Accelerator) is returned as is.
    return process_state()


def _release():
    """Free what the caller just dropped: the encoders must not stay resident next to the transformer."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _plan(scan: Scan, data_cfg: DataConfig, text_fp: str, vae_fp: str, background) -> tuple[dict, list, list]:
    """captions: key -> caption; latent jobs: (item, res, placement, [(key, flip)...]); manifest items."""
    captions = {text_key("", text_fp): ""}
    jobs, items = [], []
    for item in scan.items:
        tk = text_key(item.caption, text_fp)
        captions[tk] = item.caption
        per_res = {}
        for r, placement in sorted(item.placements.items()):
            variants = [(latent_key(item.sha256, placement, False, background, vae_fp), False)]
            if data_cfg.flip:
                variants.append((latent_key(item.sha256, placement, True, background, vae_fp), True))
            jobs.append((item, r, placement, variants))
            per_res[str(r)] = {**placement.as_dict(), "key": variants[0][0],
                               "flip_key": variants[1][0] if data_cfg.flip else None}
            if item.references:  # each its own latent entry, content-keyed like a target's, same bucket
                keys, flip_keys = [], []
                for ref in item.references:
                    ref_variants = [(latent_key(ref.sha256, ref.placements[r], False, background, vae_fp), False)]
                    if data_cfg.flip:  # a flipped target trains with its references flipped alike
                        ref_variants.append((latent_key(ref.sha256, ref.placements[r], True, background, vae_fp),
                                             True))
                    jobs.append((ref, r, ref.placements[r], ref_variants))
                    keys.append(ref_variants[0][0])
                    flip_keys.append(ref_variants[1][0] if data_cfg.flip else None)
                per_res[str(r)]["reference_keys"] = keys
                if data_cfg.flip:
                    per_res[str(r)]["reference_flip_keys"] = flip_keys
        items.append({"id": item.id, "name": item.name, "dataset": item.dataset, "split": item.split,
                      "caption": item.caption, "text": tk, "caption_dropout": item.caption_dropout,
                      "repeats": item.repeats, "sample_seed": int(hashlib.sha256(item.id.encode()).hexdigest()[:8], 16),
                      "latents": per_res})
    return captions, jobs, items


def _pixels(item: Item, placement: Placement, max_pixels: int, background) -> torch.Tensor:
    import numpy as np

    img = open_image(item.record.read_bytes(), item.name, max_pixels=max_pixels, background=background)
    if (img.width, img.height) != (item.width, item.height):
        raise ImageProblem("changed", f"{item.name}: image changed since it was checked; run check-data again")
    img = apply(img, placement)
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return arr / 127.5 - 1.0


def build_caches(data_cfg: DataConfig, model_cfg, cache_dir, resolutions, scan: Scan | None = None,
                 progress: bool = True, text_encoder=None, vae=None, device=None) -> Manifest:
    """Make every text and latent entry the data needs at `resolutions`; return (and write) the manifest.

    `text_encoder` / `vae` may be passed already loaded (objects with `.encode`, as krea2_train.models.text_encoder
    .TextEncoder and .vae.VAE); otherwise they are loaded from `model_cfg` only if some entry is missing.
    """
    from tqdm.auto import tqdm

    cache_dir = Path(os.path.expanduser(str(cache_dir)))
    state = _state()
    device = device or state.device
    resolutions = sorted({int(r) for r in resolutions})
    if scan is None:
        scan = scan_data(data_cfg, resolutions, cache_dir if state.is_main_process else None, progress=progress)
    if scan.fatal:
        from krea2_train.errors import UserError

        raise UserError("the data has fatal problems; run `krea2-train check-data CONFIG`:\n" +
                        "\n".join(p.message for p in scan.problems if p.severity == "fatal"))
    missing_res = [r for r in resolutions if r not in scan.resolutions]
    if missing_res:
        raise ValueError(f"scan was made for {scan.resolutions}, not {missing_res}")
    dtype = resolve_encoder_dtype(data_cfg.encoder_dtype, device)
    background = parse_colour(data_cfg.background)
    text_fp = text_fingerprint(model_cfg.text_encoder, dtype)
    vae_fp = vae_fingerprint(model_cfg.vae, dtype)
    captions, jobs, items = _plan(scan, data_cfg, text_fp, vae_fp, background)
    show = progress and state.is_local_main_process

    # What is missing, decided before any writes (else a fast process's new files would change another's list and
    # the round-robin shares would overlap or leave gaps), and by the main process alone: machines sharing the cache
    # over a network file system may briefly see different files, and then two would write one entry.
    text_todo = latent_keys = None
    if state.is_main_process:
        text_todo = sorted(k for k in captions if not entry_valid(entry_path(cache_dir, "text", k), k))
        latent_keys = sorted({j[3][0][0] for j in jobs
                             if not all(entry_valid(entry_path(cache_dir, "latents", k), k) for k, _ in j[3])})
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        text_todo, latent_keys = broadcast_object_list([text_todo, latent_keys])
    by_key = {j[3][0][0]: j for j in jobs}
    latent_todo = [by_key[k] for k in latent_keys]

    # ---- text
    todo = text_todo
    mine = todo[state.process_index::state.num_processes]
    if todo:
        log.info("text cache: %d of %d captions to encode (%d on this process)", len(todo), len(captions), len(mine))
    if mine:
        owned = text_encoder is None
        if owned:
            from krea2_train.models.text_encoder import TextEncoder

            text_encoder = TextEncoder.from_path(model_cfg.text_encoder, dtype=dtype, device=device,
                                                 tokenizer=getattr(model_cfg, "tokenizer", None))
        mine.sort(key=lambda k: len(captions[k]))  # similar lengths together: less padding
        bs = max(1, data_cfg.text_batch_size)
        with tqdm(total=len(mine), desc="caching text", unit="caption", disable=not show) as bar:
            for i in range(0, len(mine), bs):
                keys = mine[i:i + bs]
                embeds, mask = text_encoder.encode([captions[k] for k in keys])
                for j, k in enumerate(keys):
                    t = embeds[j][mask[j]].cpu()
                    _save_entry(entry_path(cache_dir, "text", k), "text", t,
                                {"key": k, "caption": captions[k], "length": t.shape[0], "encoder": text_fp})
                bar.update(len(keys))
        text_encoder = None
        if owned:
            _release()

    # ---- latents
    todo = latent_todo
    mine = todo[state.process_index::state.num_processes]
    if todo:
        log.info("latent cache: %d of %d image crops to encode (%d on this process)", len(todo), len(jobs), len(mine))
    failed: dict[str, str] = {}
    if mine:
        owned = vae is None
        if owned:
            from krea2_train.models.vae import VAE

            vae = VAE.from_path(model_cfg.vae, dtype=dtype, device=device)
        mine.sort(key=lambda j: (j[2].bucket, j[3][0][0]))  # batches from one bucket
        batches, cur = [], []
        for job in mine:
            if cur and (job[2].bucket != cur[0][2].bucket or len(cur) >= max(1, data_cfg.vae_batch_size)):
                batches.append(cur)
                cur = []
            cur.append(job)
        if cur:
            batches.append(cur)

        def load(batch):
            out = []
            for item, r, placement, variants in batch:
                try:
                    out.append(_pixels(item, placement, data_cfg.max_image_pixels, background))
                except (ImageProblem, OSError) as exc:
                    out.append(exc)
            return out

        with ThreadPoolExecutor(max_workers=2) as pool, \
                tqdm(total=len(mine), desc="caching latents", unit="img", disable=not show) as bar:
            for batch, pixels in zip(batches, pool.map(load, batches)):  # decode the next batch while encoding
                ok = [(job, px) for job, px in zip(batch, pixels) if not isinstance(px, Exception)]
                for job, px in zip(batch, pixels):
                    if isinstance(px, Exception):
                        failed[job[0].id] = str(px)
                        log.warning("skipping %s", px)
                if ok:
                    x = torch.stack([px for _, px in ok])
                    flips = [(n, k) for n, (job, _) in enumerate(ok) for k, f in job[3] if f]
                    if flips:  # flipped variants ride in the same batch
                        x = torch.cat([x, torch.stack([x[n].flip(-1) for n, _ in flips])])
                    z = vae.encode(x).cpu()
                    for n, (job, _) in enumerate(ok):
                        item, r, placement, variants = job
                        _save_entry(entry_path(cache_dir, "latents", variants[0][0]), "latent", z[n],
                                    {"key": variants[0][0], "image": item.name, "sha256": item.sha256,
                                     "placement": json.dumps(placement.as_dict()), "flip": False, "encoder": vae_fp})
                    for m, (n, k) in enumerate(flips):
                        item, r, placement, variants = ok[n][0]
                        _save_entry(entry_path(cache_dir, "latents", k), "latent", z[len(ok) + m],
                                    {"key": k, "image": item.name, "sha256": item.sha256,
                                     "placement": json.dumps(placement.as_dict()), "flip": True, "encoder": vae_fp})
                bar.update(len(batch))
        vae = None
        if owned:
            _release()

    # ---- manifest: every process derives it from the same plan and every process's failures (not from what its
    # machine sees on disk yet: another machine's new files may show up late on a network file system)
    state.wait_for_everyone()
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        failed = {k: v for part in gather_object([failed]) for k, v in part.items()}
    encoded = {k for j in latent_todo for k, _ in j[3]}
    kept, problems = [], []
    for entry in items:
        if entry["id"] in failed:
            problems.append(failed[entry["id"]])
            continue
        missing = [r for r, lat in entry["latents"].items()
                   if any(k and k not in encoded and not entry_path(cache_dir, "latents", k).exists()
                          for k in (lat["key"], lat["flip_key"], *lat.get("reference_keys", ()),
                                    *lat.get("reference_flip_keys", ())))]
        if missing:
            problems.append(f"{entry['name']}: latents for {missing} px could not be made (see the log); skipped")
            continue
        kept.append(entry)
    manifest = Manifest(cache_dir=str(cache_dir), resolutions=resolutions, empty_text=text_key("", text_fp),
                        items=kept, flip=data_cfg.flip, text_fingerprint=text_fp, vae_fingerprint=vae_fp,
                        problems=problems)
    body = manifest.to_json()
    digest = _sha(body)[:16]
    manifest.path = str(cache_dir / "manifests" / f"{digest}.json")
    if state.is_main_process:
        write_json_atomic(manifest.path, body)
        write_json_atomic(cache_dir / "manifest.json", body)
    state.wait_for_everyone()
    for p in problems:
        log.warning(p)
    return manifest


def manifest_if_ready(data_cfg: DataConfig, model_cfg, cache_dir, resolutions, scan: Scan, device="cpu"
                      ) -> Optional[Manifest]:
    """The manifest when every entry already exists (nothing to encode, no model loaded), else None.

    The same check build_caches starts with; this lets a pipeline say "cache up to date, skipped"."""
    cache_dir = Path(os.path.expanduser(str(cache_dir)))
    resolutions = sorted({int(r) for r in resolutions})
    dtype = resolve_encoder_dtype(data_cfg.encoder_dtype, device)
    background = parse_colour(data_cfg.background)
    text_fp, vae_fp = text_fingerprint(model_cfg.text_encoder, dtype), vae_fingerprint(model_cfg.vae, dtype)
    captions, jobs, items = _plan(scan, data_cfg, text_fp, vae_fp, background)
    if any(not entry_valid(entry_path(cache_dir, "text", k), k) for k in captions):
        return None
    if any(not entry_valid(entry_path(cache_dir, "latents", k), k) for j in jobs for k, _ in j[3]):
        return None
    manifest = Manifest(str(cache_dir), resolutions, text_key("", text_fp), items, data_cfg.flip, text_fp, vae_fp)
    path = cache_dir / "manifests" / f"{_sha(manifest.to_json())[:16]}.json"
    if not path.exists():
        write_json_atomic(path, manifest.to_json())
    manifest.path = str(path)
    return manifest


def prune_cache(cache_dir, dry_run: bool = False) -> tuple[int, int]:
    """Delete entries no manifest in <cache_dir>/manifests refers to (left by changed captions, images, models or
    settings). Returns (files, bytes) removed. Run it when no caching or training uses the cache."""
    cache_dir = Path(os.path.expanduser(str(cache_dir)))
    keep = set()
    for path in (cache_dir / "manifests").glob("*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        keep.add(data.get("empty_text"))
        for item in data.get("items", []):
            keep.add(item["text"])
            for lat in item["latents"].values():
                keep.update({lat["key"], lat["flip_key"], *lat.get("reference_keys", ()),
                             *lat.get("reference_flip_keys", ())})
    files = nbytes = 0
    for kind in ("text", "latents"):
        for path in (cache_dir / kind).glob("*/*.safetensors"):
            if path.stem not in keep:
                files += 1
                nbytes += path.stat().st_size
                if not dry_run:
                    path.unlink(missing_ok=True)
    return files, nbytes
