"""PEFT adapters on the Raw `Krea2Transformer2DModel`: target presets, LoRA/DoRA/rsLoRA/LoKr, save/load.

Targets are regular expressions over diffusers module names (PEFT full-matches a string `target_modules`), so the
adapter config written next to the weights says exactly what was adapted:
    attention      q/k/v/out/gate projections of the transformer blocks (the usual style/character LoRA)
    attention_mlp  + the SwiGLU MLPs of the blocks
    all_linear     every Linear layer: blocks, text fusion, text/time/image projections and the final layer
    custom         `lora.pattern`

The adapter is saved in the PEFT layout (`adapter_model.safetensors` with `transformer_blocks.N.attn.to_q.lora_A.weight`
keys from `get_peft_model_state_dict`, plus `adapter_config.json`), which the export step reads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from krea2_train.errors import UserError
from krea2_train.utils.io import save_safetensors_atomic, write_json_atomic

ATTN = r"attn\.(to_q|to_k|to_v|to_out\.0|to_gate)"
MLP = r"ff\.(gate|up|down)"
PRESETS = {
    "attention": rf"transformer_blocks\.{{B}}\.{ATTN}",
    "attention_mlp": rf"transformer_blocks\.{{B}}\.({ATTN}|{MLP})",
    "all_linear": None,  # every nn.Linear
}
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def target_pattern(model, lora_cfg) -> str:
    """The regex (full match over module names) that selects the modules to adapt; checked to match something."""
    blocks = r"\d+" if not lora_cfg.blocks else "(" + "|".join(str(int(b)) for b in lora_cfg.blocks) + ")"
    if lora_cfg.targets == "custom":
        pattern = lora_cfg.pattern
    elif lora_cfg.targets == "all_linear":
        names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        if lora_cfg.blocks:  # keep non-block layers, restrict block layers to the chosen indices
            names = [n for n in names if not n.startswith("transformer_blocks.")
                     or re.match(rf"transformer_blocks\.{blocks}\.", n)]
        pattern = "(" + "|".join(re.escape(n) for n in names) + ")"
    else:
        pattern = PRESETS[lora_cfg.targets].replace("{B}", blocks)
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    hit = [n for n in linear if re.fullmatch(pattern, n)]
    if not hit:
        sample = ", ".join(linear[:6])
        raise UserError(f"LoRA targets (lora.targets={lora_cfg.targets!r}, lora.pattern={lora_cfg.pattern!r}, "
                        f"lora.blocks={lora_cfg.blocks}) match no Linear layer of the transformer. Module names look "
                        f"like: {sample}, ...")
    nblocks = len(getattr(model, "transformer_blocks", []))
    bad = [b for b in (lora_cfg.blocks or []) if not 0 <= b < nblocks]
    if bad:
        raise UserError(f"config key `lora.blocks` has {bad}, but the transformer has blocks 0..{nblocks - 1}")
    return pattern


def make_peft_config(lora_cfg, pattern: str):
    from peft import LoKrConfig, LoraConfig

    alpha = lora_cfg.alpha if lora_cfg.alpha is not None else lora_cfg.rank
    if lora_cfg.type == "lokr":
        return LoKrConfig(r=lora_cfg.rank, alpha=alpha, module_dropout=lora_cfg.dropout, target_modules=pattern,
                          init_weights=True)
    init = {"default": True, "gaussian": "gaussian"}[lora_cfg.init]
    return LoraConfig(r=lora_cfg.rank, lora_alpha=alpha, lora_dropout=lora_cfg.dropout, target_modules=pattern,
                      init_lora_weights=init, use_dora=lora_cfg.type == "dora", use_rslora=lora_cfg.use_rslora)


def add_lora(transformer, lora_cfg, seed: int = 0):
    """Inject the adapter (same init on every process: seeded) and keep its weights in float32 for training."""
    pattern = target_pattern(transformer, lora_cfg)
    peft_config = make_peft_config(lora_cfg, pattern)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer.add_adapter(peft_config)
    for p in transformer.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # low-precision adapter weights lose small updates
    return peft_config


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def adapter_state_dict(transformer) -> dict[str, torch.Tensor]:
    """The adapter's tensors, whole and on the CPU. Under FSDP this gathers the shards: a collective, so every
    process must call it (only the main one needs to write the result)."""
    from peft import get_peft_model_state_dict

    from krea2_train.runtime.sharding import full_tensor

    return {k: full_tensor(v).detach().cpu().clone() for k, v in get_peft_model_state_dict(transformer).items()}


def peft_config_dict(peft_config) -> dict:
    d = peft_config.to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in d.items()}


def save_adapter(transformer, peft_config, out_dir, metadata: dict | None = None,
                 state: dict[str, torch.Tensor] | None = None) -> Path:
    """PEFT layout: adapter_model.safetensors + adapter_config.json (written atomically, weights last-but-one).
    `state`: adapter_state_dict(transformer) if already gathered (FSDP: every process gathers, one writes)."""
    out = Path(out_dir)
    config = peft_config_dict(peft_config)
    header = {"lora_adapter_metadata": json.dumps(config)}
    header.update({k: str(v) for k, v in (metadata or {}).items()})
    write_json_atomic(out / ADAPTER_CONFIG, config)
    state = adapter_state_dict(transformer) if state is None else state
    save_safetensors_atomic(state, out / ADAPTER_WEIGHTS, metadata=header)
    return out


def load_adapter_weights(transformer, adapter_dir) -> None:
    """Load saved adapter weights into a transformer that already has the same adapter injected."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.exists():
        raise UserError(f"{path} is missing: the checkpoint is incomplete. Delete that checkpoint folder to resume "
                        "from the previous one.")
    state = load_file(str(path))
    result = set_peft_model_state_dict(transformer, state)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise UserError(f"{path} does not fit the configured LoRA (unexpected keys {unexpected[:3]}). The `lora:` "
                        "section changed since this checkpoint was written; restore it or start a new run_name.")
    with torch.no_grad():  # set_peft_model_state_dict copies in the stored dtype; training keeps float32
        for p in transformer.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
