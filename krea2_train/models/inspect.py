"""`krea2-train inspect` on a transformer checkpoint: its on-disk format, the precision of each layer group and
whether it is Raw or Turbo, read from the file's keys, dtypes and ComfyUI markers (nothing is dequantised)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from krea2_train import facts
from krea2_train.models.loading import detect_variant, open_safetensors, original_names, require_path
from krea2_train.models.quantized import QuantReader

GROUPS = (("blocks.", "transformer blocks"), ("txtfusion.", "text fusion"), ("txtmlp.", "text projection"),
          ("tmlp.", "timestep embedding"), ("tproj.", "timestep embedding"), ("first.", "input / output"),
          ("last.", "input / output"))


def is_transformer_checkpoint(path) -> bool:
    p = Path(path)
    if not p.is_file() or p.suffix != ".safetensors":
        return False
    _, keys = open_safetensors(p)
    return original_names(keys) is not None


def _precision(reader: QuantReader, handle, names, name: str) -> str:
    layer = name[: -len(".weight")] if name.endswith(".weight") else None
    conf = reader.layers.get(layer) if layer else None
    if conf is not None:
        fmt = str(conf.get("format"))
        params = conf.get("params") if isinstance(conf.get("params"), dict) else {}
        if fmt == "int8_tensorwise" and conf.get("convrot", params.get("convrot")):
            fmt += f" convrot/{conf.get('convrot_groupsize', params.get('convrot_groupsize', 256))}"
        return fmt
    dtype = str(handle.get_slice(names[name]).get_dtype()).lower()
    return {"bf16": "bf16", "f16": "fp16", "f32": "fp32", "f8_e4m3": "fp8 e4m3 (unmarked)",
            "f8_e5m2": "fp8 e5m2 (unmarked)", "i8": "int8 (unmarked)", "u8": "uint8 (unmarked)"}.get(dtype, dtype)


def inspect_checkpoint(path) -> dict:
    """{format, precision per layer group (counts of tensors), variant, readable} for a Krea 2 transformer file."""
    path = require_path(path, "transformer checkpoint")
    handle, keys = open_safetensors(path)
    names = original_names(keys)
    meta = handle.metadata() or {}
    reader = QuantReader(path, handle, names, meta)
    groups: dict[str, Counter] = {}
    for name in names:
        if reader.is_side(name):
            continue
        group = next((g for p, g in GROUPS if name.startswith(p)), "other")
        groups.setdefault(group, Counter())[_precision(reader, handle, names, name)] += 1
    formats = sorted({str(c.get("format")) for c in reader.layers.values()})
    if reader.layers:
        fmt = "ComfyUI quantised (" + ", ".join(formats) + ")" + (" legacy scaled_fp8" if reader.legacy else "")
    elif reader.scaled:
        fmt = "fp8 scaled (per-tensor scales, no ComfyUI markers)"
    else:
        fmt = "single file, " + ", ".join(sorted({p for c in groups.values() for p in c}))
    problem = None
    try:
        for name in names:
            if not reader.is_side(name) and name.endswith(".weight"):
                reader.weight(name)
    except Exception as exc:  # the loader's refusal, verbatim
        problem = str(exc)
    prefix = next((p for p in facts.ORIGINAL_PREFIXES if p + facts.KREA2_MARKER in keys), "")
    return {"path": str(path), "kind": "Krea 2 transformer", "format": fmt, "key_prefix": prefix or None,
            "variant": detect_variant(path, meta) or "unknown (name the file *raw* or *turbo*)",
            "precision": {g: dict(c) for g, c in groups.items()}, "loadable": problem is None, "problem": problem}


def format_checkpoint(info: dict) -> str:
    lines = [f"{info['path']}: {info['kind']}, {info['variant']}", f"  format: {info['format']}"]
    for group, counts in info["precision"].items():
        lines.append(f"  {group}: " + ", ".join(f"{n} x {p}" for p, n in sorted(counts.items())))
    lines.append("  loads: yes" if info["loadable"] else f"  loads: NO: {info['problem']}")
    return "\n".join(lines)


def block_weight_storage(path, sample: int = 16) -> tuple[str, list[str]]:
    """How a transformer file stores its blocks' Linear weights, as the training base would hold them:
    ("one_byte", formats) when they are fp8 / int8 (ConvRot or not) and stay 1 byte per weight
    (`load_transformer(keep_quantized=True)`), ("dequantised", formats) for nvfp4 / mxfp8 (expanded to the model
    dtype on load), ("plain", []) otherwise. Reads the first `sample` block weights (files are quantised uniformly)."""
    from krea2_train.models.loading import _block_linear_weight

    handle, keys = open_safetensors(Path(path))
    names = original_names(keys) or {}
    reader = QuantReader(Path(path), handle, names, handle.metadata() or {})
    formats, one_byte = set(), []
    for name in [n for n in names if _block_linear_weight(n) and not reader.is_side(n)][:sample]:
        q = reader.weight(name)
        if q is None:
            continue
        formats.add(q.format)
        one_byte.append(q.one_byte() is not None)
    if not formats:
        return "plain", []
    return ("one_byte" if all(one_byte) else "dequantised"), sorted(formats)
