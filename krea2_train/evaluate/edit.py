"""Does an edit LoRA make the edit? The micro world's "make the shape red" (data/world.edit_pair), read from pixels.

Over `count` seeded references the LoRA never trained on, Turbo (8 steps, no CFG) samples the instruction with the
reference in context (models/reference.py, as previews and `sample --reference` do), with and without the LoRA. Each
output is read with evaluate/prompt_following.read_image (nearest world palette colour per pixel):

- flat: at least FLAT of the pixels are the read background or foreground colour, as in a world picture (the VAE
  round trip of a true target scores >= 0.95): a noisy, many-coloured output with some red in it is not an edit;
- edited: flat AND the foreground is the edit colour AND the background is the reference's (the scene was kept,
  not redrawn: a model that ignores the reference and draws a red shape on any background scores about 1 in 7);
- copied: flat and the reference came back unchanged (its foreground colour and background): no edit;
- shape_kept: among the edited, the foreground's shape reads as the reference's;
- target_agreement: mean share of pixels whose palette colour equals the true target's (position and size too).

No reference's shape or background is already the edit colour (world.edit_scene), so "edited" cannot be scored by
returning the input.
"""

from __future__ import annotations

import numpy as np
import torch

from krea2_train.data import world
from krea2_train.evaluate.prompt_following import PALETTE_NAMES, palette_classes, read_image

SEED = 4242  # not the demo data's (17) nor its preview inputs' (1017)
FLAT = 0.9


def references(count: int, seed: int = SEED, size: int = world.SIZE) -> list[world.EditPair]:
    return [world.edit_pair(seed, i, size) for i in range(count)]


@torch.no_grad()
def sample_edits(transformer, text_encoder, vae, pairs, settings, method: str = "index", batch: int = 16) -> list:
    """PIL outputs, output i sampled from noise seed i with pairs[i]'s reference and instruction."""
    from krea2_train.inference import prompt_noise, sample_latents
    from krea2_train.models.vae import to_pil

    out = []
    for start in range(0, len(pairs), batch):
        chunk = pairs[start:start + batch]
        embeds, mask = text_encoder.encode([p.instruction for p in chunk])
        neg = neg_mask = None
        if settings.guidance > 0:
            neg, neg_mask = text_encoder.encode([""] * len(chunk))
        refs = vae.encode(world.to_tensor([p.reference for p in chunk]))
        noise = prompt_noise(range(start, start + len(chunk)), settings.height, settings.width)
        latents = sample_latents(transformer, embeds, mask, settings, neg, neg_mask, noise=noise, references=[refs],
                                 reference_method=method)
        out += to_pil(vae.decode(latents))
    return out


def score(pairs, images) -> dict:
    """edit_rate, copy_rate, flat_rate, background_kept, shape_kept, target_agreement (module doc) of `images`."""
    reads = [read_image(im) for im in images]
    classes = [palette_classes(im) for im in images]
    flat = [np.isin(c, [PALETTE_NAMES.index(r.background), PALETTE_NAMES.index(r.foreground or r.background)]).mean()
            >= FLAT for c, r in zip(classes, reads)]
    bg = [r.background == p.scene.background for r, p in zip(reads, pairs)]
    edited = [f and b and r.foreground == world.EDIT_COLOUR for f, b, r in zip(flat, bg, reads)]
    copied = [f and b and r.foreground == p.scene.colour for f, b, r, p in zip(flat, bg, reads, pairs)]
    shape = [r.shape == p.scene.shape for e, r, p in zip(edited, reads, pairs) if e]
    agree = [(c == palette_classes(p.target)).mean() for c, p in zip(classes, pairs)]
    return {"count": len(pairs), "edit_rate": float(np.mean(edited)), "copy_rate": float(np.mean(copied)),
            "flat_rate": float(np.mean(flat)), "background_kept": float(np.mean(bg)),
            "shape_kept": float(np.mean(shape)) if shape else None, "target_agreement": float(np.mean(agree))}


def edit_rate(transformer, text_encoder, vae, lora=None, count: int = 32, seed: int = SEED, strength: float = 1.0,
              method: str = "index", size: int = 128, keep_images: bool = False) -> dict:
    """score() of Turbo `transformer` on `count` held-out references, with `lora` (file or state) at `strength`
    loaded for the call (and removed after), or alone when `lora` is None."""
    from krea2_train.inference import SampleSettings, apply_lora

    settings = SampleSettings.turbo(height=size, width=size)
    pairs = references(count, seed, size)  # the reference at the output's size, as training buckets it
    name = apply_lora(transformer, lora, strength=strength, adapter_name="edit_under_test") if lora else None
    try:
        images = sample_edits(transformer, text_encoder, vae, pairs, settings, method)
    finally:
        if name:
            transformer.delete_adapters([name])
    result = {"seed": seed, "steps": settings.steps, "size": size, "method": method, **score(pairs, images)}
    if keep_images:
        result["images"] = images
        result["references"] = [p.reference for p in pairs]
    return result


def save_sheet(references_, rows: dict, path, columns: int = 8) -> None:
    """A labelled sheet: per group of `columns` pairs, a row of inputs, then one row per entry of `rows`
    ({label: images})."""
    import io

    from PIL import Image, ImageDraw

    from krea2_train.utils.io import write_bytes_atomic

    tile, label = 128, 12
    groups = [("input", references_), *rows.items()]
    n = len(references_)
    blocks = (n + columns - 1) // columns
    sheet = Image.new("RGB", (columns * tile, blocks * len(groups) * (tile + label)), "white")
    draw = ImageDraw.Draw(sheet)
    for b in range(blocks):
        for gi, (name, images) in enumerate(groups):
            y = (b * len(groups) + gi) * (tile + label)
            for c in range(columns):
                i = b * columns + c
                if i >= n:
                    break
                sheet.paste(images[i].resize((tile, tile)), (c * tile, y + label))
                draw.text((c * tile + 2, y), f"{name} #{i}", fill="black")
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())
