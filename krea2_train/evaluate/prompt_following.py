"""Does a model draw what the prompt says? Colour (and shape) read back from samples of the world grammar.

The dominant foreground colour of an image: every pixel is assigned its nearest world palette colour; the
background is the most common class on a 4 px frame around the border; the foreground is the most common other
class, if it covers at least `MIN_FOREGROUND` of the image (else there is no foreground and the prompt fails).
This reads only the picture, never the prompt, so a model that ignores the text scores about 1 in 8.

Shape (reported, no target): the foreground's fill ratio of its bounding box is ~1 for a square, pi/4 for a circle
and 1/2 for a triangle.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from krea2_train.data import world

MIN_FOREGROUND = 0.015
PALETTE_NAMES = tuple(world.COLOURS)
PALETTE = np.array([world.COLOURS[n] for n in PALETTE_NAMES], dtype=np.float32)


def palette_classes(image) -> np.ndarray:
    """(H, W) index into PALETTE_NAMES of each pixel's nearest palette colour (RGB distance)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    d = ((arr[:, :, None, :] - PALETTE[None, None]) ** 2).sum(-1)
    return d.argmin(-1)


@dataclass
class Reading:
    background: str
    foreground: str | None
    shape: str | None
    coverage: float  # share of the image the foreground class covers


def read_image(image) -> Reading:
    cls = palette_classes(image)
    h, w = cls.shape
    border = np.concatenate([cls[:4].ravel(), cls[-4:].ravel(), cls[:, :4].ravel(), cls[:, -4:].ravel()])
    bg = int(np.bincount(border, minlength=len(PALETTE)).argmax())
    counts = np.bincount(cls.ravel(), minlength=len(PALETTE)).astype(np.float64)
    counts[bg] = 0
    fg = int(counts.argmax())
    coverage = counts[fg] / cls.size
    if coverage < MIN_FOREGROUND:
        return Reading(PALETTE_NAMES[bg], None, None, float(coverage))
    return Reading(PALETTE_NAMES[bg], PALETTE_NAMES[fg], _shape_of(cls == fg), float(coverage))


def _shape_of(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = mask.sum() / box
    return "square" if fill > 0.9 else "circle" if fill > 0.64 else "triangle"


# --------------------------------------------------------------------------------------------------- sampling
def sample_images(transformer, text_encoder, vae, prompts: list[str], settings, seeds: list[int],
                  batch: int = 16) -> list:
    """PIL images for `prompts`, image i from noise seed seeds[i] (batched; same picture as sampling it alone)."""
    from krea2_train.inference import prompt_noise, sample_latents
    from krea2_train.models.vae import to_pil

    images = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        embeds, mask = text_encoder.encode(chunk)
        neg = neg_mask = None
        if settings.guidance > 0:
            neg, neg_mask = text_encoder.encode([""] * len(chunk))
        noise = prompt_noise(seeds[start:start + len(chunk)], settings.height, settings.width)
        latents = sample_latents(transformer, embeds, mask, settings, neg, neg_mask, noise=noise)
        images += to_pil(vae.decode(latents))
    return images


def prompt_following(transformer, text_encoder, vae, settings, count: int = 64, seed: int = 0,
                     batch: int = 16) -> dict:
    """Colour and shape accuracy over `count` seeded `a {colour} {shape} on a {colour} background` prompts."""
    scenes = world.prompt_set(seed, count)
    prompts = [sc.caption() for sc in scenes]
    images = sample_images(transformer, text_encoder, vae, prompts, settings, [seed * 10_000 + i for i in
                                                                                range(count)], batch)
    readings = [read_image(im) for im in images]
    colour = [r.foreground == sc.colour for r, sc in zip(readings, scenes)]
    background = [r.background == sc.background for r, sc in zip(readings, scenes)]
    shape = [r.shape == sc.shape for r, sc in zip(readings, scenes)]
    return {
        "prompts": count,
        "seed": seed,
        "steps": settings.steps,
        "guidance": settings.guidance,
        "size": settings.height,
        "colour_accuracy": float(np.mean(colour)),
        "background_accuracy": float(np.mean(background)),
        "shape_accuracy": float(np.mean(shape)),
        "images": images,
    }


def seconds_per_image(transformer, text_encoder, vae, settings, repeats: int = 3, prompt=None) -> float:
    """Wall time of one image from prompt to pixels (text encoding, sampling, VAE decode), best of `repeats`."""
    prompt = prompt or world.prompt_set(0, 1)[0].caption()
    best = float("inf")
    for i in range(repeats):
        t0 = time.perf_counter()
        sample_images(transformer, text_encoder, vae, [prompt], settings, [i], batch=1)
        best = min(best, time.perf_counter() - t0)
    return best


def vae_roundtrip(vae, count: int = 64, seed: int = 777) -> dict:
    """PSNR (dB) and read-back colour accuracy of world images encoded and decoded by `vae` (a models.vae.VAE)."""
    from krea2_train.models.vae import to_pil

    pixels, _, scenes = world.world_batch(seed, 0, count)
    rec = torch.cat([vae.decode(vae.encode(pixels[i:i + 16])) for i in range(0, count, 16)])
    mse = ((rec - pixels) ** 2).mean().item() / 4  # in [0, 1] units: pixels span 2
    readings = [read_image(im) for im in to_pil(rec)]
    return {"psnr_db": round(float(10 * np.log10(1 / max(mse, 1e-12))), 2),
            "colour_accuracy": float(np.mean([r.foreground == sc.colour for r, sc in zip(readings, scenes)]))}


def style_roundtrip(vae, folder, size: int = 128) -> dict:
    """How much of a style survives the VAE alone: the style distance (evaluate/style.py) of `folder`'s images
    encoded and decoded at `size` px, beside that of the micro world's images (a different style) for scale. A LoRA
    can never bring a picture closer to the style than its VAE round trip."""
    from PIL import Image

    from krea2_train.evaluate.style import StyleReference, reference_images
    from krea2_train.models.vae import to_pil

    originals = reference_images([folder])
    ref = StyleReference.from_images(originals)
    images = [im.resize((size, size), Image.LANCZOS) for im in originals]
    rec = to_pil(torch.cat([vae.decode(vae.encode(world.to_tensor(images[i:i + 8]))) for i in range(0, len(images),
                                                                                                    8)]))
    other, _, _ = world.world_batch(777, 0, len(images))
    return {"images": len(images), "distance_roundtrip": round(ref.distance(rec), 3),
            "distance_originals": round(ref.distance(images), 3),
            "distance_world": round(ref.distance(to_pil(other)), 3)}


def measure_all(root=None, count: int = 64, seed: int = 0, size: int = 128, timing: bool = True,
                verify: bool = False, keep_images: bool = False, guidance: float | None = None,
                style_folder=None) -> dict:
    """The micro model's figures: Raw (28 steps, CFG) and Turbo (8 steps, no CFG) prompt following, seconds per
    128 px image (on this machine's current torch thread count). `root`: a folder in the shipped layout (default the
    shipped model); `verify`: check its manifest first (off while building it, as the manifest comes after);
    `style_folder`: images (the demo posters) whose VAE round trip is measured (`style_roundtrip`)."""
    from krea2_train.inference import SampleSettings
    from krea2_train.models.micro import load_micro

    out = {"threads": torch.get_num_threads(), "prompt_list": [sc.caption() for sc in world.prompt_set(seed, count)]}
    from krea2_train.models.micro import RAW_GUIDANCE

    guidance = RAW_GUIDANCE if guidance is None else guidance
    for variant, settings in (("raw", SampleSettings.raw(height=size, width=size, guidance=guidance)),
                              ("turbo", SampleSettings.turbo(height=size, width=size))):
        transformer, text_encoder, vae = load_micro(variant, root=root, verify=verify)
        result = prompt_following(transformer, text_encoder, vae, settings, count, seed)
        images = result.pop("images")
        if keep_images:
            result["images"] = images
        if timing:
            result["seconds_per_image"] = round(seconds_per_image(transformer, text_encoder, vae, settings), 3)
        out[variant] = result
    out["vae_roundtrip"] = vae_roundtrip(vae)
    if style_folder is not None:
        out["vae_style_roundtrip"] = style_roundtrip(vae, style_folder)
    return out



def save_grid(images: dict, prompts: list[str], path, columns: int = 8) -> None:
    """Rows of Raw / Turbo samples (one labelled tile per prompt) in one PNG, for a person to judge."""
    import io

    from PIL import Image, ImageDraw

    from krea2_train.utils.io import write_bytes_atomic

    variants = [v for v in images if images[v]]
    n = len(prompts)
    tile, label = 128, 24
    rows = (n + columns - 1) // columns
    sheet = Image.new("RGB", (columns * tile, rows * len(variants) * (tile + label)), "white")
    draw = ImageDraw.Draw(sheet)
    for r in range(rows):
        for vi, v in enumerate(variants):
            y = (r * len(variants) + vi) * (tile + label)
            for c in range(columns):
                i = r * columns + c
                if i >= n:
                    break
                sheet.paste(images[v][i].resize((tile, tile)), (c * tile, y + label))
                words = prompts[i].replace(" background", "").replace("a ", "").split(" on ")
                draw.text((c * tile + 2, y + 1), f"{v}: {words[0]}", fill="black")
                draw.text((c * tile + 2, y + 11), f"on {words[-1]}", fill="black")
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())
