"""The `data:` section of a run config (OmegaConf structured-config compatible: plain types, Optional, List of
dataclasses, defaults).

    data:
      datasets:
        - path: datasets/demo          # folder of images + .txt, an imagefolder with metadata.jsonl, or save_to_disk
          trigger_word: k2demo
          repeats: 2
      validation_images: 2
      auto_caption: true               # caption images without a .txt before check-data (data.caption: how)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Union

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
    # data.reference with an `imagefolder` / `disk` dataset: the column(s) holding each row's reference image(s),
    # reference 1, 2, ... in ComfyUI's order. A column holds an image (a `datasets` Image feature, or metadata.jsonl's
    # `reference_file_name`, which `datasets` reads as column `reference`), a path relative to the dataset folder, or
    # (one column) a list of those. [] (default): found by name, one of (two at once are refused): `reference` /
    # `reference_1`, `reference_2`, ...; `references` (a list); `input_image` (InstructPix2Pix: set image_column:
    # edited_image and caption_column: edit_prompt). Without such a column, an imagefolder uses data.reference_folders
    # as a folder does (a folder and a column that name different files are refused).
    reference_columns: List[str] = field(default_factory=list)
    # Split of a DatasetDict saved to disk / of an imagefolder.
    split: str = "train"


# Instruction presets of krea2-train caption (data/caption.PRESETS holds their text); product is object's alias.
CAPTION_PRESETS = ("style", "character", "object", "product", "general")


@dataclass
class CaptionConfig:
    # style: the content, never the style; character / object (product): pose, clothes, setting, the subject named by
    # the trigger word; general: everything. The trigger word is each dataset's trigger_word.
    preset: str = choice("general", CAPTION_PRESETS)
    # A free instruction replacing the preset's; `{trigger}` in it becomes the trigger word.
    instruction: Optional[str] = None
    # The Qwen3-VL folder to caption with (config.json, weights with the vision tower, tokenizer,
    # preprocessor_config.json, chat_template.json). null: model.text_encoder (a ComfyUI single file cannot caption).
    model: Optional[str] = None
    # Longest answer generated (greedy); captions are then cut to the 507 tokens the text encoder reads.
    max_new_tokens: int = 200
    # Images are resized (aspect kept) to at most this many pixels before the vision tower.
    max_pixels: int = 1024 * 1024
    batch_size: int = 4
    # auto: bfloat16 on GPU, float32 on CPU.
    dtype: str = choice("auto", ("auto", "bfloat16", "float16", "float32"))


@dataclass
class DataConfig:
    datasets: List[DatasetConfig] = field(default_factory=list)
    # Edit LoRAs: every image has a reference image of the same file name (any image extension) in each of
    # <dataset>/<reference_folders[k]>/ (folder datasets; imagefolder / disk datasets: data.datasets[i]
    # .reference_columns), reference k + 1 in ComfyUI's order (RoPE index k + 1); their
    # latents are given to the transformer clean, beside the noisy target (models/reference.py). Those folders are
    # not trained on as images. Several: [reference_1, reference_2].
    reference: bool = False
    reference_folders: List[str] = field(default_factory=lambda: ["reference"])
    # Probability that a training batch runs without its references (text-to-image), so the LoRA keeps working
    # without one. Drawn per micro-batch from the step's seeded generator (resumes reproduce it).
    reference_dropout: float = 0.0
    # Where the trigger word goes: prefix ("trigger, caption") or suffix ("caption, trigger").
    trigger_position: str = choice("prefix", ("prefix", "suffix"))
    trigger_separator: str = ", "
    # Aspect-ratio buckets: width/height between these, sides multiples of 16, area about resolution^2.
    min_aspect: float = 0.5
    max_aspect: float = 2.0
    # center | random. A random crop is drawn once per image (from `seed`) and recorded, so the cache stays valid.
    crop: str = choice("center", ("center", "random"))
    # Random horizontal flips: both variants are cached, the loader picks one per sample and epoch. With
    # data.reference the references are flipped with their target (wrong for left/right instructions: keep it off).
    flip: bool = False
    # Images smaller than their bucket are skipped for that resolution unless upscaling is allowed.
    allow_upscale: bool = False
    # Colour that transparent pixels are composited on: a name or #rrggbb.
    background: str = "white"
    # Decompression-bomb guard: images with more pixels than this are rejected without decoding.
    max_image_pixels: int = 100_000_000
    # Skip exact duplicate images (same bytes) inside a dataset; always reported.
    skip_duplicates: bool = True
    # Held-out images for the validation loss: a count (an integer >= 1) or a fraction (< 1). 0: none.
    validation_images: Union[int, float] = 0
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
    # Caption every image without a caption file (missing or empty) before check-data and caching, with the
    # Qwen3-VL of data.caption.model / model.text_encoder (`krea2-train caption CONFIG` does the same on its own).
    auto_caption: bool = False
    caption: CaptionConfig = field(default_factory=CaptionConfig)


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
    v = cfg.validation_images
    need(not isinstance(v, bool) and isinstance(v, (int, float)) and v >= 0 and (v < 1 or float(v).is_integer()),
         "validation_images", f"= {v}: use a whole count of images (2) or a fraction below 1 (0.1)")
    if v >= 1:
        cfg.validation_images = int(v)  # a count: 2.0 in YAML holds out 2 images, and reads so everywhere
    need(cfg.num_workers >= 0, "num_workers", "must be >= 0")
    need(cfg.text_batch_size >= 1 and cfg.vae_batch_size >= 1, "text_batch_size",
         "and data.vae_batch_size must be >= 1")
    need(0 <= cfg.reference_dropout <= 1, "reference_dropout", f"= {cfg.reference_dropout}: must be in [0, 1]")
    if cfg.reference:
        folders = [str(f).strip("/") for f in cfg.reference_folders]
        need(bool(folders) and all(f and "/" not in f for f in folders) and len(set(folders)) == len(folders),
             "reference_folders", f"= {list(cfg.reference_folders)}: give one or more distinct folder names inside "
             "each dataset (e.g. [reference] or [reference_1, reference_2])")
    c = cfg.caption
    need(1 <= c.max_new_tokens <= 2048, "caption.max_new_tokens", f"= {c.max_new_tokens}: use 1 to 2048 (captions "
         "are cut to the 507 tokens the text encoder reads anyway)")
    need(c.max_pixels >= 56 * 56, "caption.max_pixels", f"= {c.max_pixels}: use at least 3136 (56 x 56); "
         "1048576 (1024 x 1024) is the default")
    need(c.batch_size >= 1, "caption.batch_size", f"= {c.batch_size}: must be >= 1")
    need(c.instruction is None or c.instruction.strip() != "", "caption.instruction",
         "is empty: give an instruction, or null for the preset's")
    for i, d in enumerate(cfg.datasets):
        need(d.repeats >= 1, f"datasets[{i}].repeats", f"= {d.repeats}: must be >= 1")
        columns = [str(c) for c in d.reference_columns]
        need(not columns or cfg.reference, f"datasets[{i}].reference_columns",
             f"= {columns} is only read with data.reference: true; set it, or remove reference_columns")
        need(all(c.strip() for c in columns) and len(set(columns)) == len(columns)
             and d.image_column not in columns, f"datasets[{i}].reference_columns",
             f"= {columns}: give distinct column names other than the image column ({d.image_column!r})")
        need(0 <= d.caption_dropout <= 1, f"datasets[{i}].caption_dropout", f"= {d.caption_dropout}: must be in [0, 1]")
