"""The `memory:` section: how the frozen base is stored and run (runtime/ applies it). One type for the YAML section
and for the resolved settings: null fields take the preset's value, and `resolve_memory_settings` fills them.

    settings = resolve_memory_settings(cfg.memory)        # a MemorySettings with every field set
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from krea2_train.config.choices import choice

QUANT_MODES = ("none", "int8", "nf4", "fp8")
# SDPA kernels (runtime/speed.py maps them to torch's); "diffusers:<name>" routes through diffusers' dispatcher.
SDPA_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math", "torch")  # torch: its own choice

# Sized for the 12.9B model at 1024 px, batch 1, rank 32 (bf16 weights 26 GB, int8 13 GB, nf4 ~7 GB; one block's
# activations without checkpointing ~1.3 GB). Estimates in BENCHMARKS.md (scripts/estimate_memory.py).
PRESETS: dict[str, dict[str, Any]] = {
    "80gb": dict(quantize="none", gradient_checkpointing=False, checkpoint_blocks=None, offload_blocks=False,
                 fuse_qkv=True, compile=True, optimizer_8bit=False),
    "48gb": dict(quantize="none", gradient_checkpointing=True, checkpoint_blocks=16, offload_blocks=False,
                 fuse_qkv=True, compile=True, optimizer_8bit=False),
    "24gb": dict(quantize="int8", gradient_checkpointing=True, checkpoint_blocks=None, offload_blocks=False,
                 fuse_qkv=False, compile=False, optimizer_8bit=True),
    "16gb": dict(quantize="nf4", gradient_checkpointing=True, checkpoint_blocks=None, offload_blocks=True,
                 fuse_qkv=False, compile=False, optimizer_8bit=True),
}
# Values of the fields that neither the YAML nor the preset sets.
DEFAULTS: dict[str, Any] = dict(quantize="none", gradient_checkpointing=True, offload_blocks=False, fuse_qkv=False,
                                compile=False, optimizer_8bit=False, fp8_matmul=False, trim_text_padding=True,
                                share_lora_input=True, attention_backend="auto")


@dataclass
class MemorySettings:
    # 80gb | 48gb | 24gb | 16gb: tested settings for that much GPU memory (explicit fields below win).
    preset: Optional[str] = choice(None, (*PRESETS, None))
    # Frozen base weights quantised for training.
    quantize: Optional[str] = choice(None, (*QUANT_MODES, None))
    gradient_checkpointing: Optional[bool] = None
    # How many blocks to checkpoint (null: all).
    checkpoint_blocks: Optional[int] = None
    offload_blocks: Optional[bool] = None
    # Fuse q/k/v for training only; exports are always unfused.
    fuse_qkv: Optional[bool] = None
    compile: Optional[bool] = None
    # SDPA backend for attention (auto: fastest available), or diffusers:<backend name>.
    attention_backend: Optional[str] = None
    # Drop text padding per batch (same result, fewer tokens).
    trim_text_padding: Optional[bool] = None
    # Under bf16 autocast, LoRA layers share their bf16 input instead of an fp32 copy each (same result, less memory;
    # see runtime/speed.share_lora_input).
    share_lora_input: Optional[bool] = None
    # 8-bit AdamW states when optimizer.name is adamw (the 24gb/16gb presets' choice).
    optimizer_8bit: Optional[bool] = None
    # quantize=fp8 only: fp8 tensor-core forward matmul (torch._scaled_mm) instead of dequantising.
    fp8_matmul: Optional[bool] = None


def memory_problems(m: MemorySettings) -> list[tuple[str, str]]:
    """(key, message) for each impossible value; the choices are checked with the other sections'."""
    problems = []
    if m.checkpoint_blocks is not None and m.checkpoint_blocks < 0:
        problems.append(("memory.checkpoint_blocks", "must be >= 0 or null (all blocks)"))
    backend = m.attention_backend
    if backend is not None and backend not in SDPA_BACKENDS and not str(backend).startswith("diffusers:"):
        problems.append(("memory.attention_backend", f"= {backend!r}: use one of {', '.join(SDPA_BACKENDS)} or "
                                                      "diffusers:<backend> (e.g. diffusers:_flash_3_hub)"))
    return problems


def resolve_memory_settings(cfg: Any = None, **overrides) -> MemorySettings:
    """A preset (if named) with every explicitly set (non-None) field of `cfg` on top, and the defaults under both.

    `cfg`: a MemorySettings, a dict of its fields or None. Raises ValueError naming the key for a bad value.
    """
    values = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg or {})
    values.update(overrides)
    known = {f.name for f in dataclasses.fields(MemorySettings)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown memory settings {sorted(unknown)}; known: {sorted(known)}")
    merged: dict[str, Any] = {}
    preset = values.get("preset")
    if preset is not None:
        key = str(preset).lower()
        if key not in PRESETS:
            raise ValueError(f"memory.preset={preset!r}: use one of {sorted(PRESETS)} or null")
        merged.update(PRESETS[key], preset=key)
    merged.update({k: v for k, v in values.items() if v is not None})
    for k, v in DEFAULTS.items():
        if merged.get(k) is None:
            merged[k] = v
    settings = MemorySettings(**{k: merged.get(k) for k in known})
    if settings.quantize not in QUANT_MODES:
        raise ValueError(f"memory.quantize={settings.quantize!r}: use one of {QUANT_MODES}")
    for key, msg in memory_problems(settings):
        raise ValueError(f"config key `{key}` {msg}")
    return settings
