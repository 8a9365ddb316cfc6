"""Dataset sources: where images and captions come from.

    folder       images with same-name caption files (`a.png` + `a.txt`), searched recursively
    imagefolder  a folder with metadata.jsonl/.csv, loaded through Hugging Face `datasets` ("imagefolder")
    disk         a dataset written by `datasets`' save_to_disk (Dataset or DatasetDict)

Each source yields `Record`s (one per image, with its raw caption) and `Problem`s (files it could not use). Image bytes
are read on demand with `Record.read_bytes()`, so a 10k-image dataset is never held in memory.

With data.reference (edit LoRAs) each Record also carries its reference images, one slot per reference in ComfyUI's
order: a Record to read, or the message saying what is missing. A folder dataset (and an imagefolder without a
reference column) finds them in data.reference_folders by file name; an imagefolder / disk dataset reads them from
its reference column(s) (data.datasets[i].reference_columns, else found by name: `reference_columns_for`).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from krea2_train.config.data import DatasetConfig
from krea2_train.data.images import IMAGE_EXTENSIONS

SEVERITIES = ("fatal", "error", "warning", "info")
# Files that belong in a dataset folder but are not training images.
_SIDE_FILES = {"metadata.jsonl", "metadata.csv", "metadata.parquet", "license", "license.txt", "license.md",
               "readme.md", "readme.txt", "readme", "dataset_info.json", "state.json", "dataset_dict.json"}


@dataclass
class Problem:
    severity: str  # fatal: nothing can train; error: the file is skipped; warning: used with a fix-up; info
    kind: str
    file: str
    message: str


@dataclass
class Record:
    dataset: int                  # index in data.datasets
    key: str                      # stable id inside the dataset (relative path or row number)
    name: str                     # what messages show: the file path, or "dataset[row]"
    caption: Optional[str]        # raw caption; None when missing or unreadable
    read_bytes: Callable[[], bytes] = field(repr=False)
    path: Optional[str] = None    # the image file, when there is one
    caption_unreadable: bool = False  # a caption file exists but is not UTF-8 (reported once, as caption_not_utf8)
    # data.reference: per reference slot a Record, or a str saying what is missing (the pair is skipped)
    references: Optional[list] = field(default=None, repr=False)
    # data.reference: (kind, message) when the pair cannot be used as a whole (e.g. reference_count); skipped
    reference_problem: Optional[tuple] = None


# Reference column names found without data.datasets[i].reference_columns, one group per convention (more than one
# group present is ambiguous and refused): ours (metadata.jsonl `reference`, or `reference_file_name`, which
# `datasets` reads as `reference`; `reference_1`, `reference_2`, ... for several), one list column, InstructPix2Pix's.
LIST_REFERENCE_COLUMN = "references"
INSTRUCT_PIX2PIX = {"reference": "input_image", "image": "edited_image", "caption": "edit_prompt"}


def detect_type(path: Path) -> str:
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return "disk"
    if any((path / f).exists() for f in ("metadata.jsonl", "metadata.csv", "metadata.parquet")):
        return "imagefolder"
    return "folder"


def _read_file(path: str) -> Callable[[], bytes]:
    return lambda: Path(path).read_bytes()


def _decode_caption(raw: bytes, name: str, problems: list, fallback: str) -> Optional[str]:
    try:
        return raw.decode("utf-8-sig")  # -sig: Windows editors add a BOM
    except UnicodeDecodeError as exc:
        # a warning, not an error: the image is still used (errors are the files skipped)
        problems.append(Problem("warning", "caption_not_utf8", name,
                                f"{name}: caption is not UTF-8 ({exc.reason} at byte {exc.start}); re-save it as UTF-8. "
                                f"Until then the image trains on {fallback}."))
        return None


def folder_reference(index: int, root: Path, sub: str, key: str, name: str):
    """The reference of the image at `key` (its path relative to `root`) in folder `sub`: <root>/<sub>/<same relative
    path>, any image extension (the same extension first), as a Record; or the message saying it is missing."""
    rel = Path(key)
    folder = root / sub / rel.parent
    found = [folder / rel.name] + [folder / (rel.stem + e) for e in sorted(IMAGE_EXTENSIONS) if e != rel.suffix.lower()]
    found = [p for p in found if p.is_file()]
    if not found:
        return (f"{name}: no reference image {folder / rel.stem}.* (data.reference: true); skipped. Add it, or remove "
                "the image.")
    return Record(index, f"{sub}/{rel}", str(found[0]), None, _read_file(str(found[0])), str(found[0]))


def folder_records(cfg: DatasetConfig, index: int, root: Path, skip_dirs: tuple = (), reference_folders=None
                   ) -> tuple[list[Record], list[Problem]]:
    """`skip_dirs`: top-level folder names not read as images (the reference folder of an edit dataset);
    `reference_folders` (data.reference): where each image's references are found."""
    records, problems = [], []
    ext = cfg.caption_extension if cfg.caption_extension.startswith(".") else "." + cfg.caption_extension
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")  # skip .git, .cache, ...
                             and not (Path(dirpath) == root and d in skip_dirs))
        files.extend(Path(dirpath) / f for f in filenames if not f.startswith("."))
    fallback = (f"data.datasets[{index}].default_caption" if cfg.default_caption is not None
                else "the trigger word alone" if cfg.trigger_word else "an empty caption")
    stems = {p.with_suffix("") for p in files if p.suffix.lower() in IMAGE_EXTENSIONS}
    for path in sorted(files):
        suffix = path.suffix.lower()
        if suffix == ext.lower() and path.with_suffix("") not in stems and path.name.lower() not in _SIDE_FILES:
            problems.append(Problem("warning", "caption_without_image", str(path),
                                    f"{path}: caption file with no image of the same name "
                                    f"({path.stem}.png, .jpg, ...); ignored. Rename it to match its image, or add "
                                    "the image."))
            continue
        if suffix == ext.lower() or path.name.lower() in _SIDE_FILES:
            continue
        if suffix not in IMAGE_EXTENSIONS:
            problems.append(Problem("warning", "not_image", str(path),
                                    f"{path}: not an image file (extension {suffix or 'none'}); ignored"))
            continue
        caption = None
        cap_path = path.with_suffix(ext)
        if cap_path.exists():
            caption = _decode_caption(cap_path.read_bytes(), str(cap_path), problems, fallback)
        record = Record(index, str(path.relative_to(root)), str(path), caption, _read_file(str(path)),
                        str(path), caption_unreadable=cap_path.exists() and caption is None)
        if reference_folders is not None:
            record.references = [folder_reference(index, root, sub, record.key, record.name)
                                 for sub in reference_folders]
        records.append(record)
    return records, problems


def _is_list_feature(feature) -> bool:
    return hasattr(feature, "feature") and not isinstance(feature, dict)  # datasets' List / Sequence / LargeList


def reference_columns_for(cfg: DatasetConfig, columns: list, features, index: int, root: Path):
    """The reference columns of an imagefolder / disk dataset: (columns, one_list_column), or None when it has none
    (an imagefolder then uses data.reference_folders). Explicit data.datasets[i].reference_columns must exist; found
    by name, exactly one convention may be present (anything else is refused as ambiguous, naming the key to set)."""
    key = f"data.datasets[{index}].reference_columns"
    if cfg.reference_columns:
        wanted = [str(c) for c in cfg.reference_columns]
        absent = [c for c in wanted if c not in columns]
        if absent:
            raise _Fatal(f"{root}: no reference column {absent[0]!r} (columns: {columns}). Fix {key}.",
                         "no_reference_column")
        lists = [c for c in wanted if _is_list_feature(features[c])]
        if lists and len(wanted) > 1:
            raise _Fatal(f"{root}: {key} = {wanted}: {lists[0]!r} holds a list of references; give it alone, or "
                         "several columns of one image each", "ambiguous_reference")
        return wanted, bool(lists)
    numbered = sorted((c for c in columns if re.fullmatch(r"reference_[1-9][0-9]*", c)), key=lambda c: int(c[10:]))
    if "reference" in columns and "reference_1" in columns:
        raise _Fatal(f"{root}: columns 'reference' and 'reference_1' both present: which is reference 1 is ambiguous. "
                     f"Set {key} (e.g. [reference_1, reference_2]) or rename one.", "ambiguous_reference")
    groups = [g for g in ((["reference"] if "reference" in columns else []) + numbered,
                          [LIST_REFERENCE_COLUMN] if LIST_REFERENCE_COLUMN in columns else [],
                          [INSTRUCT_PIX2PIX["reference"]] if INSTRUCT_PIX2PIX["reference"] in columns else []) if g]
    if len(groups) > 1:
        raise _Fatal(f"{root}: columns {' and '.join(str(g) for g in groups)} all look like reference images: which "
                     f"to use is ambiguous. Set {key} to the one(s) to train with.", "ambiguous_reference")
    if not groups:
        return None
    group = groups[0]
    if len(group) == 1 and group[0] == LIST_REFERENCE_COLUMN and not _is_list_feature(features[group[0]]):
        return group, False  # a `references` column of one image each
    return group, group == [LIST_REFERENCE_COLUMN]


def _column_reference(value, root: Path, index: int, name: str, where: str, read):
    """A reference cell -> Record, or the message saying it is missing. `read()` re-reads the cell (bytes are not
    kept in memory); `where` names the column (and list position) for messages."""
    if value is None or value == "" or (isinstance(value, dict) and not value.get("bytes") and not value.get("path")):
        return f"{name}: no reference in {where} (data.reference: true); skipped. Fill it in, or remove the row."
    if isinstance(value, dict) and value.get("bytes"):
        label = value.get("path") or f"{name} {where}"
        return Record(index, where, str(label), None, lambda: read()["bytes"], value.get("path"))
    if isinstance(value, (dict, str)):
        p = Path(os.path.expanduser(value["path"] if isinstance(value, dict) else value))
        p = p if p.is_absolute() else root / p
        if not p.is_file():
            return (f"{name}: its reference {p} ({where}) does not exist; skipped. Fix the path (relative to {root}), "
                    "or remove the row.")
        return Record(index, where, str(p), None, _read_file(str(p)), str(p))

    def bad(value=value):
        raise OSError(f"{where} holds a {type(value).__name__}, not an image or a path")

    return Record(index, where, f"{name} {where}", None, bad)


def _hf_references(ds, records: list, cfg: DatasetConfig, index: int, root: Path, kind: str, reference_folders,
                   problems: list, info: dict) -> None:
    """Fill each record's reference slots from the dataset's reference column(s), or (an imagefolder without one)
    from data.reference_folders; refuse folder and column references that disagree."""
    from datasets import Image as ImageFeature

    columns = list(ds.column_names)
    key = f"data.datasets[{index}].reference_columns"
    found = reference_columns_for(cfg, columns, ds.features, index, root)
    folders = [f for f in reference_folders if (root / f).is_dir()] if kind == "imagefolder" else []
    if found is None:
        if not folders:
            where = ("add a `reference` field (a path relative to the dataset folder) to each line of metadata.jsonl, "
                     f"put the references in {list(reference_folders)} folders under it (same file names), or set "
                     if kind == "imagefolder" else "set ")
            raise _Fatal(f"{root}: data.reference: true but no reference column (columns: {columns}); {where}{key}",
                         "no_reference_column")
        for r in records:
            r.references = [folder_reference(index, root, sub, r.key, r.name) for sub in reference_folders]
        info.update(count=len(reference_folders), source=f"folders {list(reference_folders)}")
        return
    cols, one_list = found
    for c in cols:
        feature = ds.features[c]
        if isinstance(feature, ImageFeature):
            ds = ds.cast_column(c, ImageFeature(decode=False))
        elif _is_list_feature(feature) and isinstance(feature.feature, ImageFeature):
            ds = ds.cast_column(c, type(feature)(ImageFeature(decode=False)))
    table = ds.select_columns(cols)
    if not cfg.reference_columns:
        problems.append(Problem("info", "reference_columns", str(root),
                                f"{root}: references read from column(s) {cols} (set {key} to choose others)"))
    counts = Counter()
    for row, r in enumerate(records):
        cells = table[row]
        if one_list:
            c = cols[0]
            values = cells[c] or []
            if not isinstance(values, list):
                values = [values]
            r.references = [_column_reference(v, root, index, r.name, f"column {c!r}[{j}]",
                                              lambda row=row, j=j, c=c: table[row][c][j])
                            for j, v in enumerate(values)]
            if not values:
                r.references = [f"{r.name}: no reference in column {c!r} (an empty list; data.reference: true); "
                                "skipped. Fill it in, or remove the row."]
            else:
                counts[len(values)] += 1
        else:
            r.references = [_column_reference(cells[c], root, index, r.name, f"column {c!r}",
                                              lambda row=row, c=c: table[row][c]) for c in cols]
    count = len(cols)
    if one_list:
        count = max(counts, key=lambda n: (counts[n], n)) if counts else 1
        for r in records:
            n = len(r.references)
            if n != count and not (n == 1 and isinstance(r.references[0], str)):
                r.reference_problem = (
                    "reference_count", f"{r.name}: {n} reference(s) in column {cols[0]!r}, but {counts[count]} "
                    f"other pairs have {count}; skipped. Every pair of a run needs the same number (a batch stacks "
                    f"them; the ComfyUI graph has that many ReferenceLatent nodes): give it {count}, or train it in "
                    "another run.")
    info.update(count=count, source=f"column(s) {cols}")
    # An imagefolder with both a reference column and a reference folder: they must name the same files.
    disagree = []
    for k, sub in enumerate(reference_folders):
        if sub not in folders:
            continue
        for r in records:
            if k >= len(r.references):
                continue
            by_folder = folder_reference(index, root, sub, r.key, r.name)
            by_column = r.references[k]
            same = (isinstance(by_folder, Record) and isinstance(by_column, Record) and by_column.path is not None
                    and Path(by_folder.path).resolve() == Path(by_column.path).resolve())
            if not same and not (isinstance(by_folder, str) and isinstance(by_column, str)):
                disagree.append(f"{r.name}: {sub}/ gives "
                                f"{by_folder.path if isinstance(by_folder, Record) else 'none'}, column "
                                f"{cols[0] if one_list else cols[k]!r} gives "
                                f"{by_column.name if isinstance(by_column, Record) else 'none'}")
    if disagree:
        raise _Fatal(f"{root}: reference {disagree[0]}" + (f" (and {len(disagree) - 1} more)" if len(disagree) > 1
                                                            else "")
                     + f": folder and metadata references disagree, so which to train on is ambiguous. Remove the "
                     f"{folders} folder(s) or the reference column(s), or make them name the same files.",
                     "ambiguous_reference")


def _hf_records(ds, cfg: DatasetConfig, index: int, root: Path, kind: str, reference_folders=None,
                info: Optional[dict] = None) -> tuple[list[Record], list[Problem]]:
    from datasets import Image as ImageFeature

    problems = []
    columns = list(ds.column_names)
    config_prefix = f"data.datasets[{index}]"
    if cfg.image_column not in columns:
        hint = ""
        if INSTRUCT_PIX2PIX["image"] in columns:  # diffusers' InstructPix2Pix columns
            hint = (f" An InstructPix2Pix dataset: set {config_prefix}.image_column: {INSTRUCT_PIX2PIX['image']} and "
                    f"{config_prefix}.caption_column: {INSTRUCT_PIX2PIX['caption']} (its {INSTRUCT_PIX2PIX['reference']}"
                    " is the reference).")
        raise _Fatal(f"{root}: no image column {cfg.image_column!r} (columns: {columns}). Set "
                     f"{config_prefix}.image_column.{hint}")
    if cfg.caption_column not in columns:
        problems.append(Problem("warning", "no_caption_column", str(root),
                                f"{root}: no caption column {cfg.caption_column!r} (columns: {columns}); every image "
                                f"uses the default caption. Set {config_prefix}.caption_column if one of these "
                                "holds captions."))
    feature = ds.features[cfg.image_column]
    if isinstance(feature, ImageFeature):
        ds = ds.cast_column(cfg.image_column, ImageFeature(decode=False))  # raw bytes/path: we decode ourselves
    captions = ds[cfg.caption_column] if cfg.caption_column in columns else [None] * len(ds)
    images = ds.select_columns([cfg.image_column])
    records = []
    for row, caption in enumerate(captions):
        value = images[row][cfg.image_column]
        path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
        name = path if path and kind == "imagefolder" else f"{root}[{row}]"

        def read(row=row, images=images, col=cfg.image_column, root=root):
            v = images[row][col]
            if isinstance(v, dict):
                if v.get("bytes"):
                    return v["bytes"]
                p = Path(v["path"])
            else:
                p = Path(v)
            return (p if p.is_absolute() else root / p).read_bytes()

        if caption is not None and not isinstance(caption, str):
            caption = str(caption)
        key = str(Path(path).relative_to(root)) if path and kind == "imagefolder" and Path(path).is_absolute() \
            and Path(path).is_relative_to(root) else f"row{row}"
        records.append(Record(index, key, name, caption, read, path))
    if reference_folders is not None:
        _hf_references(ds, records, cfg, index, root, kind, reference_folders, problems,
                       info if info is not None else {})
    else:
        problems.extend(_unused_reference_columns(columns, root, kind))
    return records, problems


def _unused_reference_columns(columns: list, root: Path, kind: str) -> list[Problem]:
    """data.reference is off: a warning naming the columns that data.reference: true would read as references (the
    names `reference_columns_for` finds), so an edit dataset is not trained as text-to-image unawares."""
    found = [c for c in columns if c in ("reference", LIST_REFERENCE_COLUMN, INSTRUCT_PIX2PIX["reference"])
             or re.fullmatch(r"reference_[1-9][0-9]*", c)]
    if not found:
        return []
    meta = [root / f for f in ("metadata.jsonl", "metadata.csv", "metadata.parquet") if (root / f).exists()]
    where = str(meta[0]) if kind == "imagefolder" and meta else str(root)
    return [Problem("warning", "references_ignored", where,
                    f"{where}: column(s) {found} hold reference images, but data.reference is false, so they are "
                    "ignored and this trains a text-to-image LoRA on the targets alone. For an edit LoRA set "
                    "data.reference: true (on the command line: data.reference=true); otherwise drop the column(s).")]


def _unused_reference_folders(root: Path, folders) -> list[Problem]:
    """data.reference is off: a warning for each reference folder (data.reference_folders) a folder dataset has: its
    images are read as training images of their own, beside the targets they are the inputs of."""
    return [Problem("warning", "references_ignored", str(root / sub),
                    f"{root / sub}: a reference folder (data.reference_folders), but data.reference is false, so "
                    "its images train as ordinary images beside their targets. For an edit LoRA set data.reference: "
                    "true (on the command line: data.reference=true); otherwise move the folder out of the dataset.")
            for sub in folders if (root / str(sub).strip("/")).is_dir()]


class _Fatal(Exception):
    def __init__(self, message: str, kind: str = "unreadable_dataset"):
        super().__init__(message)
        self.kind = kind


def load_records(cfg: DatasetConfig, index: int, reference_folders: Optional[list] = None,
                 info: Optional[dict] = None, unused_reference_folders=()) -> tuple[list[Record], list[Problem]]:
    """Records and problems of one configured dataset. A dataset that cannot be read at all is one fatal Problem.

    `reference_folders` (data.reference): top-level folders of the dataset that hold references, not images; each
    Record gets its reference slots. `info` (a dict) receives `count` (references per pair) and `source` (where they
    come from: folders or columns). Without `reference_folders` (data.reference off), reference columns and the
    `unused_reference_folders` (data.reference_folders) a dataset has are warned about: they are not read as such."""
    info = info if info is not None else {}
    root = Path(os.path.expanduser(cfg.path)).resolve()
    key = f"data.datasets[{index}].path"
    if cfg.path in ("???", "", None):
        return [], [Problem("fatal", "no_path", key, f"{key} is not set: point it at a folder of images")]
    if not root.exists():
        return [], [Problem("fatal", "missing", str(root), f"{root} does not exist (config key `{key}`); fix the path")]
    if not root.is_dir():
        return [], [Problem("fatal", "not_folder", str(root), f"{root} is not a folder (config key `{key}`): point it "
                                                              "at the folder that holds the images")]
    kind = detect_type(root) if cfg.type == "auto" else cfg.type
    try:
        folders = [str(f).strip("/") for f in reference_folders] if reference_folders is not None else None
        if kind == "folder":
            if cfg.reference_columns:
                raise _Fatal(f"data.datasets[{index}].reference_columns = {list(cfg.reference_columns)}, but "
                             f"{root} is a folder dataset (no metadata.jsonl): its references are found in "
                             f"data.reference_folders {folders}. Remove reference_columns, or add a metadata.jsonl.",
                             "ambiguous_reference")
            if folders is not None:
                info.update(count=len(folders), source=f"folders {folders}")
                return folder_records(cfg, index, root, tuple(folders), folders)
            records, problems = folder_records(cfg, index, root)
            return records, _unused_reference_folders(root, unused_reference_folders) + problems
        if kind == "imagefolder":
            import datasets

            try:
                ds = datasets.load_dataset("imagefolder", data_dir=str(root), split=cfg.split)
            except Exception as exc:
                raise _Fatal(f"{root}: Hugging Face imagefolder could not load it ({type(exc).__name__}: {exc}). "
                             "Check metadata.jsonl: one JSON object per line with a file_name and a caption "
                             f"column (data.datasets[{index}].caption_column).") from exc
            return _hf_records(ds, cfg, index, root, kind, folders, info)
        if kind == "disk":
            import datasets

            try:
                ds = datasets.load_from_disk(str(root))
            except Exception as exc:
                raise _Fatal(f"{root}: not a dataset saved with save_to_disk ({exc})") from exc
            if isinstance(ds, datasets.DatasetDict):
                if cfg.split not in ds:
                    raise _Fatal(f"{root} has splits {list(ds)}, not {cfg.split!r}; set data.datasets[{index}].split")
                ds = ds[cfg.split]
            return _hf_records(ds, cfg, index, root, kind, folders, info)
        raise _Fatal(f"data.datasets[{index}].type={cfg.type!r} is not known; use auto, folder, imagefolder or disk")
    except _Fatal as exc:
        return [], [Problem("fatal", exc.kind, str(root), str(exc))]
