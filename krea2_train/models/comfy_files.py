"""The Qwen3-VL text encoder as ComfyUI ships it: one safetensors file (e.g. `qwen3vl_4b_fp8_scaled.safetensors`).

The file holds Hugging Face's `Qwen3VLForConditionalGeneration` tensor names (`model.language_model.*`,
`model.visual.*`, `lm_head.*`; ComfyUI renames them on load, comfy/sd.py) or ComfyUI's own (`model.layers.*`), with
fp8 weights marked as in ComfyUI's transformer files (models/quantized.py: read exactly or refused). It has no
tokenizer and no config: the tokenizer comes from `model.tokenizer` (a Hugging Face Qwen3-VL folder, or ComfyUI's
`comfy/text_encoders/qwen25_tokenizer` folder, which Qwen3-VL shares); the config from that folder's config.json when
it has one, else from the tensor shapes plus Qwen3-VL's constants below. Only the language model is loaded: Krea 2
reads hidden states of text tokens, so the vision tower is a stub that is never run.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from krea2_train.errors import ModelLoadError
from krea2_train.models.quantized import QuantReader

# Qwen3-VL's text config values that are not visible in the weights (Qwen3-VL-4B-Instruct config.json). For text
# tokens the three M-RoPE position axes are equal, so the split of the rotary dims between them does not change the
# result; any valid split (summing to head_dim / 2) gives Qwen3-VL's text encoding.
ROPE_THETA = 5_000_000.0
RMS_EPS = 1e-6
STUB_VISION = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=16, temporal_patch_size=2,
                   spatial_merge_size=2, deepstack_visual_indexes=[0], num_position_embeddings=16)


def tokenizer_problem(tokenizer) -> str:
    return ("it holds no tokenizer: set `model.tokenizer` to a Hugging Face Qwen3-VL-4B-Instruct folder "
            "(tokenizer.json, tokenizer_config.json) or to ComfyUI's comfy/text_encoders/qwen25_tokenizer folder "
            "(vocab.json, merges.txt, tokenizer_config.json)" + (f"; {tokenizer} is not such a folder" if tokenizer
                                                                   else ""))


def _language_keys(keys) -> dict[str, str]:
    """{Qwen3VLModel `language_model.` name: key in the file}."""
    out = {}
    for k in keys:
        if k.startswith("model.language_model."):
            out[k[len("model.language_model."):]] = k
        elif k.startswith(("model.layers.", "model.embed_tokens.", "model.norm.")):  # ComfyUI's renamed layout
            out[k[len("model."):]] = k
    return out


def _inferred_config(state: dict, pad_token_id):
    from transformers import Qwen3VLConfig

    head_dim = state["layers.0.self_attn.q_norm.weight"].shape[0]
    half = head_dim // 2
    hw = half * 20 // 64  # Qwen3-VL-4B's (24, 20, 20) at head_dim 128
    hidden = state["embed_tokens.weight"].shape[1]
    text = dict(
        vocab_size=state["embed_tokens.weight"].shape[0], hidden_size=hidden,
        intermediate_size=state["layers.0.mlp.gate_proj.weight"].shape[0],
        num_hidden_layers=1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers.")),
        num_attention_heads=state["layers.0.self_attn.q_proj.weight"].shape[0] // head_dim,
        num_key_value_heads=state["layers.0.self_attn.k_proj.weight"].shape[0] // head_dim, head_dim=head_dim,
        attention_bias="layers.0.self_attn.q_proj.bias" in state, rms_norm_eps=RMS_EPS, rope_theta=ROPE_THETA,
        rope_scaling={"rope_type": "default", "mrope_section": [half - 2 * hw, hw, hw], "mrope_interleaved": True},
        pad_token_id=pad_token_id)
    return Qwen3VLConfig(text_config=text, vision_config=dict(STUB_VISION, out_hidden_size=hidden))


def load_text_encoder_file(path: Path, tokenizer, dtype: torch.dtype, config_key: str):
    """(Qwen3VLModel, tokenizer) from a ComfyUI single-file text encoder; see the module docstring."""
    from accelerate import init_empty_weights
    from transformers import AutoTokenizer, Qwen3VLConfig, Qwen3VLModel

    from krea2_train.models.loading import open_safetensors

    handle, keys = open_safetensors(path)
    lm = _language_keys(keys)
    if "embed_tokens.weight" not in lm or "layers.0.self_attn.q_norm.weight" not in lm:
        raise ModelLoadError(f"{path} is not a Qwen3-VL text encoder (no language-model embed_tokens / q_norm). "
                             f"Point `{config_key}` at qwen3vl_4b_*.safetensors or a Qwen3-VL folder.")
    tok_dir = Path(str(tokenizer)).expanduser() if tokenizer else None
    if tok_dir is None or not tok_dir.is_dir():
        raise ModelLoadError(f"{path} is a single-file text encoder (ComfyUI layout): {tokenizer_problem(tokenizer)}.")
    try:
        tok = AutoTokenizer.from_pretrained(tok_dir)
    except Exception as exc:
        raise ModelLoadError(f"{tok_dir} (`model.tokenizer`): cannot load the tokenizer ({exc}); "
                             f"{tokenizer_problem(None)}") from exc
    reader = QuantReader(path, handle, {k: k for k in keys}, handle.metadata() or {})
    state = {}
    for name, key in lm.items():
        if reader.is_side(key):
            continue
        q = reader.weight(key)
        t = handle.get_tensor(key) if q is None else q.dequantize()
        if not t.is_floating_point():
            raise ModelLoadError(f"{path}: {key} is stored as {t.dtype} with no ComfyUI quantisation format")
        state[name] = t.to(dtype)
    cfg_file = tok_dir / "config.json"
    if cfg_file.exists() and json.loads(cfg_file.read_text()).get("model_type", "").startswith("qwen3_vl"):
        config = Qwen3VLConfig.from_pretrained(tok_dir)
        config.vision_config = type(config.vision_config)(**STUB_VISION, out_hidden_size=config.text_config.hidden_size)
    else:
        config = _inferred_config(state, tok.pad_token_id)
    with init_empty_weights(include_buffers=False):  # parameters on meta, rotary buffers computed for real
        model = Qwen3VLModel(config)
    result = model.language_model.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise ModelLoadError(f"{path}: the language model's tensors do not fit Qwen3-VL (missing "
                             f"{result.missing_keys[:4]}, unexpected {result.unexpected_keys[:4]}); the file is "
                             "incomplete or from another model.")
    model.visual.to_empty(device="cpu")  # the stub tower is never run on text: zeros, not random numbers
    with torch.no_grad():
        for p in model.visual.parameters():
            p.zero_()
    return model.to(dtype), tok
