"""Module names: original Krea 2 checkpoints (reference repo, ComfyUI) <-> diffusers `Krea2Transformer2DModel`.

diffusers ships only the original -> diffusers direction (for whole checkpoints and for LoRAs). LoRA export and
`make-tiny` also need the reverse, so the table lives here once, for both directions, and tests pin it against
diffusers' own converters.
"""

from __future__ import annotations

import re

# Leaf renames inside an attention / MLP / block (original -> diffusers).
_ATTN = {"wq": "to_q", "wk": "to_k", "wv": "to_v", "wo": "to_out.0", "gate": "to_gate"}
_MLP = {"gate": "gate", "up": "up", "down": "down"}
# Standalone modules (original -> diffusers).
_STANDALONE = {
    "first": "img_in",
    "tmlp.0": "time_embed.linear_1",
    "tmlp.2": "time_embed.linear_2",
    "tproj.1": "time_mod_proj",
    "txtmlp.1": "txt_in.linear_1",
    "txtmlp.3": "txt_in.linear_2",
    "txtfusion.projector": "text_fusion.projector",
    "last.linear": "final_layer.linear",
}
_STANDALONE_REV = {v: k for k, v in _STANDALONE.items()}
_ATTN_REV = {v: k for k, v in _ATTN.items()}

_ORIG_BLOCK = re.compile(r"^(blocks|txtfusion\.layerwise_blocks|txtfusion\.refiner_blocks)\.(\d+)\.(attn|mlp)\.(\w+)$")
_DIFF_BLOCK = re.compile(
    r"^(transformer_blocks|text_fusion\.layerwise_blocks|text_fusion\.refiner_blocks)\.(\d+)\.(attn\.to_q|attn\.to_k|"
    r"attn\.to_v|attn\.to_out\.0|attn\.to_gate|ff\.gate|ff\.up|ff\.down)$"
)


def original_to_diffusers_module(name: str) -> str | None:
    """Map a Linear module name from the original checkpoint to diffusers; None if it is not a Linear we know."""
    m = _ORIG_BLOCK.match(name)
    if m:
        group, idx, kind, leaf = m.groups()
        group = {"blocks": "transformer_blocks"}.get(group, group.replace("txtfusion.", "text_fusion."))
        if kind == "attn" and leaf in _ATTN:
            return f"{group}.{idx}.attn.{_ATTN[leaf]}"
        if kind == "mlp" and leaf in _MLP:
            return f"{group}.{idx}.ff.{_MLP[leaf]}"
        return None
    return _STANDALONE.get(name)


def diffusers_to_original_module(name: str) -> str | None:
    """Map a diffusers Linear module name to the original checkpoint name; None if it has no original twin."""
    m = _DIFF_BLOCK.match(name)
    if m:
        group, idx, leaf = m.groups()
        group = {"transformer_blocks": "blocks"}.get(group, group.replace("text_fusion.", "txtfusion."))
        kind, sub = leaf.split(".", 1)
        if kind == "attn":
            return f"{group}.{idx}.attn.{_ATTN_REV[sub]}"
        return f"{group}.{idx}.mlp.{sub}"
    return _STANDALONE_REV.get(name)


# Parameter-level renames for whole checkpoints (diffusers -> original), the inverse of diffusers'
# `convert_krea2_transformer_checkpoint_to_diffusers`.
_PARAM_LEAF_REV = [
    (".attn.norm_q.weight", ".attn.qknorm.qnorm.scale"),
    (".attn.norm_k.weight", ".attn.qknorm.knorm.scale"),
    (".norm1.weight", ".prenorm.scale"),
    (".norm2.weight", ".postnorm.scale"),
    (".scale_shift_table", ".mod.lin"),
]
_PARAM_STANDALONE_REV = {
    "txt_in.norm.weight": "txtmlp.0.scale",
    "final_layer.norm.weight": "last.norm.scale",
    "final_layer.scale_shift_table": "last.modulation.lin",
}


def diffusers_to_original_state_dict(state_dict: dict) -> dict:
    """Rename a diffusers `Krea2Transformer2DModel` state dict to the official single-file layout."""
    out = {}
    for key, value in state_dict.items():
        if key in _PARAM_STANDALONE_REV:
            out[_PARAM_STANDALONE_REV[key]] = value
            continue
        module, _, leaf = key.rpartition(".")
        original = diffusers_to_original_module(module)
        if original is not None and leaf in ("weight", "bias"):
            out[f"{original}.{leaf}"] = value
            continue
        new = key
        for old, rep in _PARAM_LEAF_REV:
            if new.endswith(old):
                new = new[: -len(old)] + rep
                break
        new = new.replace("transformer_blocks.", "blocks.", 1).replace("text_fusion.", "txtfusion.", 1)
        if new.startswith("blocks.") and new.endswith(".mod.lin"):
            value = value.reshape(-1)  # the original stores the six modulation vectors flattened
        out[new] = value
    return out
