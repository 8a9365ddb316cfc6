"""Dataset sources: where images and captions come from.

    folder       images with same-name caption files (`a.png` + `a.txt`), searched recursively
    imagefolder  a folder with metadata.jsonl/.csv, loaded through Hugging Face `datasets` ("imagefolder")
    disk         a dataset written by `datasets`' save_to_disk (Dataset or DatasetDict)

Each source yields `Record`s (one per image, with its raw caption) and `Problem`s (files it could not use). Image bytes
are read on demand with `Record.read_bytes()`, so a 10k-image dataset is never held in memory.
"""

from __future__ import annotations

import os
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


def folder_records(cfg: DatasetConfig, index: int, root: Path, skip_dirs: tuple = ()
                   ) -> tuple[list[Record], list[Problem]]:
    """`skip_dirs`: top-level folder names not read as images (the reference folder of an edit dataset)."""
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
        records.append(Record(index, str(path.relative_to(root)), str(path), caption, _read_file(str(path)),
                              str(path), caption_unreadable=cap_path.exists() and caption is None))
    return records, problems


def _hf_records(ds, cfg: DatasetConfig, index: int, root: Path, kind: str) -> tuple[list[Record], list[Problem]]:
    from datasets import Image as ImageFeature

    problems = []
    columns = list(ds.column_names)
    config_prefix = f"data.datasets[{index}]"
    if cfg.image_column not in columns:
        raise _Fatal(f"{root}: no image column {cfg.image_column!r} (columns: {columns}). Set "
                     f"{config_prefix}.image_column.")
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
    return records, problems


class _Fatal(Exception):
    pass


def load_records(cfg: DatasetConfig, index: int, reference_folders: Optional[list] = None
                 ) -> tuple[list[Record], list[Problem]]:
    """`reference_folders` (data.reference): top-level folders of the dataset that hold references, not images."""
    """Records and problems of one configured dataset. A dataset that cannot be read at all is one fatal Problem."""
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
        if reference_folders is not None and kind != "folder":
            raise _Fatal(f"data.reference: true needs a folder dataset (images + {reference_folders} folders beside "
                         f"them); data.datasets[{index}] is {kind}. Export it as a folder, or set data.reference: "
                         "false")
        if kind == "folder":
            skip = tuple(str(f).strip("/") for f in reference_folders or ())
            return folder_records(cfg, index, root, skip)
        if kind == "imagefolder":
            import datasets

            try:
                ds = datasets.load_dataset("imagefolder", data_dir=str(root), split=cfg.split)
            except Exception as exc:
                raise _Fatal(f"{root}: Hugging Face imagefolder could not load it ({type(exc).__name__}: {exc}). "
                             "Check metadata.jsonl: one JSON object per line with a file_name and a caption "
                             f"column (data.datasets[{index}].caption_column).") from exc
            return _hf_records(ds, cfg, index, root, kind)
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
            return _hf_records(ds, cfg, index, root, kind)
        raise _Fatal(f"data.datasets[{index}].type={cfg.type!r} is not known; use auto, folder, imagefolder or disk")
    except _Fatal as exc:
        return [], [Problem("fatal", "unreadable_dataset", str(root), str(exc))]
