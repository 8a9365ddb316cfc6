"""Open, validate and convert training images: EXIF orientation, CMYK, palette, 16-bit, greyscale and alpha are all
turned into plain 8-bit RGB; truncated files, non-images and decompression bombs become `ImageProblem`s that name
the file, so callers can report and skip them.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageColor, ImageFile, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif", ".avif", ".heic"}

# A truncated JPEG must be an error, not silently grey pixels.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageProblem(Exception):
    """An image that cannot be used; `kind` is a short tag (truncated, not_image, bomb, unreadable)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def parse_colour(value: str) -> tuple[int, int, int]:
    try:
        return ImageColor.getrgb(value)[:3]
    except ValueError as exc:
        raise ValueError(f"data.background={value!r} is not a colour; use a name like white or #rrggbb") from exc


def _to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit integer and float greyscale -> 8-bit L. PIL's own convert clips I;16 at 255 instead of scaling."""
    arr = np.asarray(img)
    if img.mode == "F":
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
    else:
        # I;16* is 0..65535; mode I from 16-bit PNGs uses the same range.
        arr = arr.astype(np.float64) / (65535.0 if arr.max() > 255 or img.mode.startswith("I;16") else 255.0) * 255
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")


def to_rgb(img: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """Any PIL mode -> RGB, alpha composited on `background`, CMYK through its ICC profile when present."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        img = _to_8bit(img)
    if img.mode == "P":
        # Palette images may carry transparency in info; RGBA keeps it for compositing.
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode == "CMYK":
        icc = img.info.get("icc_profile")
        if icc:
            try:
                from PIL import ImageCms

                src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
                img = ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
            except Exception:
                img = img.convert("RGB")
        else:
            img = img.convert("RGB")
    if img.mode in ("LA", "La", "PA", "RGBa", "1", "L;16"):
        img = img.convert("RGBA" if "A" in img.mode or "a" in img.mode else "RGB")
    if img.mode == "RGBA":
        base = Image.new("RGB", img.size, tuple(background))
        base.paste(img, mask=img.getchannel("A"))
        return base
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def open_image(source, name: str | None = None, max_pixels: int = 100_000_000, background=(255, 255, 255),
               decode: bool = True) -> Image.Image:
    """Open `source` (a path or bytes) as an RGB image with EXIF orientation applied.

    With decode=False only the header is read (size, mode), which is enough for bucketing; a full decode is what
    finds truncated files. Raises ImageProblem naming `name` (or the path).
    """
    name = name or str(source if not isinstance(source, (bytes, bytearray)) else "<bytes>")
    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else Path(source)
    try:
        with warnings.catch_warnings():
            # Our own limit (below) is the guard; PIL's warning threshold would reject sizes the user allowed.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fp)
            w, h = img.size
            if w * h > max_pixels:
                raise ImageProblem("bomb", f"{name}: {w}x{h} = {w * h:,} pixels is over data.max_image_pixels="
                                           f"{max_pixels:,} (a decompression bomb or a huge scan). Downscale the "
                                           "file or raise data.max_image_pixels.")
            if w == 0 or h == 0:
                raise ImageProblem("unreadable", f"{name}: image has zero size")
            if not decode:
                # Orientation only swaps the sides; report the displayed size.
                orientation = img.getexif().get(0x0112, 1)
                if orientation in (5, 6, 7, 8):
                    img.size_oriented = (h, w)
                else:
                    img.size_oriented = (w, h)
                return img
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img, background)
    except ImageProblem:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageProblem("bomb", f"{name}: rejected as a decompression bomb ({exc}). Downscale the file or raise "
                                   "data.max_image_pixels.") from exc
    except UnidentifiedImageError as exc:
        raise ImageProblem("not_image", f"{name}: not an image PIL can read (wrong extension, or not an image "
                                        "file). Remove it or convert it to PNG/JPEG.") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        text = str(exc)
        kind = "truncated" if "truncated" in text or "broken data stream" in text else "unreadable"
        raise ImageProblem(kind, f"{name}: {'truncated' if kind == 'truncated' else 'unreadable'} image ({text}). "
                                 "Re-export or re-download it.") from exc
