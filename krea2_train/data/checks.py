"""check-data: read every configured dataset, validate every image and caption, assign buckets.

`scan_data(data_cfg, resolutions)` returns a `Scan`: the usable `Item`s (with final captions, sizes, content hashes,
bucket placements per resolution and the train/validation split) and every `Problem` found, per file. Training uses
the same scan, so a bad file is reported and skipped, never a crash on file 9,000 of 10,000.

Severity: fatal (nothing can train: missing folder, empty dataset) -> non-zero exit; error (file skipped); warning
(used with a fix-up, e.g. default caption); info.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from krea2_train import facts
from krea2_train.config.data import DataConfig, validate_data_config
from krea2_train.data.buckets import make_buckets, nearest_bucket, needs_upscale, place
from krea2_train.data.images import ImageProblem, open_image, parse_colour
from krea2_train.data.sources import SEVERITIES, Problem, Record, load_records

SCAN_VERSION = 1


@dataclass
class Item:
    id: str                       # "<dataset index>:<key>", stable across runs
    dataset: int
    name: str                     # file path (or dataset[row]) for messages
    sha256: str                   # of the image bytes
    width: int                    # after EXIF orientation
    height: int
    caption: str                  # final caption: trigger word added, default applied
    caption_dropout: float
    repeats: int
    split: str = "train"          # or "validation"
    placements: dict = field(default_factory=dict)  # resolution -> Placement (absent: skipped at that resolution)
    record: Optional[Record] = field(default=None, repr=False, compare=False)
    # data.reference: the reference images in data.reference_folders order, each an Item whose placements put it
    # into this item's buckets (its own resize and crop, the target's bucket, so a batch's references stack)
    references: list = field(default_factory=list, repr=False)


@dataclass
class Scan:
    items: list
    problems: list
    resolutions: list
    reference_count: Optional[int] = None  # data.reference: references per pair (every dataset has the same)

    @property
    def fatal(self) -> bool:
        return any(p.severity == "fatal" for p in self.problems)

    def counts(self) -> dict:
        c = Counter(p.severity for p in self.problems)
        return {s: c.get(s, 0) for s in SEVERITIES}

    def by_kind(self) -> Counter:
        return Counter(p.kind for p in self.problems)

    def summary(self) -> str:
        n_val = sum(i.split == "validation" for i in self.items)
        per_res = ", ".join(f"{r}px: {sum(r in i.placements for i in self.items)}" for r in self.resolutions)
        c = self.counts()
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.by_kind().items()))
        return (f"{_count(len(self.items), 'usable image')} ({n_val} held out for validation; {per_res}); "
                f"{c['fatal']} fatal, {len(self.skipped_files())} skipped, {_count(c['warning'], 'warning')}"
                + (f" [{kinds}]" if kinds else ""))

    def skipped_files(self) -> set:
        """The files not trained on: every file with an error (each counted once, whatever its problems)."""
        return {p.file for p in self.problems if p.severity == "error"}


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def build_caption(caption: str, trigger: Optional[str], position: str, sep: str) -> str:
    caption = caption.strip()
    if not trigger or re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption):  # already there as a word
        return caption
    if not caption:
        return trigger
    if position == "prefix":
        return f"{trigger}{sep}{caption}"
    if position == "suffix":
        return f"{caption}{sep}{trigger}"
    raise ValueError(f"data.trigger_position={position!r}: use prefix or suffix")


def _index_path(cache_dir) -> Optional[Path]:
    return Path(cache_dir) / "scan_index.json" if cache_dir else None


def _load_index(cache_dir) -> dict:
    path = _index_path(cache_dir)
    if path and path.exists():
        try:
            data = json.loads(path.read_text())
            if data.get("version") == SCAN_VERSION:
                return data["images"]
        except (OSError, ValueError, KeyError):
            pass  # a damaged index only costs a re-scan
    return {}


def _inspect(record: Record, max_pixels: int, known: dict):
    """(sha256, width, height) or an ImageProblem. Known hashes skip the full decode (that already passed)."""
    try:
        data = record.read_bytes()
    except OSError as exc:
        return ImageProblem("unreadable", f"{record.name}: cannot read ({exc})")
    sha = hashlib.sha256(data).hexdigest()
    if sha in known and known[sha][0] * known[sha][1] <= max_pixels:
        return sha, known[sha][0], known[sha][1]
    try:
        img = open_image(data, record.name, max_pixels=max_pixels, decode=False)
        w, h = img.size_oriented
        # A full decode is what finds truncated files; JPEG draft mode decodes at 1/8 scale but reads every byte.
        img.draft("RGB", (max(1, img.size[0] // 8), max(1, img.size[1] // 8)))
        img.load()
    except ImageProblem as exc:
        return exc
    except (OSError, SyntaxError, ValueError) as exc:
        kind = "truncated" if "truncated" in str(exc) or "broken data stream" in str(exc) else "unreadable"
        return ImageProblem(kind, f"{record.name}: {kind} image ({exc}). Re-export or re-download it.")
    return sha, w, h


def scan_data(data_cfg: DataConfig, resolutions, cache_dir=None, progress: bool = True, count_tokens=None) -> Scan:
    """Read, validate and bucket every image of every dataset in `data_cfg` for the given resolutions.
    `count_tokens(text) -> int`: the text encoder's tokenizer, for exact caption lengths (else bounds, see
    `caption_length_problem`)."""
    from tqdm.auto import tqdm

    resolutions = sorted({int(r) for r in resolutions})
    problems: list[Problem] = []
    if not resolutions:
        raise ValueError("scan_data needs at least one resolution")
    validate_data_config(data_cfg)
    try:
        parse_colour(data_cfg.background)  # fail early on a bad colour
    except ValueError as exc:
        from krea2_train.errors import UserError

        raise UserError(str(exc)) from exc
    if not data_cfg.datasets:
        problems.append(Problem("fatal", "no_datasets", "data.datasets",
                                "data.datasets is empty: add at least one entry with a `path`"))
        return Scan([], problems, resolutions)
    for r in resolutions:
        make_buckets(r, data_cfg.min_aspect, data_cfg.max_aspect)  # raises on a bad aspect range / resolution

    known = _load_index(cache_dir)
    items: list[Item] = []
    sizes: list[tuple[int, int]] = []  # every decoded, non-skipped-duplicate image
    ref_counts: dict = {}  # data.reference: dataset index -> (references per pair, where they come from)
    for index, ds_cfg in enumerate(data_cfg.datasets):
        prefix = f"data.datasets[{index}]"
        info: dict = {}
        records, found = load_records(ds_cfg, index, list(data_cfg.reference_folders) if data_cfg.reference else None,
                                      info, unused_reference_folders=data_cfg.reference_folders)
        problems.extend(found)
        if any(p.severity == "fatal" for p in found):
            continue
        if data_cfg.reference:
            ref_counts[index] = (info["count"], info["source"])
        with ThreadPoolExecutor(max_workers=4) as pool:  # PIL decodes without the GIL
            results = list(tqdm(pool.map(lambda r: _inspect(r, data_cfg.max_image_pixels, known), records),
                                total=len(records), desc=f"checking {ds_cfg.path}", unit="img",
                                disable=not progress or len(records) < 50))
        # Which copy of a duplicated image to keep: the first with a caption, else the first.
        keep: dict[str, Record] = {}
        for record, result in zip(records, results):
            if isinstance(result, ImageProblem):
                continue
            sha = result[0]
            if sha not in keep or (not _has_caption(keep[sha]) and _has_caption(record)):
                keep[sha] = record
        usable = 0
        for record, result in zip(records, results):
            if isinstance(result, ImageProblem):
                problems.append(Problem("error", result.kind, record.name, str(result) + " Skipped."))
                continue
            sha, w, h = result
            known[sha] = [w, h]
            if keep[sha] is not record:
                kept = keep[sha]
                action = "skipped" if data_cfg.skip_duplicates else "kept (data.skip_duplicates: false)"
                why = " (that copy has a caption)" if _has_caption(kept) and not _has_caption(record) else ""
                # a skipped copy is an error like every skipped file, so the summary's skipped count includes it
                problems.append(Problem("error" if data_cfg.skip_duplicates else "warning", "duplicate", record.name,
                                        f"{record.name}: same image as {kept.name}{why}; {action}"))
                if data_cfg.skip_duplicates:
                    continue
            sizes.append((w, h))
            # Caption problems are reported only for images that are used (not for ones skipped as too small).
            caption_problems = []
            caption = record.caption
            if record.caption_unreadable:  # already reported as caption_not_utf8, with what it trains on
                caption = ds_cfg.default_caption or ""
            elif caption is None or not caption.strip():
                what = "has no caption" if caption is None else "has an empty caption"
                if ds_cfg.default_caption is not None:
                    caption_problems.append(Problem("info", "default_caption", record.name,
                                                    f"{record.name} {what}; using {prefix}.default_caption"))
                    caption = ds_cfg.default_caption
                else:
                    caption_problems.append(Problem("warning", "missing_caption", record.name,
                                                    f"{record.name} {what}; training it on the trigger word alone. "
                                                    f"Add a caption or set {prefix}.default_caption."))
                    caption = ""
            caption = build_caption(caption, ds_cfg.trigger_word, data_cfg.trigger_position,
                                    data_cfg.trigger_separator)
            long = caption_length_problem(caption, record.name, count_tokens)
            if long is not None:
                caption_problems.append(long)
            item = Item(f"{index}:{record.key}", index, record.name, sha, w, h, caption, ds_cfg.caption_dropout,
                        ds_cfg.repeats, record=record)
            for r in resolutions:
                bucket = nearest_bucket(w, h, make_buckets(r, data_cfg.min_aspect, data_cfg.max_aspect))
                if needs_upscale(w, h, bucket) and not data_cfg.allow_upscale:
                    continue
                rng = random.Random(f"{data_cfg.seed}:{sha}:{r}")
                item.placements[r] = place(w, h, bucket, data_cfg.crop, rng)
            if not item.placements:
                smallest = nearest_bucket(w, h, make_buckets(resolutions[0], data_cfg.min_aspect, data_cfg.max_aspect))
                problems.append(Problem("error", "too_small", record.name,
                                        f"{record.name}: {w}x{h} is smaller than its {smallest[0]}x{smallest[1]} "
                                        f"bucket at {resolutions[0]} px; skipped. Use a larger image or set "
                                        "data.allow_upscale: true."))
                continue
            problems.extend(caption_problems)
            missing = [r for r in resolutions if r not in item.placements]
            if missing:
                problems.append(Problem("warning", "too_small", record.name,
                                        f"{record.name}: {w}x{h} is too small for the {missing} px stage(s); used only "
                                        f"at {sorted(item.placements)} px (data.allow_upscale: true to upscale)"))
            aspect = w / h
            if not data_cfg.min_aspect <= aspect <= data_cfg.max_aspect:
                side = "data.min_aspect" if aspect < data_cfg.min_aspect else "data.max_aspect"
                problems.append(Problem("warning", "extreme_aspect", record.name,
                                        f"{record.name}: {w}x{h} has aspect ratio {aspect:.3g} (width/height), "
                                        f"outside [data.min_aspect, data.max_aspect] = [{data_cfg.min_aspect}, "
                                        f"{data_cfg.max_aspect}]; it is cropped to the most extreme bucket, losing part "
                                        f"of the image. Crop it yourself or widen {side}."))
            if data_cfg.reference:
                if record.reference_problem is not None:  # e.g. another number of references than the others
                    kind, message = record.reference_problem
                    problems.append(Problem("error", kind, record.name, message))
                    continue
                refs = [_reference_item(item, slot, data_cfg, known, problems) for slot in record.references]
                if any(r is None for r in refs):  # each missing one reported; the pair is skipped
                    continue
                item.references = refs
            items.append(item)
            usable += 1
        if usable == 0:
            problems.append(Problem("fatal", "empty_dataset", ds_cfg.path,
                                    f"{ds_cfg.path} ({prefix}) has no usable images"
                                    + (f" ({len(records)} found, all skipped)" if records else "")))
    _save_index(cache_dir, known)
    reference_count = None
    if ref_counts:
        reference_count = next(iter(ref_counts.values()))[0]
        if len({n for n, _ in ref_counts.values()}) > 1:  # batches stack references; the graph has a fixed number
            each = "; ".join(f"data.datasets[{i}] ({data_cfg.datasets[i].path}): {n} from {src}"
                             for i, (n, src) in ref_counts.items())
            problems.append(Problem("fatal", "reference_count", "data.datasets",
                                    f"the datasets give different numbers of references per pair ({each}). Every "
                                    "pair of a run needs the same number (a batch stacks them; the ComfyUI graph has "
                                    "that many ReferenceLatent nodes): train them in separate runs, or give each "
                                    "the same reference folders / columns."))
    _choose_validation(items, data_cfg)
    if items and not any(i.split == "train" for i in items):
        problems.append(Problem("fatal", "no_training_images", "data.validation_images",
                                f"data.validation_images={data_cfg.validation_images} holds out every image; lower it"))
    problems.extend(_empty_resolutions(items, sizes, resolutions, data_cfg))
    return Scan(items, problems, resolutions, reference_count)


def _reference_item(item: Item, slot, data_cfg: DataConfig, known: dict, problems: list) -> Optional[Item]:
    """`item`'s reference `slot` (a Record from its source: a file in a reference folder, or a metadata / dataset
    column; or the message saying it is missing) as an Item placed into each of `item`'s buckets, or None with an
    error Problem (the pair is skipped). Every source is checked alike."""
    if isinstance(slot, str):
        problems.append(Problem("error", "missing_reference", item.name, slot))
        return None
    record = slot
    shown = _in_dataset(record.name, data_cfg.datasets[item.dataset].path)
    result = _inspect(record, data_cfg.max_image_pixels, known)
    if isinstance(result, ImageProblem):
        problems.append(Problem("error", "unreadable_reference", item.name,
                                f"{item.name}: its reference is not usable: {str(result).rstrip('.')}. Pair skipped."))
        return None
    sha, w, h = result
    known[sha] = [w, h]
    ref = Item(item.id, item.dataset, record.name, sha, w, h, "", 0.0, 1, item.split, record=record)
    for r, placement in item.placements.items():
        rng = random.Random(f"{data_cfg.seed}:{sha}:{r}:reference")
        ref.placements[r] = place(w, h, placement.bucket, "center", rng)
    small = [r for r, p in ref.placements.items() if needs_upscale(w, h, p.bucket)]
    if small:  # an upscaled reference is blurrier than the inputs users will give: a size mismatch worth fixing
        buckets = ", ".join(f"{ref.placements[r].bucket[0]}x{ref.placements[r].bucket[1]} px at the {r} px stage"
                            for r in small)
        need = ref.placements[max(small)].bucket
        # the target upscaled too (data.allow_upscale): "as large as its target" would not help
        target_small = any(needs_upscale(item.width, item.height, ref.placements[r].bucket) for r in small)
        fix = (f"its target ({item.width}x{item.height} px) is upscaled too (data.allow_upscale): use a larger pair "
               "(or lower the stage resolution)" if target_small
               else f"use a reference of at least {need[0]}x{need[1]} px, like its target "
                    f"({item.width}x{item.height} px)")
        problems.append(Problem("warning", "reference_small", item.name,
                                f"{item.name}: its reference {shown} ({w}x{h} px) is smaller than its bucket "
                                f"({buckets}) and is upscaled; {fix}."))
    ratio = (w / h) / (item.width / item.height)
    if not 0.8 <= ratio <= 1.25:
        problems.append(Problem("warning", "reference_aspect", item.name,
                                f"{item.name}: {item.width}x{item.height} px but its reference {shown} is {w}x{h} px; "
                                "the reference is cropped to the target's bucket, losing part of it. Crop the pair "
                                "alike."))
    return ref


def _in_dataset(name: str, dataset_path) -> str:
    """A reference file as messages show it: relative to its dataset folder when inside it, else as given."""
    root = Path(os.path.expanduser(str(dataset_path))).resolve()
    try:
        return Path(name).resolve().relative_to(root).as_posix()
    except (ValueError, OSError):
        return name


# Caption tokens the text encoder keeps: 512 prompt tokens include the 5-token chat suffix (models/text_encoder.py).
CAPTION_TOKENS = facts.MAX_PROMPT_TOKENS - facts.SUFFIX_TOKENS


def caption_length_problem(caption: str, name: str, count_tokens=None) -> Optional[Problem]:
    """A warning when a caption is longer than the text encoder reads (the rest is cut off, silently, at training).

    With the tokenizer (`count_tokens`), exact. Without it (no text encoder configured), two cheap bounds on Qwen's
    byte-level BPE: every UTF-8 byte is at most one token, so a caption of at most CAPTION_TOKENS bytes always fits
    (nearly every caption: no tokenizer is loaded for them); every word and punctuation mark is at least one token, so
    more of those than CAPTION_TOKENS is surely cut. In between, ~4 characters per token (English) says "probably"."""
    n_bytes = len(caption.encode("utf-8"))
    if n_bytes <= CAPTION_TOKENS:
        return None
    if count_tokens is not None:
        n = count_tokens(caption)
        length = f"{n} tokens"
    else:
        n = len(re.findall(r"\w+|[^\w\s]", caption))  # a lower bound
        length = f"at least {n} tokens"
        if n <= CAPTION_TOKENS:
            n = len(caption) // 4
            length = f"about {n} tokens (estimated; set model.text_encoder to count exactly)"
    if n <= CAPTION_TOKENS:
        return None
    return Problem("warning", "caption_too_long", name,
                   f"{name}: caption is {length}; the text encoder reads the first {CAPTION_TOKENS} and drops the "
                   f"rest ({len(caption)} characters). Shorten it to about {CAPTION_TOKENS * 3} characters.")


def _has_caption(record: Record) -> bool:
    return record.caption is not None and bool(record.caption.strip())


def _empty_resolutions(items: list, sizes: list, resolutions: list, data_cfg: DataConfig) -> list:
    """A fatal problem for each stage resolution no training image can be used at (training would stop there)."""
    train = [i for i in items if i.split == "train"]
    if not sizes or (items and not train):
        return []  # already fatal: no images at all, or every usable one held out
    out = []
    for r in resolutions:
        if any(r in i.placements for i in train):
            continue
        at_r = [i for i in items if r in i.placements]
        too_small = len(sizes) - len(at_r)
        w, h = min(sizes, key=lambda s: (s[0] * s[1], s))
        big_w, big_h = max(sizes, key=lambda s: (s[0] * s[1], s))
        held = (f" ({len(at_r)} that fit are held out for validation: lower data.validation_images)"
                if at_r else "")
        out.append(Problem("fatal", "resolution_empty", f"resolution {r}",
                           f"no training images can be used at {r} px: {too_small} of {len(sizes)} images are too "
                           f"small for their {r} px bucket (smallest {w}x{h}, largest {big_w}x{big_h}){held}. "
                           f"Lower that stage's resolution, add images of at least about {r}x{r}, or set "
                           "data.allow_upscale: true to upscale smaller images."))
    return out


def _save_index(cache_dir, known: dict) -> None:
    path = _index_path(cache_dir)
    if path is None or os.environ.get("RANK", "0") != "0":  # under accelerate launch: one writer (global rank 0)
        return
    from krea2_train.utils.io import write_json_atomic

    try:
        write_json_atomic(path, {"version": SCAN_VERSION, "images": known})
    except OSError:
        pass  # the index only saves time


def _choose_validation(items: list, data_cfg: DataConfig) -> None:
    v = data_cfg.validation_images
    if not v or not items:
        return
    n = int(v) if v >= 1 else max(1, round(v * len(items)))
    n = min(n, len(items))
    order = sorted(items, key=lambda i: i.id)
    for item in random.Random(f"validation:{data_cfg.seed}").sample(order, n):
        item.split = "validation"


def format_report(scan: Scan, show_info: bool = False) -> str:
    lines = []
    for sev in SEVERITIES:
        if sev == "info" and not show_info:
            continue
        for p in scan.problems:
            if p.severity == sev:
                lines.append(f"{sev.upper():8s} {p.kind:20s} {p.message}")
    lines.append(scan.summary())
    return "\n".join(lines)
