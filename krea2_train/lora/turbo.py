"""The Turbo LoRA: Turbo minus Raw as a low-rank file (Comfy-Org's `krea2_turbo_lora_rank_64_bf16.safetensors`, or
`krea2-train extract RAW TURBO`). Applied to Raw it samples like Turbo, so previews and `sample` need one base in
memory instead of swapping or holding a second 12.9B checkpoint.

    kind = transformer_file_kind(path, "preview.turbo")   # "checkpoint" | "lora"; anything else is refused
    with stacked_lora(transformer, path, strength):        # krea2_train.inference: under the active adapters
        ...

What a file is, is read from its tensors (never its name): a Krea 2 checkpoint has the text-fusion projector
(`facts.KREA2_MARKER`), a LoRA has only lora_A/lora_B (lora_down/lora_up, `.alpha`) tensors. A file with both, or
neither, is refused with a message naming it and what to point the key at.
"""

from __future__ import annotations

from pathlib import Path

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
    lora = [k for k in keys if any(m in k for m in _LORA_MARKERS)]
    other = [k for k in keys if k not in lora and not k.endswith(_LORA_SIDE)]
    if checkpoint and not lora:
        return "checkpoint"
    if lora and not other and not checkpoint:
        from krea2_train.lora.formats import read_lora_file

        read_lora_file(p)  # every tensor readable as a LoRA (raises LoraFormatError naming the file otherwise)
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


def preview_turbo_source(cfg) -> tuple[str, str] | None:
    """What the Turbo preview columns sample with: (kind, path), or None when off. `preview.turbo`: true uses
    `model.turbo` (a checkpoint), a path is a Turbo checkpoint or a Turbo LoRA (told apart by content)."""
    turbo = cfg.preview.turbo
    if turbo is False or turbo in (None, "", "false", "False"):
        return None
    if turbo is True or str(turbo).lower() == "true":
        return ("checkpoint", str(cfg.model.turbo)) if cfg.model.turbo else None
    return transformer_file_kind(turbo, "preview.turbo"), str(turbo)
