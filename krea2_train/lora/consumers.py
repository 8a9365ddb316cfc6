"""How each program a user hands a LoRA file to reads it, so `verify` can check a file the way that program does.

Three consumers read our files, and they disagree on where the scale lives:

    krea2-train  every layout lora/formats.py reads (alpha from `.alpha` tensors, the header or adapter_config.json)
    diffusers    `Krea2Pipeline.load_lora_weights`: transformer.<diffusers> or diffusion_model./base_model.model.
                 <original> with lora_A/lora_B; the scale comes from the header `lora_adapter_metadata` (PEFT
                 config), else alpha = rank. verify loads the file through diffusers itself (export/verify.py).
    comfyui      `comfy.sd.load_lora_for_models` (LoraLoaderModelOnly): `comfy.lora.model_lora_keys_unet` maps key
                 names to checkpoint weights, `comfy.lora.load_lora` reads each mapped module. It never looks at the
                 header: the scale is `.alpha` / rank when a `.alpha` tensor exists, else 1 (no rsLoRA, no PEFT
                 config). Keys it cannot map are only logged ("lora key not loaded") and do nothing.

`comfyui_reading` re-states ComfyUI's rules (read from its source; no ComfyUI code is used) so a file that ComfyUI
would load at another strength than diffusers fails verification instead of passing on the header.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from krea2_train.lora.formats import _FLAT_DIFF, _FLAT_ORIG, _FLAT_STANDALONE, TrainedAdapter, _unflatten
from krea2_train.models.keys import diffusers_to_original_module, original_to_diffusers_module

CONSUMERS = ("krea2-train", "diffusers", "comfyui")

# Which consumers each export format is written for: export_and_verify fails a file that one of them misreads.
FORMAT_CONSUMERS = {
    "diffusers": ("krea2-train", "diffusers", "comfyui"),  # scale baked, so ComfyUI's scale 1 is right too
    "original": ("krea2-train", "diffusers", "comfyui"),
    "comfyui": ("krea2-train", "comfyui"),  # .alpha tensors: diffusers' loader refuses them (loudly)
    "civitai": ("krea2-train", "comfyui"),
    "musubi": ("krea2-train", "comfyui"),
}

# ComfyUI's LoRA module prefixes for a Krea 2 model (comfy/lora.py model_lora_keys_unet + its Krea2 branch): the
# generic `diffusion_model.<checkpoint weight>` and kohya `lora_unet_<weight, dots as _>` names, and for the
# diffusers names `diffusion_model.`, `transformer.`, `lycoris_<dots as _>` and no prefix. Notably NOT mapped:
# `model.diffusion_model.` and `base_model.model.` (ai-toolkit): ComfyUI ignores such files.
_ADAPTER_KEYS = (  # (up, down) suffixes ComfyUI's LoRAAdapter.load tries, in its order
    (".lora_up.weight", ".lora_down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora_B.default.weight", ".lora_A.default.weight"),
)


def _comfyui_module(key_module: str) -> str | None:
    """The diffusers module a ComfyUI key-map entry (`key_module`: a LoRA key without its weight suffix) patches."""
    if key_module.startswith("lora_unet_"):  # flattened checkpoint names only (no diffusers names here)
        flat = key_module[len("lora_unet_"):]
        if _FLAT_ORIG.match(flat) or flat in _FLAT_STANDALONE:
            orig = _unflatten(flat)
            return original_to_diffusers_module(orig) if orig else None
        return None
    if key_module.startswith("lycoris_"):  # flattened diffusers names only
        flat = key_module[len("lycoris_"):]
        if _FLAT_DIFF.match(flat):
            return _unflatten(flat)
        std = _unflatten(flat)
        return std if std and diffusers_to_original_module(std) is not None else None
    name = key_module[len("diffusion_model."):] if key_module.startswith("diffusion_model.") else key_module
    if key_module.startswith("transformer."):
        name = key_module[len("transformer."):]
        return _diffusers_name(name)
    # diffusion_model.<original> / diffusion_model.<diffusers> / bare <diffusers>. A bare original name is not mapped
    # (ComfyUI's generic entry keeps the `diffusion_model.` of the checkpoint key).
    if key_module.startswith("diffusion_model."):
        mapped = original_to_diffusers_module(name)
        if mapped is not None:
            return mapped
    return _diffusers_name(name)


def _diffusers_name(name: str) -> str | None:
    name = re.sub(r"\.attn\.to_out$", ".attn.to_out.0", name)  # krea2_to_diffusers also maps to_out without .0
    return name if diffusers_to_original_module(name) is not None else None


@dataclass
class ComfyUIReading:
    """What ComfyUI would patch: `adapter` (alpha = the `.alpha` tensor or rank, scale alpha / rank, no rsLoRA; None
    when no key maps) and the keys it would leave unloaded (each logged by ComfyUI, otherwise silent)."""

    adapter: TrainedAdapter | None
    unloaded: list = field(default_factory=list)
    unreadable: list = field(default_factory=list)  # adapter kinds we do not model (DoRA, LoKr ...): no verdict


def comfyui_reading(state: dict) -> ComfyUIReading:
    """Read a LoRA state dict (the file's tensors; the header plays no part) as ComfyUI's loader does for Krea 2."""
    modules: dict[str, str] = {}  # key-map entry (key without weight suffix) -> diffusers module
    for key in state:
        for up_suffix, _ in _ADAPTER_KEYS:
            if key.endswith(up_suffix):
                base = key[: -len(up_suffix)]
                mapped = _comfyui_module(base)
                if mapped is not None:
                    modules.setdefault(base, mapped)
    down, up, alpha, loaded = {}, {}, {}, set()
    unreadable = [k for k in state if any(s in k for s in (".dora_scale", ".lokr_", ".hada_", ".lora_mid"))]
    for base, module in modules.items():
        for up_suffix, down_suffix in _ADAPTER_KEYS:  # the first pattern present wins, as in LoRAAdapter.load
            if base + up_suffix in state:
                if base + down_suffix not in state:
                    break  # ComfyUI would raise a KeyError: nothing of this module loads
                if module in down:  # two keys patch one weight: ComfyUI keeps the later one, a mixed file
                    unreadable.append(base + up_suffix)
                a, b = state[base + down_suffix], state[base + up_suffix]
                down[module], up[module] = a, b
                loaded.update({base + up_suffix, base + down_suffix})
                if base + ".alpha" in state:
                    # comfy: alpha = lora[alpha].item(); scale = alpha / mat2.shape[0] (the down factor's rows)
                    alpha[module] = float(state[base + ".alpha"].reshape(-1)[0].item())
                    loaded.add(base + ".alpha")
                else:
                    alpha[module] = float(a.shape[0])  # no alpha: scale 1.0
                break
    unloaded = sorted(k for k in state if k not in loaded and k not in unreadable)
    if not down:
        return ComfyUIReading(None, unloaded, unreadable)
    ok = {m for m in down if down[m].ndim == 2 and up[m].ndim == 2 and down[m].shape[0] == up[m].shape[1]}
    adapter = TrainedAdapter({m: down[m] for m in ok}, {m: up[m] for m in ok}, {m: alpha[m] for m in ok},
                             use_rslora=False)
    return ComfyUIReading(adapter, unloaded, unreadable)


def comfyui_strength_ratios(reading: ComfyUIReading, expected: TrainedAdapter) -> dict[str, float]:
    """{module: ComfyUI's scale / the trained scale} for modules whose factors are the trained ones up to a scale
    (the measure of a scale lost or doubled; 1.0 is right). Modules whose factors differ otherwise are left out."""
    out = {}
    if reading.adapter is None:
        return out
    for m in expected.modules:
        if m in reading.adapter.down:
            got = reading.adapter.delta(m, torch.float64)
            want = expected.delta(m, torch.float64)
            den = (want * want).sum().item()
            if den > 0:
                out[m] = (got * want).sum().item() / den
    return out


def comfyui_verdict(state: dict, intended: TrainedAdapter) -> tuple[bool | None, str]:
    """(exact?, one line) for how ComfyUI applies `state` compared with `intended` (the adapter as diffusers and
    krea2-train read the same file, header included). None: ComfyUI loads nothing of it."""
    reading = comfyui_reading(state)
    if reading.unreadable:
        return None, f"not checked (weights this check does not model: {reading.unreadable[:2]})"
    if reading.adapter is None:
        return None, f"no: no key maps to a Krea 2 weight there (e.g. {reading.unloaded[:2]}); ComfyUI applies nothing"
    missing = [m for m in intended.modules if m not in reading.adapter.down]
    if missing or reading.unloaded:
        return False, (f"only in part: {len(missing)} modules unpatched, {len(reading.unloaded)} tensors unloaded "
                       f"(e.g. {(missing + reading.unloaded)[:2]})")
    ratios = comfyui_strength_ratios(reading, intended)
    if not ratios:  # every delta is zero (an untrained LoRA): there is no strength to get wrong
        return True, "yes (every delta is zero)"
    lo, hi = min(ratios.values()), max(ratios.values())
    if abs(lo - 1) < 1e-3 and abs(hi - 1) < 1e-3:
        return True, "yes, at the trained strength"
    span = f"x{lo:.3g}" + (f" to x{hi:.3g}" if hi - lo > 1e-3 else "")
    return False, (f"at the WRONG strength: {span} of what diffusers applies (ComfyUI ignores the header); "
                   "convert it with `krea2-train convert FILE OUT --format diffusers` (scale baked)")


# ----------------------------------------------------------------------------------------------- DoRA and LoKr
# ComfyUI's weight maths for every adapter kind we write (comfy/lora.py load_lora + calculate_weight,
# comfy/weight_adapter/lora.py, lokr.py, base.py weight_decompose), on the base weight itself: DoRA's result
# depends on W, so these rules give patched weights, not deltas. ComfyUI computes in its LoRA compute dtype
# (float32; float16 on GPUs where it prefers fp16, where weight_decompose's eps is then finfo(float16).eps).
_LOKR_KEYS = (".lokr_w1", ".lokr_w1_a", ".lokr_w2", ".lokr_w2_a")
_LOKR_PARTS = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def comfyui_weight_decompose(dora_scale, weight, lora_diff, alpha, strength, eps):
    """comfy.weight_adapter.base.weight_decompose (function = identity): DoRA as ComfyUI applies it.

    dora_scale (out, 1) selects the output axis, where the norm is that of the BASE weight (ComfyUI's rule); any
    other shape the input axis, normed over the adapted weight's columns. Strength s: W + s * (W_c - W)."""
    weight_calc = weight + lora_diff * alpha
    if dora_scale.shape[0] == weight_calc.shape[0]:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(weight.shape[0], *[1] * (weight.dim() - 1))
    else:
        wt = weight_calc.transpose(0, 1)
        norm = wt.reshape(wt.shape[0], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(wt.shape[0], *[1] * (wt.dim() - 1)).transpose(0, 1)
    weight_calc = weight_calc * (dora_scale.to(weight.dtype) / (norm + eps))
    if strength != 1.0:
        return weight + strength * (weight_calc - weight)
    return weight_calc


@dataclass
class ComfyUIPatch:
    """What ComfyUI does to each base weight: `weights` {diffusers module: patched W}, `kinds` {module: "lora" |
    "lokr" | "dora" | "lokr+dora"}, and the keys it logs as "lora key not loaded" (they do nothing)."""

    weights: dict
    kinds: dict
    unloaded: list = field(default_factory=list)


def comfyui_patch(state: dict, base_weights: dict, strength: float = 1.0, dtype=torch.float32) -> ComfyUIPatch:
    """Patch `base_weights` {diffusers module: W (out, in)} with the LoRA/LoKr/DoRA file `state` by ComfyUI's rules
    (header not read; strength = LoraLoaderModelOnly's strength_model), computing in `dtype` as ComfyUI does."""
    eps = torch.finfo(dtype).eps
    bases: dict[str, str] = {}
    for key in state:
        for suffix in tuple(up for up, _ in _ADAPTER_KEYS) + _LOKR_KEYS:
            if key.endswith(suffix):
                mapped = _comfyui_module(key[: -len(suffix)])
                if mapped is not None:
                    bases.setdefault(key[: -len(suffix)], mapped)
    weights, kinds, loaded = {}, {}, set()
    for base, module in bases.items():
        if module not in base_weights:
            continue  # the model has no such weight: ComfyUI's key map has no entry, nothing loads
        alpha = None
        if base + ".alpha" in state:
            alpha = state[base + ".alpha"].item()  # load_lora: lora[alpha_name].item()
            loaded.add(base + ".alpha")
        dora_scale = state.get(base + ".dora_scale")
        if dora_scale is not None:
            loaded.add(base + ".dora_scale")
            dora_scale = dora_scale.to(dtype)
        w = base_weights[module].to(dtype).clone()
        lokr = {p: state[f"{base}.{p}"].to(dtype) for p in _LOKR_PARTS if f"{base}.{p}" in state}
        if lokr:  # LoKrAdapter comes after LoRAAdapter in weight_adapter.adapters: it wins when both load
            loaded.update(f"{base}.{p}" for p in lokr)
            dim = None
            w1 = lokr.get("lokr_w1")
            if w1 is None:
                dim = lokr["lokr_w1_b"].shape[0]
                w1 = lokr["lokr_w1_a"] @ lokr["lokr_w1_b"]
            w2 = lokr.get("lokr_w2")
            if w2 is None:
                dim = lokr["lokr_w2_b"].shape[0]
                w2 = lokr["lokr_w2_a"] @ lokr["lokr_w2_b"]  # (lokr_t2, Tucker, is conv-only)
            scale = alpha / dim if alpha is not None and dim is not None else 1.0
            diff = torch.kron(w1, w2).reshape(w.shape)
            kind = "lokr"
        else:
            for up_suffix, down_suffix in _ADAPTER_KEYS:
                if base + up_suffix in state:
                    break
            else:
                continue
            mat1, mat2 = state[base + up_suffix].to(dtype), state[base + down_suffix].to(dtype)
            loaded.update({base + up_suffix, base + down_suffix})
            scale = alpha / mat2.shape[0] if alpha is not None else 1.0
            diff = (mat1.flatten(start_dim=1) @ mat2.flatten(start_dim=1)).reshape(w.shape)
            kind = "lora"
        if dora_scale is not None:
            w = comfyui_weight_decompose(dora_scale, w, diff, scale, strength, eps)
            kind = "lokr+dora" if kind == "lokr" else "dora"
        else:
            w = w + (strength * scale) * diff
        weights[module], kinds[module] = w, kind
    return ComfyUIPatch(weights, kinds, sorted(k for k in state if k not in loaded))
