"""A style score: how close a set of images is to a set of training images, in a few pixel statistics that a
person would name when describing a flat graphic style.

    ref = StyleReference.from_folder("datasets/demo")
    ref.distance(images)            # 0 = like the training set; Turbo alone is far
    ref.closure(base_images, lora_images)   # share of the distance the LoRA closed (1 = all of it)

Per image, at 128 px (`FEATURE_SIZE`, so any resolution compares):
  * palette: the share of pixels nearest to each of `PALETTE_RGB` (the micro world's eight colours, the demo posters'
    paper, ink and four inks, and grey): what colours the picture is made of;
  * ink: the share of near-black pixels; edges: the share of pixels with a strong luminance gradient (outlines);
  * texture: the mean absolute difference from a 3x3 blur inside flat regions (hatching, paper grain).
A set of images is summarised by its mean feature vector; the distance is the Euclidean distance between means,
with each statistic scaled by `WEIGHTS` so palette shares (which sum to 1) and the three scalars count alike.

Why it is a fair measure of "moved toward the style": it reads only pixels, the same way for training images and
samples; it is computed on the whole image set, not on a sample the LoRA saw; and it is checked both ways by the
tests: images of the training set score close to their own reference, images of another style (the micro world,
or noise) score far. It says nothing about content (which shape is where), only about the look.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

FEATURE_SIZE = 128
PALETTE_RGB = {
    # the micro world's colours (krea2_train/data/world.py)
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 220, 40),
    "white": (245, 245, 245), "black": (20, 20, 20), "orange": (245, 140, 30), "purple": (140, 50, 180),
    # the demo posters' paper, hatching, inks (scripts/make_demo_dataset.py)
    "paper": (243, 233, 210), "hatching": (228, 214, 186), "poster_red": (214, 64, 48),
    "mustard": (232, 176, 48), "teal": (32, 128, 128), "navy": (30, 42, 84),
    "grey": (128, 128, 128),
}
_PALETTE = np.array(list(PALETTE_RGB.values()), dtype=np.float32) / 255.0
WEIGHTS = {"palette": 1.0, "ink": 2.0, "edges": 2.0, "texture": 8.0}


def _as_array(image) -> np.ndarray:
    """PIL image or (H, W, 3) uint8/float array -> float32 (FEATURE_SIZE, FEATURE_SIZE, 3) in [0, 1]."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        arr = np.asarray(image)
        image = Image.fromarray(arr if arr.dtype == np.uint8 else (np.clip(arr, 0, 1) * 255).astype(np.uint8))
    image = image.convert("RGB").resize((FEATURE_SIZE, FEATURE_SIZE), Image.BILINEAR)
    return np.asarray(image, dtype=np.float32) / 255.0


def image_features(image) -> np.ndarray:
    """The weighted feature vector of one image (see the module docstring)."""
    x = _as_array(image)
    d = ((x[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1)
    palette = np.bincount(d.argmin(-1).ravel(), minlength=len(_PALETTE)) / d[..., 0].size
    luma = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    ink = float((luma < 0.2).mean())
    gy, gx = np.gradient(luma)
    grad = np.hypot(gx, gy)
    edges = float((grad > 0.12).mean())
    pad = np.pad(luma, 1, mode="edge")
    blur = sum(pad[i:i + FEATURE_SIZE, j:j + FEATURE_SIZE] for i in range(3) for j in range(3)) / 9.0
    flat = grad < 0.12
    texture = float(np.abs(luma - blur)[flat].mean()) if flat.any() else 0.0
    w = WEIGHTS
    return np.concatenate([w["palette"] * palette, [w["ink"] * ink, w["edges"] * edges, w["texture"] * texture]])


def set_features(images) -> np.ndarray:
    return np.mean([image_features(im) for im in images], axis=0)


def open_spaced(files, max_images: int = 64) -> list:
    """RGB images of at most `max_images` of `files`, evenly spaced in their order; unreadable ones are left out
    (check-data reports them; a file may also have changed since it was cached)."""
    from PIL import Image

    files = list(files)
    files = [files[i * len(files) // max_images] for i in range(max_images)] if len(files) > max_images else files
    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                images.append(im.convert("RGB"))
        except OSError:
            continue
    return images


def reference_images(folders, max_images: int = 64) -> list:
    """The RGB images a style reference is taken from: every readable image under `folders` (recursively; at most
    `max_images`, evenly spaced in name order). ValueError when there is none."""
    from krea2_train.data.images import IMAGE_EXTENSIONS

    files = sorted(p for f in folders for p in Path(f).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"{', '.join(map(str, folders))}: no images to take a style reference from")
    images = open_spaced(files, max_images)
    if not images:
        raise ValueError(f"{', '.join(map(str, folders))}: none of the images could be read for a style reference")
    return images


@dataclass
class StyleReference:
    """The training images' mean features; `spread`: their own mean distance to it (what "on style" looks like)."""

    mean: np.ndarray
    spread: float
    count: int

    @classmethod
    def from_images(cls, images) -> "StyleReference":
        feats = np.stack([image_features(im) for im in images])
        mean = feats.mean(0)
        return cls(mean, float(np.linalg.norm(feats - mean, axis=1).mean()), len(feats))

    @classmethod
    def from_folder(cls, folder, max_images: int = 64) -> "StyleReference":
        """The images under `folder` (recursively; at most `max_images`, evenly spaced in name order)."""
        return cls.from_folders([folder], max_images)

    @classmethod
    def from_datasets(cls, datasets, max_images: int = 64) -> "StyleReference | None":
        """The training images of a config's `data.datasets` (its image folders: a dataset saved with save_to_disk
        has none to read), or None when there are none."""
        folders = [d.path for d in datasets if Path(d.path).is_dir() and d.type != "disk"
                   and not (Path(d.path) / "dataset_info.json").exists()]
        try:
            return cls.from_folders(folders, max_images) if folders else None
        except ValueError:
            return None

    @classmethod
    def from_folders(cls, folders, max_images: int = 64) -> "StyleReference":
        """The images under every folder, as one set (at most `max_images`, evenly spaced in name order)."""
        return cls.from_images(reference_images(folders, max_images))

    def distance(self, images) -> float:
        """Distance of a set of images (their mean features) to the training set's mean features."""
        return float(np.linalg.norm(set_features(images) - self.mean))

    def closure(self, base_images, lora_images) -> float:
        """1 - distance(with LoRA) / distance(without): the share of the gap to the training set the LoRA closed."""
        base = self.distance(base_images)
        return 1.0 - self.distance(lora_images) / base if base > 0 else 0.0
