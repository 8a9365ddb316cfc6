"""Shared builders for the export tests: a trained-looking tiny adapter and peer-layout state dicts."""

from __future__ import annotations

import torch

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "to_gate", "ff.gate", "ff.up", "ff.down", "img_in", "projector"]


def trained_transformer(tiny_dir, seed=0, use_rslora=False, r=4, alpha=8, rank_pattern=None, alpha_pattern=None):
    """The tiny Raw transformer with a PEFT LoRA whose A and B are random (as after training)."""
    from peft import LoraConfig

    from krea2_train.models.loading import load_transformer

    model = load_transformer(tiny_dir / "transformer_raw.safetensors", dtype="float32")
    config = LoraConfig(r=r, lora_alpha=alpha, use_rslora=use_rslora, target_modules=TARGETS,
                        rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {})
    model.add_adapter(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def trained_adapter(tiny_dir, **kw):
    from krea2_train.lora.formats import TrainedAdapter

    return TrainedAdapter.from_model(trained_transformer(tiny_dir, **kw))


def max_delta_error(adapter, other) -> float:
    assert sorted(adapter.modules) == sorted(other.modules)
    return max(((adapter.delta(m) - other.delta(m)).norm() / adapter.delta(m).norm()).item() for m in adapter.modules)


def loaded_deltas(transformer, adapter_name):
    from peft.tuners.lora import LoraLayer

    return {n: m.get_delta_weight(adapter_name).float() for n, m in transformer.named_modules()
            if isinstance(m, LoraLayer) and adapter_name in m.lora_A}


def max_loaded_error(adapter, transformer, adapter_name) -> float:
    loaded = loaded_deltas(transformer, adapter_name)
    assert sorted(loaded) == sorted(adapter.modules)
    return max(((loaded[m] - adapter.delta(m)).norm() / adapter.delta(m).norm()).item() for m in adapter.modules)


def peer_state(adapter, layout: str) -> tuple[dict, dict]:
    """(tensors, header) of `adapter` written the way a peer trainer documents it, built from key names here (not by
    our writers), so the readers are tested against independent layouts."""
    from krea2_train.models.keys import diffusers_to_original_module

    state, header = {}, {}
    for m in adapter.modules:
        a, b, s, r = adapter.down[m], adapter.up[m], adapter.scale(m), adapter.rank(m)
        orig = diffusers_to_original_module(m)
        if layout == "ai-toolkit":  # base_model.model. + original names, lora_A/B, alpha = rank (scale baked in B)
            state[f"base_model.model.{orig}.lora_A.weight"] = a
            state[f"base_model.model.{orig}.lora_B.weight"] = b * s
        elif layout == "musubi":  # lora_unet_ + flattened original names, lora_down/up + alpha (scale alpha/rank)
            base = "lora_unet_" + orig.replace(".", "_")
            state[f"{base}.lora_down.weight"], state[f"{base}.lora_up.weight"] = a, b
            state[f"{base}.alpha"] = torch.tensor(s * r)
        elif layout == "comfyui":  # diffusion_model. + original names, lora_down/up + alpha (Comfy-Org Turbo LoRA)
            state[f"diffusion_model.{orig}.lora_down.weight"], state[f"diffusion_model.{orig}.lora_up.weight"] = a, b
            state[f"diffusion_model.{orig}.alpha"] = torch.tensor(s * r, dtype=torch.float32)
        elif layout == "comfyui-diffusers-names":  # ComfyUI also maps transformer.<diffusers> for Krea 2
            state[f"transformer.{m}.lora_down.weight"], state[f"transformer.{m}.lora_up.weight"] = a, b
            state[f"transformer.{m}.alpha"] = torch.tensor(s * r)
        elif layout == "krea-reference":  # diffusion_model. + original names, lora_A/B, no alpha
            state[f"diffusion_model.{orig}.lora_A.weight"] = a
            state[f"diffusion_model.{orig}.lora_B.weight"] = b * s
        elif layout == "diffusers-no-header":  # diffusers' training example without metadata: alpha = rank
            state[f"transformer.{m}.lora_A.weight"] = a
            state[f"transformer.{m}.lora_B.weight"] = b * s
        else:
            raise ValueError(layout)
    return {k: v.contiguous() for k, v in state.items()}, header


PEER_LAYOUTS = ["ai-toolkit", "musubi", "comfyui", "comfyui-diffusers-names", "krea-reference", "diffusers-no-header"]


# ----------------------------------------------------------------------------------------------- ComfyUI's rules
# ComfyUI's Krea 2 LoRA loading, restated from its source (comfy/lora.py model_lora_keys_unet + load_lora,
# comfy/utils.py krea2_to_diffusers, comfy/weight_adapter/lora.py) and built from the checkpoint's own weight names,
# not from the package's name tables: an independent reference for "what does ComfyUI patch with this file".
_COMFY_BLOCK = {"attn.to_q": "attn.wq", "attn.to_k": "attn.wk", "attn.to_v": "attn.wv", "attn.to_gate": "attn.gate",
                "attn.to_out.0": "attn.wo", "attn.to_out": "attn.wo", "ff.gate": "mlp.gate", "ff.up": "mlp.up",
                "ff.down": "mlp.down"}
_COMFY_BASIC = {"img_in": "first", "time_embed.linear_1": "tmlp.0", "time_embed.linear_2": "tmlp.2",
                "time_mod_proj": "tproj.1", "txt_in.linear_1": "txtmlp.1", "txt_in.linear_2": "txtmlp.3",
                "text_fusion.projector": "txtfusion.projector", "final_layer.linear": "last.linear"}


def comfyui_diffusers_names(n_layers: int) -> dict:
    """{diffusers module: checkpoint weight key `diffusion_model.<original>.weight`} as krea2_to_diffusers builds it."""
    out = {}
    groups = [(f"transformer_blocks.{i}", f"blocks.{i}") for i in range(n_layers)]
    groups += [(f"text_fusion.{g}.{i}", f"txtfusion.{g}.{i}") for g in ("layerwise_blocks", "refiner_blocks")
               for i in range(2)]
    for d_prefix, c_prefix in groups:
        for d, c in _COMFY_BLOCK.items():
            out[f"{d_prefix}.{d}"] = f"diffusion_model.{c_prefix}.{c}.weight"
    out.update({d: f"diffusion_model.{c}.weight" for d, c in _COMFY_BASIC.items()})
    return out


def comfyui_key_map(checkpoint) -> dict:
    """{LoRA key prefix: model weight key} for the Krea 2 checkpoint file `checkpoint` (ComfyUI's model keys are
    `diffusion_model.<checkpoint key>`)."""
    from safetensors import safe_open

    with safe_open(str(checkpoint), "pt") as f:
        sd_keys = ["diffusion_model." + k for k in f.keys()]
    key_map = {}
    for k in sd_keys:
        if k.endswith(".weight"):
            key_map["lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_")] = k
            key_map[k[:-len(".weight")]] = k
        else:
            key_map[k] = k
    n_layers = len({k.split(".")[2] for k in sd_keys if k.startswith("diffusion_model.blocks.")})
    for d, to in comfyui_diffusers_names(n_layers).items():
        for alias in (f"diffusion_model.{d}", f"transformer.{d}", "lycoris_" + d.replace(".", "_"), d):
            key_map[alias] = to
    return key_map


def comfyui_load(lora: dict, key_map: dict, strength: float = 1.0) -> tuple[dict, list]:
    """({model weight key: delta ComfyUI adds at strength_model `strength`}, keys it logs as "lora key not loaded").
    The header is not an input: ComfyUI never reads it for the scale."""
    patches, loaded = {}, set()
    for x, to in key_map.items():
        alpha = None
        if f"{x}.alpha" in lora:
            alpha = lora[f"{x}.alpha"].item()
            loaded.add(f"{x}.alpha")
        for up, down in ((".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight")):
            if x + up in lora:
                mat1, mat2 = lora[x + up].float(), lora[x + down].float()
                scale = alpha / mat2.shape[0] if alpha is not None else 1.0
                patches[to] = strength * scale * (mat1 @ mat2)
                loaded.update({x + up, x + down})
                break
    return patches, sorted(k for k in lora if k not in loaded)


def comfyui_errors(adapter, path, checkpoint, strength: float = 1.0) -> dict:
    """{trained module: relative error of what ComfyUI adds vs strength * the trained delta}; asserts every tensor of
    the file loads and every trained module is patched."""
    from safetensors.torch import load_file

    key_map = comfyui_key_map(checkpoint)
    patches, not_loaded = comfyui_load(load_file(str(path)), key_map, strength)
    assert not not_loaded, f"ComfyUI would not load {not_loaded[:5]}"
    want = {key_map[m]: m for m in adapter.modules}
    assert sorted(patches) == sorted(want)
    return {m: ((patches[k] - strength * adapter.delta(m)).norm() / (strength * adapter.delta(m)).norm()).item()
            for k, m in want.items()}


def comfyui_strength_ratio(adapter, path, checkpoint) -> dict:
    """{trained module: <ComfyUI delta, trained delta> / |trained delta|^2}: 1.0 is the trained strength."""
    from safetensors.torch import load_file

    key_map = comfyui_key_map(checkpoint)
    patches, _ = comfyui_load(load_file(str(path)), key_map)
    return {m: ((patches[key_map[m]] * adapter.delta(m)).sum() / (adapter.delta(m) ** 2).sum()).item()
            for m in adapter.modules if key_map[m] in patches}
