"""ComfyUI's single files that are not the transformer: the Qwen3-VL text encoder (below) and the Qwen-Image VAE
(`qwen_image_vae.safetensors`, see "VAE file" further down).

The text encoder as ComfyUI ships it: one safetensors file (e.g. `qwen3vl_4b_fp8_scaled.safetensors`).

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


def load_tokenizer(tok_dir: Path):
    """The tokenizer of a Hugging Face Qwen3-VL folder (tokenizer.json) or of ComfyUI's qwen25_tokenizer folder
    (vocab.json + merges.txt + tokenizer_config.json: transformers' Qwen2Tokenizer, the class ComfyUI loads it
    with); `model.tokenizer`."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(tok_dir)
    except Exception as exc:
        raise ModelLoadError(f"{tok_dir} (`model.tokenizer`): cannot load the tokenizer ({exc}); "
                             f"{tokenizer_problem(None)}") from exc


def check_tokenizer_fits(tok, vocab_rows: int, tok_dir, path) -> None:
    """Refuse a tokenizer whose ids run past the text encoder's embedding table (another model's tokenizer)."""
    if len(tok) > vocab_rows:
        raise ModelLoadError(f"{tok_dir}: the tokenizer has {len(tok)} tokens but {path}'s embedding table only "
                             f"{vocab_rows} rows: they are not from the same model. {tokenizer_problem(None)}.")


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
    from transformers import Qwen3VLConfig, Qwen3VLModel

    from krea2_train.models.loading import open_safetensors

    handle, keys = open_safetensors(path)
    lm = _language_keys(keys)
    if "embed_tokens.weight" not in lm or "layers.0.self_attn.q_norm.weight" not in lm:
        raise ModelLoadError(f"{path} is not a Qwen3-VL text encoder (no language-model embed_tokens / q_norm). "
                             f"Point `{config_key}` at qwen3vl_4b_*.safetensors or a Qwen3-VL folder.")
    tok_dir = Path(str(tokenizer)).expanduser() if tokenizer else None
    if tok_dir is None or not tok_dir.is_dir():
        raise ModelLoadError(f"{path} is a single-file text encoder (ComfyUI layout): {tokenizer_problem(tokenizer)}.")
    tok = load_tokenizer(tok_dir)
    check_tokenizer_fits(tok, handle.get_slice(lm["embed_tokens.weight"]).get_shape()[0], tok_dir, path)
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


# --------------------------------------------------------------------------------------------------- VAE file
# The VAE as ComfyUI ships it (`qwen_image_vae.safetensors`): one file in the Wan 2.1 VAE's module names
# (`encoder.conv1`, `encoder.downsamples.N.residual.*`, `decoder.upsamples.N.*`, `conv1`/`conv2`), no config. ComfyUI
# (comfy/sd.py) detects it as a Wan 2.1 VAE and builds it with a fixed dim_mult [1, 2, 4, 4], 2 res blocks and
# z_dim 16, reading only the width; it normalises latents with the Wan 2.1 latent format's per-channel mean/std
# (comfy/latent_formats.Wan21), which are the class defaults of diffusers' AutoencoderKLQwenImage. Here the whole
# architecture is read off the tensors instead, so a smaller VAE (the micro/tiny one) is built right too; the
# normalisation is not in the tensors: it comes from the file's `config` header entry, else it is Wan 2.1's (what
# ComfyUI uses) and only for the real architecture, and anything else is refused.

REAL_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                temperal_downsample=[False, True, True], input_channels=3)
_VAE_ARCH_KEYS = tuple(REAL_VAE)
_RES_WAN = {"residual.0.gamma": "norm1.gamma", "residual.2.weight": "conv1.weight", "residual.2.bias": "conv1.bias",
            "residual.3.gamma": "norm2.gamma", "residual.6.weight": "conv2.weight", "residual.6.bias": "conv2.bias",
            "shortcut.weight": "conv_shortcut.weight", "shortcut.bias": "conv_shortcut.bias"}
_TOP_WAN = {"conv1": "quant_conv", "conv2": "post_quant_conv", "encoder.conv1": "encoder.conv_in",
            "decoder.conv1": "decoder.conv_in", "encoder.head.0": "encoder.norm_out", "encoder.head.2": "encoder.conv_out",
            "decoder.head.0": "decoder.norm_out", "decoder.head.2": "decoder.conv_out"}


class VaeFileError(ModelLoadError):
    """A single-file VAE whose architecture or normalisation cannot be read exactly."""


def is_wan_vae(keys) -> bool:
    """Wan 2.1 / ComfyUI names (`encoder.conv1`, `decoder.middle.0.residual.0.gamma`), not diffusers'."""
    return "encoder.conv1.weight" in keys and "decoder.middle.0.residual.0.gamma" in keys


def _blocks(state: dict, prefix: str) -> dict[int, dict[str, torch.Tensor]]:
    out: dict[int, dict] = {}
    for k, v in state.items():
        if k.startswith(prefix):
            idx, _, rest = k[len(prefix):].partition(".")
            out.setdefault(int(idx), {})[rest] = v
    return dict(sorted(out.items()))


def _kind(block: dict) -> str:
    if "residual.0.gamma" in block or "norm1.gamma" in block:
        return "res"
    if "resample.1.weight" in block:
        return "resample"
    if "to_qkv.weight" in block:
        return "attn"
    return "unknown"


def infer_vae_architecture(state: dict, path) -> dict:
    """AutoencoderKLQwenImage's architecture arguments (REAL_VAE's keys) read off a single-file VAE's tensors, in
    Wan or diffusers names. Raises VaeFileError naming the file for a layout that does not determine them."""
    wan = "encoder.conv1.weight" in state
    enc = "encoder.downsamples." if wan else "encoder.down_blocks."
    conv_in = state.get("encoder.conv1.weight" if wan else "encoder.conv_in.weight")
    post = state.get("conv2.weight" if wan else "post_quant_conv.weight")
    head = state.get("encoder.head.2.weight" if wan else "encoder.conv_out.weight")
    out_conv = state.get("decoder.head.2.weight" if wan else "decoder.conv_out.weight")
    fix = ("Point `model.vae` at the Qwen-Image VAE as ComfyUI ships it (qwen_image_vae.safetensors) or at a diffusers "
           "AutoencoderKLQwenImage folder (config.json + weights).")
    if conv_in is None or post is None or head is None or out_conv is None:
        raise VaeFileError(f"{path}: not a complete Qwen-Image/Wan 2.1 VAE (encoder input conv, encoder head, decoder "
                           f"head or post-quant conv missing). {fix}")
    stages: list[list[dict]] = [[]]
    resamples: list[dict] = []
    for idx, block in _blocks(state, enc).items():
        kind = _kind(block)
        if kind == "attn":
            raise VaeFileError(f"{path}: attention block at {enc}{idx} (attn_scales != []): not a Qwen-Image VAE "
                               f"layout this loader reads exactly. {fix}")
        if kind == "unknown":
            raise VaeFileError(f"{path}: {enc}{idx} is neither a residual block nor a resample "
                               f"({sorted(block)[:4]}). {fix}")
        if kind == "resample":
            resamples.append(block)
            stages.append([])
        else:
            stages[-1].append(block)
    base_dim = conv_in.shape[0]
    counts = {len(s) for s in stages}
    if len(counts) != 1 or 0 in counts:
        raise VaeFileError(f"{path}: encoder stages have {[len(s) for s in stages]} residual blocks; a Qwen-Image VAE "
                           f"has the same number in every stage. {fix}")
    dim_mult = []
    for i, stage in enumerate(stages):
        widths = {b["residual.6.weight" if wan else "conv2.weight"].shape[0] for b in stage}
        if len(widths) != 1 or next(iter(widths)) % base_dim:
            raise VaeFileError(f"{path}: encoder stage {i} has output widths {sorted(widths)}, not one multiple of "
                               f"the base width {base_dim}. {fix}")
        dim_mult.append(next(iter(widths)) // base_dim)
    arch = dict(base_dim=int(base_dim), z_dim=int(post.shape[0]), dim_mult=dim_mult, num_res_blocks=counts.pop(),
                attn_scales=[], temperal_downsample=["time_conv.weight" in r for r in resamples],
                input_channels=int(conv_in.shape[1]))
    if head.shape[0] != 2 * arch["z_dim"] or out_conv.shape[0] != arch["input_channels"]:
        raise VaeFileError(f"{path}: encoder head gives {head.shape[0]} channels for z_dim {arch['z_dim']} (expected "
                           f"{2 * arch['z_dim']}) / decoder gives {out_conv.shape[0]} image channels for "
                           f"{arch['input_channels']} in. {fix}")
    return arch


def wan_vae_to_diffusers(state: dict, arch: dict, path) -> dict:
    """Wan 2.1 VAE names -> AutoencoderKLQwenImage's, for any depth (diffusers' convert_wan_vae_to_diffusers assumes
    2 res blocks per stage: its decoder grouping is wrong for another count)."""
    per_stage = arch["num_res_blocks"] + 2  # decoder: res blocks (num_res_blocks + 1), then the upsampler
    out = {}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        new = None
        if module in _TOP_WAN:
            new = f"{_TOP_WAN[module]}.{leaf}"
        elif key.startswith(("encoder.middle.", "decoder.middle.")):
            side, _, idx, rest = key.split(".", 3)
            if idx in ("0", "2"):
                new = f"{side}.mid_block.resnets.{int(idx) // 2}.{_RES_WAN.get(rest, rest)}"
            elif idx == "1":
                new = f"{side}.mid_block.attentions.0.{rest}"
        elif key.startswith("encoder.downsamples."):
            _, _, idx, rest = key.split(".", 3)
            new = f"encoder.down_blocks.{idx}.{_RES_WAN.get(rest, rest)}"
        elif key.startswith("decoder.upsamples."):
            _, _, idx, rest = key.split(".", 3)
            stage, pos = divmod(int(idx), per_stage)
            if pos <= arch["num_res_blocks"]:
                new = f"decoder.up_blocks.{stage}.resnets.{pos}.{_RES_WAN.get(rest, rest)}"
            else:
                new = f"decoder.up_blocks.{stage}.upsamplers.0.{rest}"
        if new is None:
            raise VaeFileError(f"{path}: tensor {key} is not part of a Wan 2.1 / Qwen-Image VAE; the file is from "
                               "another model or damaged. Point `model.vae` at qwen_image_vae.safetensors or a "
                               "diffusers AutoencoderKLQwenImage folder.")
        out[new] = value
    return out


def vae_file_config(state: dict, metadata: dict, path) -> dict:
    """The AutoencoderKLQwenImage config of a single-file VAE: the architecture from the tensors; latents_mean/std
    from a `config` header entry (diffusers' config JSON; its architecture must agree with the tensors), else the
    Wan 2.1 values ComfyUI uses (the class defaults) for the real architecture only."""
    arch = infer_vae_architecture(state, path)
    declared = {}
    if "config" in metadata:
        try:
            declared = json.loads(metadata["config"])
        except json.JSONDecodeError as exc:
            raise VaeFileError(f"{path}: header entry `config` is not JSON ({exc}); re-save the VAE.") from exc
        wrong = {k: (declared[k], arch[k]) for k in _VAE_ARCH_KEYS if k in declared and k != "attn_scales"
                 and list(np_list(declared[k])) != list(np_list(arch[k]))}
        if wrong:
            raise VaeFileError(f"{path}: header `config` disagrees with the tensors: " + ", ".join(
                f"{k}={a} in the header, {b} in the tensors" for k, (a, b) in wrong.items()) + ". Re-save the VAE.")
    stats = {k: declared[k] for k in ("latents_mean", "latents_std") if k in declared}
    if len(stats) == 1:
        raise VaeFileError(f"{path}: header `config` has {next(iter(stats))} but not the other of latents_mean / "
                           "latents_std. Re-save the VAE with both.")
    if not stats and arch != REAL_VAE:
        raise VaeFileError(
            f"{path}: a single-file VAE of a non-standard size ({', '.join(f'{k}={v}' for k, v in arch.items())}; "
            f"the Qwen-Image VAE is {REAL_VAE}) with no latents_mean / latents_std: the per-channel latent "
            "normalisation is not in the tensors, and Wan 2.1's (what ComfyUI uses) belongs to the real VAE only. "
            "Point `model.vae` at the diffusers folder of this VAE (config.json has them), or save the file with a "
            "`config` header entry holding latents_mean and latents_std.")
    for k, v in stats.items():
        if len(v) != arch["z_dim"]:
            raise VaeFileError(f"{path}: header `config` {k} has {len(v)} values for z_dim {arch['z_dim']}.")
    return {**arch, "dropout": 0.0, **stats}


def np_list(v):
    return v if isinstance(v, (list, tuple)) else [v]
