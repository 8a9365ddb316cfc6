"""The `data:` section of a run config (OmegaConf structured-config compatible: plain types, Optional, List of
dataclasses, defaults).

    data:
      datasets:
        - path: datasets/demo          # folder of images + .txt, an imagefolder with metadata.jsonl, or save_to_disk
          trigger_word: k2demo
          repeats: 2
      validation_images: 2
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from krea2_train.config.choices import choice, validate_choices
from krea2_train.errors import UserError


@dataclass
class DatasetConfig:
    # Folder of images with same-name captions (searched recursively), an image folder with metadata.jsonl/.csv
    # (Hugging Face `imagefolder`), or a dataset saved with `datasets`' save_to_disk.
    path: str = "???"
    # auto | folder | imagefolder | disk. auto: save_to_disk output -> disk, metadata.jsonl/.csv -> imagefolder,
    # anything else -> folder.
    type: str = choice("auto", ("auto", "folder", "imagefolder", "disk"))
    # How many times each image is seen per epoch (its weight relative to other datasets).
    repeats: int = 1
    # Added to every caption of this dataset (position: data.trigger_position); null for none.
    trigger_word: Optional[str] = None
    # Caption for images without one (missing or empty caption file / column). null: report and use "".
    default_caption: Optional[str] = None
    # Probability of training a sample on the empty caption (what CFG's unconditional branch sees).
    caption_dropout: float = 0.0
    # Caption file next to each image in `folder` datasets.
    caption_extension: str = ".txt"
    # Columns in `imagefolder` / `disk` datasets.
    image_column: str = "image"
    caption_column: str = "text"
    # Split of a DatasetDict saved to disk / of an imagefolder.
    split: str = "train"


@dataclass
class DataConfig:
    datasets: List[DatasetConfig] = field(default_factory=list)
    # Where the trigger word goes: prefix ("trigger, caption") or suffix ("caption, trigger").
    trigger_position: str = choice("prefix", ("prefix", "suffix"))
    trigger_separator: str = ", "
    # Aspect-ratio buckets: width/height between these, sides multiples of 16, area about resolution^2.
    min_aspect: float = 0.5
    max_aspect: float = 2.0
    # center | random. A random crop is drawn once per image (from `seed`) and recorded, so the cache stays valid.
    crop: str = choice("center", ("center", "random"))
    # Random horizontal flips: both variants are cached, the loader picks one per sample and epoch.
    flip: bool = False
    # Images smaller than their bucket are skipped for that resolution unless upscaling is allowed.
    allow_upscale: bool = False
    # Colour that transparent pixels are composited on: a name or #rrggbb.
    background: str = "white"
    # Decompression-bomb guard: images with more pixels than this are rejected without decoding.
    max_image_pixels: int = 100_000_000
    # Skip exact duplicate images (same bytes) inside a dataset; always reported.
    skip_duplicates: bool = True
    # Held-out images for the validation loss: a count (>= 1) or a fraction (< 1). 0: none.
    validation_images: float = 0
    # Loader worker processes (0: read in the training process).
    num_workers: int = 2
    # Keep the last, smaller batch of each bucket in an epoch.
    drop_last: bool = False
    # Batch sizes for the cache encoders.
    text_batch_size: int = 8
    vae_batch_size: int = 4
    # Encoder dtype while caching: auto (bfloat16 on GPU, float32 on CPU), bfloat16, float16, float32.
    encoder_dtype: str = choice("auto", ("auto", "bfloat16", "float16", "float32"))
    # Seed for held-out selection and random crops (the loader's order comes from the run seed).
    seed: int = 0


def validate_data_config(cfg: DataConfig) -> None:
    """Impossible values fail before any work, naming the key and the fix (the choices are checked by
    config/load.validate_choices with every other section's)."""
    validate_choices(cfg, "data.", "config")

    def need(ok, key, msg):
        if not ok:
            raise UserError(f"config key `data.{key}` {msg}")

    need(0 < cfg.min_aspect <= 1 <= cfg.max_aspect, "min_aspect",
         f"/ max_aspect = {cfg.min_aspect} / {cfg.max_aspect}: need 0 < min_aspect <= 1 <= max_aspect")
    need(cfg.max_image_pixels > 0, "max_image_pixels", "must be positive")
    need(cfg.validation_images >= 0 and (cfg.validation_images < 1 or float(cfg.validation_images).is_integer()),
         "validation_images", f"= {cfg.validation_images}: use a count (2) or a fraction below 1 (0.1)")
    need(cfg.num_workers >= 0, "num_workers", "must be >= 0")
    need(cfg.text_batch_size >= 1 and cfg.vae_batch_size >= 1, "text_batch_size",
         "and data.vae_batch_size must be >= 1")
    for i, d in enumerate(cfg.datasets):
        need(d.repeats >= 1, f"datasets[{i}].repeats", f"= {d.repeats}: must be >= 1")
        need(0 <= d.caption_dropout <= 1, f"datasets[{i}].caption_dropout", f"= {d.caption_dropout}: must be in [0, 1]")
