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
