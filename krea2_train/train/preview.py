"""Preview samples during training, through the shared inference core (krea2_train.inference), with fixed seeds:

    Raw   the training transformer with its current LoRA, `preview.raw_steps` steps, CFG `preview.raw_guidance`
    Turbo `model.turbo` + the current LoRA, 8 steps, no guidance (how the LoRA is deployed); or, with a Turbo LoRA
          as `preview.turbo`, Raw + that LoRA + the current LoRA (one base in memory, any memory setting or FSDP)

A PNG grid per step (rows: prompts, each under its prompt; columns: Turbo, Turbo + LoRA, Raw + LoRA) goes to
RUN/previews/step-NNNNNN.png and to the trackers.
Prompt embeddings are computed once and kept on the CPU; the text encoder is released right after, so training
never holds it. The VAE is loaded on the CPU and moved to the GPU only while decoding.

For Turbo, the training transformer's frozen base weights are overwritten in place with Turbo's, one tensor at a time,
and Raw's are read back afterwards (`runtime.swap.copy_base_weights`): no second 12.9B copy, at the cost of reading
both checkpoints once per preview (page cache). A quantised base cannot be overwritten; then Turbo is loaded beside
it for the preview (~26 GB more in bf16) and dropped after.
"""

from __future__ import annotations

import gc
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_EMBEDS: dict = {}


def prompt_embeddings(cfg):
    """(embeds, mask, negative embeds, negative mask) for the preview prompts; computed once per process."""
    key = (cfg.model.text_encoder, tuple(cfg.preview.prompts), cfg.preview.negative_prompt)
    if key not in _EMBEDS:
        from krea2_train.models.text_encoder import TextEncoder

        enc = TextEncoder.from_path(cfg.model.text_encoder, dtype="float32" if not torch.cuda.is_available()
                                    else "bfloat16", device="cuda" if torch.cuda.is_available() else "cpu",
                                    tokenizer=getattr(cfg.model, "tokenizer", None))
        emb, mask = enc.encode(list(cfg.preview.prompts))
        neg, neg_mask = enc.encode([cfg.preview.negative_prompt] * len(cfg.preview.prompts))
        _EMBEDS.clear()
        _EMBEDS[key] = tuple(t.cpu() for t in (emb, mask, neg, neg_mask))
        del enc
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return _EMBEDS[key]


_REFS: dict = {}


def preview_references(cfg):
    """(per prompt: [(1, 16, h, w) clean latent], PIL images) for preview.references (edit LoRAs), or (None, None).
    Each image is resized and centre-cropped to the preview size, as training puts a reference in its target's
    bucket; encoded once per process."""
    p = cfg.preview
    if not getattr(getattr(cfg, "data", None), "reference", False) or not getattr(p, "references", None):
        return None, None
    key = (cfg.model.vae, tuple(p.references), p.resolution)
    if key not in _REFS:
        import numpy as np

        from krea2_train.data.buckets import apply, place
        from krea2_train.data.images import open_image
        from krea2_train.models.vae import VAE

        vae = VAE.from_path(cfg.model.vae, dtype="float32", device="cuda" if torch.cuda.is_available() else "cpu")
        lats, images = [], []
        for path in p.references:
            img = open_image(Path(os.path.expanduser(path)).read_bytes(), path)
            img = apply(img, place(img.width, img.height, (p.resolution, p.resolution)))
            px = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1.0
            lats.append([vae.encode(px[None]).cpu()])
            images.append(img)
        del vae
        gc.collect()
        _REFS.clear()
        _REFS[key] = (lats, images)
    return _REFS[key]


def _method(cfg) -> str:
    return getattr(getattr(cfg, "train", None), "reference_method", "index")


def _decode(cfg, latents_list, device):
    from krea2_train.models.vae import VAE, to_pil

    vae = VAE.from_path(cfg.model.vae, dtype="float32", device=device)
    try:
        return [to_pil(vae.decode(lat)) for lat in latents_list]
    finally:
        del vae
        gc.collect()


@torch.no_grad()
def render_previews(cfg, transformer, run_dir, step: int, adapter_state: dict | None = None, peft_config=None,
                    write: bool = True):
    """Render the preview grid; returns {"preview": PIL image} (empty if there are no prompts).
    `write=False`: sample only (an FSDP process other than the main one joins the sampling; nothing decoded)."""
    from krea2_train.inference import SampleSettings
    from krea2_train.lora.workflow import embed_png_chunks, run_workflow_chunks
    from krea2_train.utils.grid import grid_image
    from krea2_train.utils.io import write_bytes_atomic

    p = cfg.preview
    if not p.prompts:
        return {}
    emb, mask, neg, neg_mask = prompt_embeddings(cfg)
    refs, ref_images = preview_references(cfg)
    method = _method(cfg)
    device = next(p_ for p_ in transformer.parameters()).device
    was_training = transformer.training
    transformer.eval()
    size = dict(height=p.resolution, width=p.resolution, seed=p.seed)
    raw_settings = SampleSettings.raw(steps=p.raw_steps, guidance=p.raw_guidance, **size)
    lat_raw = sample_each(transformer, emb, mask, raw_settings, neg, neg_mask, refs, method)
    transformer.train(was_training)
    latents, labels, lat_turbo = [], [], None
    from krea2_train.lora.turbo import preview_turbo_source

    source = preview_turbo_source(cfg)  # None, ("checkpoint", path) or ("lora", path)
    turbo_names = ("Turbo", "Turbo + LoRA")
    if source is not None and source[0] == "lora":
        transformer.eval()
        try:  # one base: Raw + the Turbo LoRA (+ the training LoRA); works however the base is held
            lat_turbo = _turbo_lora_latents(cfg, transformer, emb, mask, size, source[1], device, refs)
        finally:
            transformer.train(was_training)
        at = f"{p.turbo_lora_strength:g}"
        turbo_names = (f"Raw + Turbo LoRA {at}", f"Raw + Turbo LoRA {at} + LoRA")
        source = None
    if source is not None:
        transformer.eval()
        try:
            lat_turbo = _turbo_latents_swapped(cfg, transformer, emb, mask, size, source[1], refs)
        except TypeError:  # quantised base: only a separate Turbo copy works, if it fits
            lat_turbo = None
            if _second_copy_fits(transformer, device):
                lat_turbo = _turbo_latents(cfg, transformer, emb, mask, size, device, adapter_state, peft_config,
                                           source[1], refs)
            else:
                log.warning("preview: Turbo column skipped: the base is quantised (cannot swap weights in place) "
                            "and a second bf16 copy does not fit in free GPU memory; set preview.turbo to a Turbo LoRA "
                            "file (one base, e.g. from `krea2-train extract`), or false to silence this")
        finally:
            transformer.train(was_training)
    if p.turbo and lat_turbo is not None:
        base, lat_turbo = lat_turbo
        if base is not None:
            latents.append(base)
            labels.append(f"{turbo_names[0]}, {p.turbo_steps} steps")
        latents.append(lat_turbo)
        labels.append(f"{turbo_names[1]}, {p.turbo_steps} steps")
    # Raw last: the reference for what the LoRA should do, beside how it is deployed (Turbo with and without it)
    latents.append(lat_raw)
    labels.append(f"Raw + LoRA, {p.raw_steps} steps, CFG {p.raw_guidance:g}")
    if not write:
        return {}
    columns = _decode(cfg, latents, device)
    if ref_images:  # the input first, then what the LoRA makes of it
        columns, labels = [ref_images] + columns, ["Reference"] + labels
    grid = grid_image(columns, labels, row_labels=list(p.prompts))
    import io

    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    path = Path(run_dir) / "previews" / f"step-{step:06d}.png"
    # dragged onto ComfyUI, the picture opens the graph that makes its Turbo + LoRA column there
    # an edit LoRA's graph loads the first prompt's reference image (by file name, from ComfyUI's input folder)
    chunks = run_workflow_chunks(cfg, strength=1.0, prompt=p.prompts[0], width=p.resolution, height=p.resolution,
                                 seed=p.seed, references=[Path(p.references[0]).name] if ref_images else ())
    write_bytes_atomic(path, embed_png_chunks(buf.getvalue(), chunks))
    write_steps_grid(Path(run_dir) / "previews")
    log.info("preview: %s", path)
    return {"preview": grid}


def sample_each(model, emb, mask, settings, neg=None, neg_mask=None, refs=None, method: str = "index"):
    """Latents of each prompt sampled on its own (memory: one prompt at a time at full size), stacked; prompt i with
    refs[i] (edit LoRAs). Its noise is inference.prompt_noise's, as the transfer grid's, so the same prompt and seed
    give the same picture there."""
    from krea2_train.inference import prompt_noise, sample_latents

    def row(t, i):
        return t[i:i + 1] if t is not None else None

    return torch.cat([sample_latents(model, row(emb, i), row(mask, i), settings, row(neg, i), row(neg_mask, i),
                                     noise=prompt_noise([settings.seed], settings.height, settings.width),
                                     references=refs[i] if refs else None, reference_method=method)
                      for i in range(emb.shape[0])])


def _second_copy_fits(transformer, device) -> bool:
    if torch.device(device).type != "cuda":
        return True
    needed = sum(p.numel() for p in transformer.parameters()) * 2  # bf16 bytes
    free, _ = torch.cuda.mem_get_info(device)
    return free > 1.1 * needed


def _turbo_latents_swapped(cfg, transformer, emb, mask, size, turbo_path=None, refs=None):
    """Turbo + the current LoRA on the training transformer itself: base weights swapped to Turbo and back."""
    from krea2_train.inference import SampleSettings
    from krea2_train.runtime.swap import copy_base_weights

    turbo_path = turbo_path or cfg.model.turbo
    copy_base_weights(transformer, turbo_path)  # raises TypeError before touching anything if quantised
    try:
        settings = SampleSettings.turbo(steps=cfg.preview.turbo_steps, **size)
        return _with_and_without(transformer, emb, mask, settings, cfg, size, key=str(turbo_path), refs=refs)
    finally:
        copy_base_weights(transformer, cfg.model.transformer)  # back to Raw, bit for bit (same file, same dtype)


def _turbo_latents(cfg, transformer, emb, mask, size, device, adapter_state, peft_config, turbo_path=None,
                   refs=None):
    from peft import set_peft_model_state_dict

    from krea2_train.inference import SampleSettings
    from krea2_train.models.loading import load_transformer
    from krea2_train.train import lora as lora_mod

    m = cfg.model
    turbo_path = turbo_path or m.turbo
    turbo = load_transformer(turbo_path, dtype=m.dtype, device=device, architecture=m.architecture,
                             config_key="model.turbo")
    try:
        # Same module names on Raw and Turbo: the training adapter loads unchanged (what a user does with the export).
        config = peft_config if peft_config is not None else transformer.peft_config["default"]
        state = adapter_state if adapter_state is not None else lora_mod.adapter_state_dict(transformer)
        turbo.add_adapter(config)
        set_peft_model_state_dict(turbo, state)
        settings = SampleSettings.turbo(steps=cfg.preview.turbo_steps, **size)
        return _with_and_without(turbo, emb, mask, settings, cfg, size, key=str(turbo_path), refs=refs)
    finally:
        del turbo
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


_TURBO_LORAS: dict = {}


def _turbo_lora_latents(cfg, transformer, emb, mask, size, path, device, refs=None):
    """(Raw + Turbo LoRA, Raw + Turbo LoRA + the current LoRA): the Turbo LoRA stacked under the training adapter
    at `preview.turbo_lora_strength` (inference.stacked_lora) and removed after. The file is read once per run."""
    from krea2_train.inference import SampleSettings, stacked_lora
    from krea2_train.lora.turbo import TURBO_LORA_ADAPTER, read_turbo_lora

    if path not in _TURBO_LORAS:
        _TURBO_LORAS.clear()
        _TURBO_LORAS[path] = read_turbo_lora(path)  # LoRA factors + ComfyUI's .diff/.diff_b deltas
    strength = float(cfg.preview.turbo_lora_strength)
    settings = SampleSettings.turbo(steps=cfg.preview.turbo_steps, **size)
    turbo = _TURBO_LORAS[path]
    with stacked_lora(transformer, turbo, strength, TURBO_LORA_ADAPTER, device=device) as name:
        # a file of deltas only adds no adapter: "without the LoRA" is then all adapters off (the deltas stay)
        return _with_and_without(transformer, emb, mask, settings, cfg, size, key=f"{path}@{strength}",
                                 only=name if turbo.adapter is not None else None, refs=refs)


_TURBO_ALONE: dict = {}


def _with_and_without(model, emb, mask, settings, cfg, size, key: str = "", only: str | None = None, refs=None):
    """(Turbo latents without the LoRA, with it). Without it the result never changes during a run: sampled once
    (adapters disabled on the same model, or all but adapter `only`, the Turbo LoRA) and kept. `key` names the
    Turbo source in that cache."""
    def run():  # refs: per prompt its reference latents (edit LoRAs), else None
        return sample_each(model, emb, mask, settings, refs=refs, method=_method(cfg))

    from krea2_train.runtime.sharding import is_sharded

    if any(is_sharded(p) for p in model.parameters()):
        # FSDP2 keeps the requires_grad its unsharded parameters had when first gathered: toggling the adapters
        # here would leave the LoRA without gradients, so sharded runs show Turbo with the LoRA only
        return None, run()
    key = (key, tuple(cfg.preview.prompts), cfg.preview.turbo_steps, tuple(sorted(size.items())),
           tuple(getattr(cfg.preview, "references", ())) if refs else ())
    if key not in _TURBO_ALONE:
        from krea2_train.inference import _tuner_layers

        trainable = [p for p in model.parameters() if p.requires_grad]
        layers = _tuner_layers(model)
        active = [list(layer.active_adapters) for layer in layers]
        if only is None:
            model.disable_adapters()
        else:
            for layer in layers:
                layer.set_adapter([only])
        try:
            _TURBO_ALONE.clear()
            _TURBO_ALONE[key] = run().cpu()
        finally:
            if only is None:
                model.enable_adapters()
            else:
                for layer, names in zip(layers, active):
                    layer.set_adapter(names)
            for p in trainable:  # PEFT re-enables only the active adapter's weights; the rest of training's as well
                p.requires_grad_(True)
    return _TURBO_ALONE[key].to(next(model.parameters()).device), run()


def write_steps_grid(folder: Path, max_steps: int = 8) -> Path | None:
    """previews/over_steps.png: the step previews one under another, each headed by its step (the latest
    `max_steps`), so the whole run's progress is one picture."""
    import io

    from PIL import Image, ImageDraw

    from krea2_train.utils.grid import _font
    from krea2_train.utils.io import write_bytes_atomic

    files = sorted(folder.glob("step-*.png"))[-max_steps:]
    if not files:
        return None
    images = [Image.open(f).convert("RGB") for f in files]
    width, head = max(im.width for im in images), 22
    sheet = Image.new("RGB", (width, sum(im.height + head for im in images)), "white")
    draw, y = ImageDraw.Draw(sheet), 0
    for f, im in zip(files, images):
        draw.text((4, y + 3), f"step {int(f.stem.split('-')[1])}", fill="black", font=_font(15))
        sheet.paste(im, (0, y + head))
        y += im.height + head
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return write_bytes_atomic(folder / "over_steps.png", buf.getvalue())
