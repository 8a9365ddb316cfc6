"""The Turbo LoRA: Turbo minus Raw as a low-rank file (Comfy-Org's `krea2_turbo_lora_rank_64_bf16.safetensors`, or
`krea2-train extract RAW TURBO`). Applied to Raw it samples like Turbo, so previews and `sample` need one base in
memory instead of swapping or holding a second 12.9B checkpoint.

    kind = transformer_file_kind(path, "preview.turbo")   # "checkpoint" | "lora"; anything else is refused
    with stacked_lora(transformer, path, strength):        # krea2_train.inference: under the active adapters
        ...

What a file is, is read from its tensors (never its name): a Krea 2 checkpoint has the text-fusion projector
(`facts.KREA2_MARKER`), a LoRA has only lora_A/lora_B (lora_down/lora_up, `.alpha`) tensors, and, in ComfyUI's LoRA
format, full-weight deltas: `<key>.diff` (weight += strength * diff, e.g. norm scales, modulation tables, small
layers) and `<key>.diff_b` (bias += strength * diff_b), as comfy/lora.py `load_lora` reads them and as ComfyUI's own
extractor (comfy_extras/nodes_lora_extract.py) writes biases. `read_turbo_lora` reads both parts (`TurboLora`);
`inference.stacked_lora` applies them. A file with both, or neither, is refused with a message naming it and what to
point the key at.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from krea2_train import facts
from krea2_train.errors import UserError

# The recipe shared in the release threads (FACTS.md): Raw + the Turbo LoRA at 0.6, 12 steps, CFG 1 (guidance 0 in
# the Krea 2 convention), Euler; ComfyUI samples Krea 2 at shift 1.15 whatever the checkpoint. `beta` is optional.
RECIPE_STRENGTH = 0.6
RECIPE_STEPS = 12
RECIPE_MU = facts.TURBO_MU
TURBO_LORA_ADAPTER = "turbo_lora"

_LORA_MARKERS = (".lora_A.", ".lora_B.", ".lora_down.", ".lora_up.", "lora_A.weight", "lora_B.weight")
_LORA_SIDE = (".alpha", ".dora_scale", ".lora_magnitude_vector")
_DIFF_SUFFIXES = (".diff", ".diff_b")  # ComfyUI's full-weight deltas (comfy/lora.py load_lora)
# ComfyUI's other full-weight patch kinds: `set_weight` replaces a weight, w_norm/b_norm are GLoRA-era aliases. Not
# what a Turbo LoRA holds; refused by name rather than guessed.
_FULL_OTHER = (".set_weight", ".w_norm", ".b_norm")


class TurboSourceError(UserError, ValueError):
    """A Turbo source that is neither a Krea 2 checkpoint nor a LoRA (or both)."""


def _fix(key: str) -> str:
    return (f"Point `{key}` at the Turbo checkpoint (e.g. krea2_turbo_bf16.safetensors or a diffusers folder) or "
            "at a Turbo LoRA (Comfy-Org's krea2_turbo_lora_rank_64_bf16.safetensors, or one made with "
            "`krea2-train extract RAW.safetensors TURBO.safetensors --rank 64`)")


def transformer_file_kind(path, key: str = "preview.turbo") -> str:
    """"checkpoint" (a Krea 2 transformer: single file or diffusers folder) or "lora" (a LoRA file or folder) for
    `path`, read from the tensor names in the header (no weights loaded). Raises TurboSourceError naming the file
    and the fix for anything else: a missing path, a VAE or text encoder, a file with checkpoint and LoRA tensors."""
    from krea2_train.models.loading import ModelLoadError, open_safetensors, original_names

    p = Path(str(path)).expanduser()
    if not p.exists():
        raise TurboSourceError(f"config key `{key}`: {p} not found. {_fix(key)}.")
    if p.is_dir():
        if (p / "config.json").exists():
            return "checkpoint"
        for name in ("pytorch_lora_weights.safetensors", "adapter_model.safetensors"):
            if (p / name).exists() and transformer_file_kind(p / name, key) == "lora":
                return "lora"
        raise TurboSourceError(f"config key `{key}`: {p} is a folder with neither config.json (a diffusers "
                               f"transformer) nor a LoRA file in it. {_fix(key)}.")
    try:
        _, keys = open_safetensors(p)
    except ModelLoadError as exc:
        raise TurboSourceError(f"config key `{key}`: {exc}") from exc
    checkpoint = original_names(keys) is not None or any(k.endswith("text_fusion.projector.weight") for k in keys)
    lora = [k for k in keys if any(m in k for m in _LORA_MARKERS) or k.endswith(_DIFF_SUFFIXES)]
    other = [k for k in keys if k not in lora and not k.endswith(_LORA_SIDE)]
    if checkpoint and not lora:
        return "checkpoint"
    if lora and not other and not checkpoint:
        read_turbo_lora(p)  # every tensor readable as a LoRA or a delta (raises naming the file otherwise)
        return "lora"
    if checkpoint:
        why = (f"it holds both a Krea 2 transformer ({facts.KREA2_MARKER}) and {len(lora)} LoRA tensors (e.g. "
               f"{lora[0]}), so it is unclear which it is")
    elif lora:
        why = (f"it holds {len(lora)} LoRA tensors but also {len(other)} others (e.g. {other[0]}) that are not "
               "LoRA factors or alphas")
    else:
        why = (f"it is neither a Krea 2 transformer (no {facts.KREA2_MARKER}) nor a LoRA (no lora_A/lora_B or "
               f"lora_down/lora_up tensors; first keys: {', '.join(keys[:3]) or 'none'})")
    raise TurboSourceError(f"config key `{key}`: {p}: {why}. {_fix(key)}.")


def delta_key_count(path) -> dict[str, int]:
    """{".diff": n, ".diff_b": m} of a safetensors file's ComfyUI full-weight deltas, read from the header alone
    ({} for a file without them or one that is no readable safetensors file: the LoRA reader then says why)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
    except Exception:  # noqa: BLE001 - not a safetensors file (or a folder)
        return {}
    counts = {s: sum(k.endswith(s) for k in keys) for s in _DIFF_SUFFIXES}
    return counts if any(counts.values()) else {}


def preview_turbo_source(cfg) -> tuple[str, str] | None:
    """What the Turbo preview columns sample with: (kind, path), or None when off. `preview.turbo`: true uses
    `model.turbo` (a checkpoint), a path is a Turbo checkpoint or a Turbo LoRA (told apart by content)."""
    turbo = cfg.preview.turbo
    if turbo is False or turbo in (None, "", "false", "False"):
        return None
    if turbo is True or str(turbo).lower() == "true":
        return ("checkpoint", str(cfg.model.turbo)) if cfg.model.turbo else None
    return transformer_file_kind(turbo, "preview.turbo"), str(turbo)


# ------------------------------------------------------------------------------------------- LoRA + full deltas
@dataclass
class TurboLora:
    """A Turbo LoRA as ComfyUI applies it: the low-rank part (`adapter`, None when the file has only deltas) and the
    full-weight deltas `diffs` {diffusers parameter name: float32 delta at strength 1}, added as
    `param += strength * delta` (comfy/lora.py calculate_weight, patch type "diff")."""

    adapter: object | None  # lora.formats.TrainedAdapter
    diffs: dict = field(default_factory=dict)
    source: str = ""
    diff_keys: dict = field(default_factory=dict)  # {diffusers parameter name: the file's key}, for messages


def _diff_fix(source: str) -> str:
    return (f"{source}: ComfyUI's `.diff` / `.diff_b` tensors are read under `diffusion_model.<original module or "
            "parameter>` (as its extractor writes them) or `lora_unet_` / `transformer.` + a Linear module")


def _diff_target(key: str, source: str) -> tuple[str, bool]:
    """(original or diffusers parameter name, is_original) that the delta `key` patches, as comfy/lora.py maps it:
    `<prefix><module>.diff` -> `<module>.weight`, `.diff_b` -> `<module>.bias`, and `diffusion_model.<parameter>.diff`
    for parameters not called `weight` (norm `scale`, modulation `lin`, a `bias`) -> that parameter. Under
    `diffusion_model.` ComfyUI also maps diffusers Linear names; they pass the Krea 2 name check below as they are."""
    from krea2_train.lora.formats import _resolve_module

    bias = key.endswith(".diff_b")
    name = key[: -len(".diff_b" if bias else ".diff")]
    if name.startswith("diffusion_model."):
        name = name[len("diffusion_model."):]
        if re.search(r"\.(scale|lin|bias)$", name):  # a parameter by its own name (ComfyUI's key map: every
            # model key not ending in .weight maps to itself)
            if bias:
                raise TurboSourceError(f"{_diff_fix(source)}; {key} puts a bias delta on the parameter {name}, "
                                       "which ComfyUI maps to no tensor. Re-extract the LoRA.")
            return name, True
        return f"{name}.{'bias' if bias else 'weight'}", True
    for prefix in ("lora_unet_", "transformer."):
        if name.startswith(prefix):
            module, _ = _resolve_module(name[len(prefix):])
            if module is not None:
                return f"{module}.{'bias' if bias else 'weight'}", False
    raise TurboSourceError(f"{_diff_fix(source)}; {key} is none of these. Re-extract or convert the LoRA.")


@functools.lru_cache(maxsize=1)
def _krea2_parameter_patterns() -> frozenset:
    """Krea2Transformer2DModel's parameter names with block indices as N (built on the meta device)."""
    from accelerate import init_empty_weights
    from diffusers import Krea2Transformer2DModel

    from krea2_train.models.tiny import TINY_TRANSFORMER

    with init_empty_weights():
        model = Krea2Transformer2DModel(**TINY_TRANSFORMER)
    return frozenset(re.sub(r"\.\d+\.", ".N.", k) for k in model.state_dict())


def read_turbo_lora(source, header: dict | None = None) -> TurboLora:
    """A Turbo LoRA file (or an in-memory state dict) read as ComfyUI reads it: lora_down/lora_up (+ .alpha) or
    lora_A/lora_B through lora.formats, plus `.diff` / `.diff_b` full deltas (module docstring). Raises naming the
    file for anything else."""
    from diffusers.loaders.single_file_utils import convert_krea2_transformer_checkpoint_to_diffusers

    from krea2_train.lora.formats import LoraFormatError, read_lora_file, read_lora_state
    from krea2_train.models.loading import ModelLoadError, open_safetensors

    if isinstance(source, dict):
        state, name = source, "<state dict>"
    else:
        path = Path(str(source)).expanduser()
        if path.is_dir() or path.suffix != ".safetensors":
            return TurboLora(read_lora_file(path).adapter, {}, str(path))  # folders: plain LoRA layouts only
        try:
            handle, keys = open_safetensors(path)
        except ModelLoadError as exc:
            raise LoraFormatError(str(exc)) from exc
        if not any(k.endswith(_DIFF_SUFFIXES + _FULL_OTHER) for k in keys):
            return TurboLora(read_lora_file(path).adapter, {}, str(path))
        state, header, name = {k: handle.get_tensor(k) for k in keys}, handle.metadata() or {}, str(path)
    other = [k for k in state if k.endswith(_FULL_OTHER)]
    if other:
        raise TurboSourceError(f"{name}: tensor {other[0]} is a ComfyUI `{other[0].rsplit('.', 1)[1]}` patch "
                               "(replaces or re-normalises a weight), not a LoRA or a `.diff` delta; only lora "
                               "factors, .alpha, .diff and .diff_b are read. Use a Turbo LoRA made by ComfyUI's "
                               "Extract and Save Lora node or `krea2-train extract`.")
    deltas = {k: v for k, v in state.items() if k.endswith(_DIFF_SUFFIXES)}
    lora_part = {k: v for k, v in state.items() if k not in deltas}
    adapter = read_lora_state(lora_part, header, source=name).adapter if lora_part else None
    original, diffusers_named, keys_of = {}, {}, {}
    for key, value in deltas.items():
        if not value.is_floating_point():
            raise TurboSourceError(f"{name}: delta {key} is stored as {value.dtype}, not a float tensor; the file is "
                                   "damaged. Re-extract the LoRA.")
        target, is_original = _diff_target(key, name)
        bucket = original if is_original else diffusers_named
        if target in bucket:
            raise TurboSourceError(f"{name}: {key} and {keys_of[target]} both patch {target}; the file mixes two "
                                   "namings. Keep one.")
        bucket[target] = value.float()
        keys_of[target] = key
    diffs, diff_keys = {}, {}
    for orig, value in original.items():  # original names -> diffusers' (reshaping mod.lin to its table)
        conv = convert_krea2_transformer_checkpoint_to_diffusers({orig: value})
        zero = convert_krea2_transformer_checkpoint_to_diffusers({orig: torch.zeros_like(value)})
        if len(conv) != 1:
            raise TurboSourceError(f"{name}: {keys_of[orig]} patches {orig}, which is not a Krea 2 transformer "
                                   "parameter (the LoRA is for another model).")
        (dname, t), = conv.items()
        if re.sub(r"\.\d+\.", ".N.", dname) not in _krea2_parameter_patterns():
            raise TurboSourceError(f"{name}: {keys_of[orig]} patches {orig}, which is not a Krea 2 transformer "
                                   "parameter (the LoRA is for another model).")
        diffs[dname] = t.float() - zero[dname].float()  # exact for the converter's affine maps
        diff_keys[dname] = keys_of[orig]
    for dname, value in diffusers_named.items():
        if dname in diffs:
            raise TurboSourceError(f"{name}: {keys_of[dname]} and {diff_keys[dname]} both patch {dname}. Keep one.")
        diffs[dname], diff_keys[dname] = value, keys_of[dname]
    if adapter is not None:
        both = sorted(m for m in adapter.modules if f"{m}.weight" in diffs)
        if both:
            raise TurboSourceError(
                f"{name}: {both[0]} has both lora factors and a full `.diff` ({diff_keys[f'{both[0]}.weight']}); "
                "ComfyUI then applies only the .diff and drops the LoRA, which is unlikely to be meant. Re-extract "
                "the LoRA with one of the two per layer.")
    return TurboLora(adapter, diffs, name, diff_keys)


def delta_key(name: str) -> str:
    """ComfyUI's key for a full delta of the checkpoint tensor `name` (original names): `<module>.diff` for a
    weight, `<module>.diff_b` for a bias (its extractor's names), `<parameter>.diff` for the rest (its key map's
    own name for a parameter not called weight)."""
    if name.endswith(".weight"):
        return f"diffusion_model.{name[:-len('.weight')]}.diff"
    if name.endswith(".bias"):
        return f"diffusion_model.{name[:-len('.bias')]}.diff_b"
    return f"diffusion_model.{name}.diff"


def write_turbo_lora(adapter, deltas: dict, path, dtype="bfloat16", comfyui_style: str = "alpha",
                     metadata: dict | None = None) -> Path:
    """A Turbo LoRA in ComfyUI's layout: the LoRA as lora.writers writes `comfyui` (lora_down/lora_up + .alpha,
    or baked lora_A/lora_B) plus `deltas` {original tensor name: delta} as `.diff` / `.diff_b` (`delta_key`), in
    `dtype`. ComfyUI and `read_turbo_lora` read it; diffusers and the plain-LoRA tools do not (they read no deltas)."""
    import json

    from krea2_train.lora.writers import bakes_scale, lora_state_for_format
    from krea2_train.models.loading import resolve_dtype
    from krea2_train.utils.io import save_safetensors_atomic

    if bakes_scale("comfyui", comfyui_style):
        adapter = adapter.baked()
    adapter = adapter.to(dtype)
    tensors, header = lora_state_for_format(adapter, "comfyui", comfyui_style)
    for name, delta in deltas.items():
        tensors[delta_key(name)] = delta.to(resolve_dtype(dtype)).contiguous()
    info = {**adapter.info, **(metadata or {})}
    header["krea2_train.format"] = "comfyui"
    header["krea2_train.base_model"] = "krea-2-raw"
    header["krea2_train.deltas"] = str(len(deltas))
    if info:
        header["krea2_train.info"] = json.dumps(info, sort_keys=True, default=str)
    return save_safetensors_atomic(tensors, Path(path), metadata=header)


def check_turbo_lora_fits(cfg, transformer) -> None:
    """At the start of training: when `preview.turbo` is a Turbo LoRA with `.diff` / `.diff_b` deltas, check now
    that each can be added to the training transformer as built (not sharded, not a 1-byte or fused weight), so the
    first preview, steps later, does not stop the run. Raises UserError naming the file and the fix."""
    if not getattr(cfg.preview, "prompts", None):
        return
    source = preview_turbo_source(cfg)
    if not source or source[0] != "lora":
        return
    turbo = read_turbo_lora(source[1])
    if not turbo.diffs:
        return
    from krea2_train.inference import _delta_targets

    try:
        from krea2_train.runtime.speed import unwrap_transformer

        transformer = unwrap_transformer(transformer)
    except TypeError:
        pass
    try:
        _delta_targets(transformer, turbo)
    except UserError as exc:
        raise UserError(f"preview.turbo: {exc}") from exc
