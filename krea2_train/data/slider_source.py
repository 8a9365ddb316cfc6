"""What a concept-slider run (train.mode: slider) trains on: the slider prompts' text embeddings and, for slider
targets with `images`, those images' latents. Both are cached like a dataset's captions and latents
(data/cache.py: content-addressed safetensors entries under cache_dir, written atomically, shared across runs).

A slider batch (train/slider.py reads it) is one slider target, repeated `batch_size` times with different noise:
    slider              index into train.sliders
    target, positive, negative   (B, L, 12, D) text-encoder taps of that target's three prompts (no padding)
    anchor              (B, L, 12, D) one of its anchor prompts, or None when it has none
    latents             (B, 16, h, w) normalised starting latents from its `images`, or None (pure noise)
    latent_shape        (B, 16, h, w) of the stage's resolution (what the noise is drawn at)
    guidance, anchor_weight      floats from the slider target
Every batch is a pure function of (seed, stage, micro-step, process), so a resumed run sees the same batches.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def slider_prompts(sliders) -> list[str]:
    """Every prompt the sliders use (targets, directions, anchors), each once, in config order."""
    out: list[str] = []
    for s in sliders:
        for p in (s.target, s.positive, s.negative, *s.anchors):
            if p not in out:
                out.append(p)
    return out


def cache_slider_texts(cfg, text_encoder=None) -> dict[str, torch.Tensor]:
    """{prompt: (L, 12, D) float32 valid-token embeddings} for every slider prompt, from the text cache (the main
    process encodes what is missing; the text encoder loads only then)."""
    from safetensors.torch import load_file

    from krea2_train.data.cache import (
        _release,
        _save_entry,
        _state,
        entry_path,
        entry_valid,
        resolve_encoder_dtype,
        text_fingerprint,
        text_key,
    )

    state = _state()
    cache_dir = Path(os.path.expanduser(str(cfg.cache_dir)))
    dtype = resolve_encoder_dtype(cfg.data.encoder_dtype, state.device)
    fp = text_fingerprint(cfg.model.text_encoder, dtype)
    prompts = slider_prompts(cfg.train.sliders)
    keys = {p: text_key(p, fp) for p in prompts}
    todo = [p for p in prompts if not entry_valid(entry_path(cache_dir, "text", keys[p]), keys[p])]
    if todo and state.is_main_process:
        log.info("slider text cache: %d of %d prompts to encode", len(todo), len(prompts))
        owned = text_encoder is None
        if owned:
            from krea2_train.models.text_encoder import TextEncoder

            text_encoder = TextEncoder.from_path(cfg.model.text_encoder, dtype=dtype, device=state.device,
                                                 tokenizer=getattr(cfg.model, "tokenizer", None))
        for p in todo:
            t = text_encoder.encode_one(p).cpu()
            _save_entry(entry_path(cache_dir, "text", keys[p]), "text", t,
                        {"key": keys[p], "caption": p, "length": t.shape[0], "encoder": fp})
        text_encoder = None
        if owned:
            _release()
    state.wait_for_everyone()
    return {p: load_file(str(entry_path(cache_dir, "text", keys[p])))["text"].float() for p in prompts}


def _centre_square(path: Path, resolution: int) -> torch.Tensor:
    """(3, r, r) in [-1, 1]: the image's centre square resized to the stage resolution."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.LANCZOS)
        arr = np.asarray(im, dtype=np.float32)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1) / 127.5 - 1.0


def cache_slider_latents(cfg, folder, resolution: int, vae=None) -> torch.Tensor:
    """(N, 16, r/8, r/8) normalised latents of the images in `folder` (centre square at `resolution`), cached."""
    import hashlib

    from safetensors.torch import load_file

    from krea2_train.data.cache import (
        _release,
        _save_entry,
        _sha,
        _state,
        entry_path,
        entry_valid,
        resolve_encoder_dtype,
        vae_fingerprint,
    )
    from krea2_train.data.images import IMAGE_EXTENSIONS
    from krea2_train.errors import UserError

    state = _state()
    cache_dir = Path(os.path.expanduser(str(cfg.cache_dir)))
    files = sorted(p for p in Path(str(folder)).expanduser().rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise UserError(f"train.sliders images folder {folder} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))})"
                        "; add some or set images: null to start from pure noise")
    dtype = resolve_encoder_dtype(cfg.data.encoder_dtype, state.device)
    fp = vae_fingerprint(cfg.model.vae, dtype)
    keys = [_sha({"slider_image": hashlib.sha256(f.read_bytes()).hexdigest(), "resolution": int(resolution),
                  "crop": "centre-square", "enc": fp}) for f in files]
    todo = [(f, k) for f, k in zip(files, keys) if not entry_valid(entry_path(cache_dir, "latents", k), k)]
    if todo and state.is_main_process:
        owned = vae is None
        if owned:
            from krea2_train.models.vae import VAE

            vae = VAE.from_path(cfg.model.vae, dtype=dtype, device=state.device)
        for f, k in todo:
            z = vae.encode(_centre_square(f, resolution)[None])[0]
            _save_entry(entry_path(cache_dir, "latents", k), "latent", z, {"key": k, "image": str(f),
                                                                         "resolution": resolution, "encoder": fp})
        vae = None
        if owned:
            _release()
    state.wait_for_everyone()
    return torch.stack([load_file(str(entry_path(cache_dir, "latents", k)))["latent"].float() for k in keys])


def prepare_slider_cache(cfg) -> dict[str, torch.Tensor]:
    """Every slider cache entry the run needs (texts; image latents at each stage resolution); returns the texts."""
    from krea2_train.data.source import stage_resolutions

    texts = cache_slider_texts(cfg)
    for s in cfg.train.sliders:
        if s.images:
            for r in stage_resolutions(cfg):
                cache_slider_latents(cfg, s.images, r)
    return texts


class SliderData:
    """The trainer's batch source in slider mode (see the module docstring for a batch's keys)."""

    def __init__(self, cfg, accelerator=None, texts: dict | None = None):
        self.cfg = cfg
        self.sliders = list(cfg.train.sliders)
        self.texts = texts if texts is not None else cache_slider_texts(cfg)
        self._latents: dict = {}

    def _latents_of(self, index: int, resolution: int) -> torch.Tensor | None:
        folder = self.sliders[index].images
        if not folder:
            return None
        if (index, resolution) not in self._latents:
            self._latents[(index, resolution)] = cache_slider_latents(self.cfg, folder, resolution)
        return self._latents[(index, resolution)]

    def _text(self, prompt: str, b: int) -> torch.Tensor:
        return self.texts[prompt][None].expand(b, -1, -1, -1)

    def batch(self, index: int, resolution: int, b: int, g: torch.Generator) -> dict:
        s = self.sliders[index]
        side = resolution // 8
        out = {"slider": index, "guidance": float(s.guidance), "anchor_weight": float(s.anchor_weight),
               "latent_shape": (b, 16, side, side), "anchor": None, "latents": None}
        for name in ("target", "positive", "negative"):
            out[name] = self._text(getattr(s, name), b)
        if s.anchors:  # one anchor per step (as ai-toolkit's slider job): the cost stays that of one extra prompt
            out["anchor"] = self._text(s.anchors[int(torch.randint(len(s.anchors), (1,), generator=g))], b)
        lat = self._latents_of(index, resolution)
        if lat is not None:
            out["latents"] = lat[torch.randint(len(lat), (b,), generator=g)]
        return out

    def stage_batches(self, stage_index, stage, start, seed, process_index=0, num_processes=1, global_offset=0):
        i = start
        while True:
            g = torch.Generator().manual_seed((seed * 1_000_003 + stage_index * 7_919 + i * 104_729
                                               + process_index * 15_485_863) % (2**63))
            index = int(torch.randint(len(self.sliders), (1,), generator=g))
            yield self.batch(index, stage.resolution, stage.batch_size, g)
            i += 1

    def validation_batches(self, stage):
        return None  # a slider has no held-out data; its check is the strength sweep (previews, transfer report)
