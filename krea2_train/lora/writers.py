"""Writing a `TrainedAdapter` in each layout lora/formats.py describes (diffusers, comfyui, civitai, original,
musubi), with the Civitai header from lora/civitai.py, and the diffusers-loader view of any readable file."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from krea2_train.lora.civitai import add_hashes, civitai_header  # noqa: F401  (civitai_header: public here too)
from krea2_train.lora.formats import (
    DIFFUSERS_META_KEY,
    DIFFUSERS_WEIGHT_NAME,
    FORMAT_ALIASES,
    FORMATS,
    LoraFile,
    LoraFormatError,
    TrainedAdapter,
    read_lora_file,
    read_lora_state,
)
from krea2_train.models.keys import diffusers_to_original_module


# --------------------------------------------------------------------------------------------------- writing
def normalize_format(fmt: str) -> str:
    fmt = FORMAT_ALIASES.get(fmt.lower(), fmt.lower())
    if fmt not in FORMATS:
        raise LoraFormatError(f"unknown LoRA format {fmt!r}; use one of {', '.join(FORMATS)} "
                              f"(aliases: {', '.join(FORMAT_ALIASES)})")
    return fmt


def lora_state_for_format(adapter: TrainedAdapter, fmt: str, comfyui_style: str = "alpha") -> tuple[dict, dict]:
    """(tensors, header) of `adapter` in layout `fmt`. Header values are strings or JSON-able objects."""
    fmt = normalize_format(fmt)
    tensors, header = {}, {}
    if fmt == "diffusers":
        # ComfyUI also loads transformer.<diffusers> lora_A/lora_B keys for Krea 2 but ignores the header (scale 1):
        # with the scale baked and alpha = rank in the header, diffusers, ComfyUI and every header-less reader apply
        # the same delta.
        baked = adapter.baked()
        tensors = baked.peft_state_dict(prefix="transformer.")
        cfg = {f"transformer.{k}": v for k, v in baked.lora_config_dict().items()}
        header = {"format": "pt", DIFFUSERS_META_KEY: json.dumps(cfg, indent=2, sort_keys=True)}
        return tensors, header
    if fmt == "original" or (fmt in ("comfyui", "civitai") and comfyui_style == "baked"):
        baked = adapter.baked()
        for m in baked.modules:
            orig = _original(m)
            tensors[f"diffusion_model.{orig}.lora_A.weight"] = baked.down[m]
            tensors[f"diffusion_model.{orig}.lora_B.weight"] = baked.up[m]
        return tensors, header
    if comfyui_style not in ("alpha", "baked"):
        raise LoraFormatError(f"comfyui_style must be 'alpha' or 'baked', not {comfyui_style!r}")
    alphas = adapter.kohya_alphas()
    for m in adapter.modules:
        orig = _original(m)
        base = f"lora_unet_{orig.replace('.', '_')}" if fmt == "musubi" else f"diffusion_model.{orig}"
        tensors[f"{base}.lora_down.weight"] = adapter.down[m]
        tensors[f"{base}.lora_up.weight"] = adapter.up[m]
        tensors[f"{base}.alpha"] = torch.tensor(alphas[m], dtype=torch.float32)
    return tensors, header


def bakes_scale(fmt: str, comfyui_style: str = "alpha") -> bool:
    """Whether layout `fmt` carries the scale in the weights (alpha = rank) rather than in `.alpha` tensors."""
    return fmt in ("diffusers", "original") or (fmt in ("comfyui", "civitai") and comfyui_style == "baked")


def _original(module: str) -> str:
    orig = diffusers_to_original_module(module)
    if orig is None:
        raise LoraFormatError(f"module {module} has no original Krea 2 name; it cannot be written for ComfyUI")
    return orig


def write_lora_file(adapter: TrainedAdapter, path, fmt: str, dtype="bfloat16", metadata: dict | None = None,
                    comfyui_style: str = "alpha", preview_png: bytes | None = None) -> Path:
    """Write `adapter` to `path` in layout `fmt`, atomically. `dtype` applies to lora weights (None keeps theirs).

    `metadata` (training info: name, trigger_words, resolution, steps, dataset_size, ...) goes into the header as
    `krea2_train.info`, and for civitai also as `modelspec.*` / `ss_*` keys.
    """
    from krea2_train.utils.io import save_safetensors_atomic

    fmt = normalize_format(fmt)
    if bakes_scale(fmt, comfyui_style):
        adapter = adapter.baked()  # in the adapter's precision, before rounding to `dtype` (baking again is exact)
    if dtype is not None:
        adapter = adapter.to(dtype)
    tensors, header = lora_state_for_format(adapter, fmt, comfyui_style)
    info = {**adapter.info, **(metadata or {})}
    header["krea2_train.format"] = fmt
    header["krea2_train.base_model"] = "krea-2-raw"
    if info:
        header["krea2_train.info"] = json.dumps(info, sort_keys=True, default=str)
    if fmt == "civitai":  # ss_network_alpha describes the file as written: baked files have alpha = dim
        header.update(civitai_header(adapter.baked() if comfyui_style == "baked" else adapter, info, preview_png))
        header = add_hashes(tensors, header)  # over the tensors exactly as written (after the dtype cast)
    path = Path(path)
    if fmt == "diffusers" and (path.is_dir() or not path.suffix):
        path = path / DIFFUSERS_WEIGHT_NAME
    return save_safetensors_atomic(tensors, path, metadata=header)  # 0644: ComfyUI may run as another user


# --------------------------------------------------------------------------------------------------- for diffusers
def read_lora_for_diffusers(path_or_state, header: dict | None = None) -> tuple[dict, dict]:
    """Any supported LoRA (path, or state dict) -> (state dict `transformer.<module>.lora_A/B.weight`, metadata).

    The metadata is the PEFT config with `transformer.`-prefixed keys, as diffusers'
    `Krea2Transformer2DModel.load_lora_adapter(state, prefix="transformer", metadata=metadata)` expects; it
    reproduces every module's rank and scale, whatever the file carried (alpha tensors, header or nothing).
    """
    if isinstance(path_or_state, dict):
        lora = read_lora_state(path_or_state, header)
    elif isinstance(path_or_state, LoraFile):
        lora = path_or_state
    elif isinstance(path_or_state, TrainedAdapter):
        return adapter_for_diffusers(path_or_state)
    else:
        lora = read_lora_file(path_or_state)
    return adapter_for_diffusers(lora.adapter)


def adapter_for_diffusers(adapter: TrainedAdapter) -> tuple[dict, dict]:
    state = adapter.peft_state_dict(prefix="transformer.")
    metadata = {f"transformer.{k}": v for k, v in adapter.lora_config_dict().items()}
    return state, metadata
