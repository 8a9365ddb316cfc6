"""Load Krea 2 components from the files users actually have, with errors that name the file and the fix.

Transformer sources (all end as diffusers' `Krea2Transformer2DModel`; the architecture is never re-implemented):
    * the official single-file safetensors (original module names), also under a `model.diffusion_model.` prefix
    * ComfyUI's quantised single files (fp8 scaled, int8 ConvRot, nvfp4, mxfp8; models/quantized.py reads them
      exactly or refuses them), dequantised, or for training kept 1 byte per weight (`keep_quantized`)
    * a diffusers folder (`config.json` + weights)
Text encoder: a Qwen3-VL folder in Hugging Face layout, or ComfyUI's single file + a tokenizer folder
(models/comfy_files.py). VAE: a Qwen-Image VAE diffusers folder or single file (diffusers or ComfyUI's Wan 2.1
names; models/comfy_files.py).

Single files are read lazily (safetensors mmap) into a model built on the meta device and assigned in place, so a
12.9B checkpoint is never held twice in RAM.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from krea2_train import facts
from krea2_train.errors import ModelLoadError
from krea2_train.models.quantized import FIX as QUANT_FIX
from krea2_train.models.quantized import QuantFormatError, QuantReader, QuantWeight

log = logging.getLogger(__name__)

FULL_ARCHITECTURE = dict(
    in_channels=64,
    num_layers=28,
    attention_head_dim=128,
    num_attention_heads=48,
    num_key_value_heads=12,
    intermediate_size=16384,
    timestep_embed_dim=256,
    text_hidden_dim=2560,
    num_text_layers=12,
    text_num_attention_heads=20,
    text_num_key_value_heads=20,
    text_intermediate_size=6912,
    num_layerwise_text_blocks=2,
    num_refiner_text_blocks=2,
    axes_dims_rope=(32, 48, 48),
)


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    table = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
             "float32": torch.float32, "fp32": torch.float32}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; use one of bfloat16, float16, float32")
    return table[name]


def require_path(path, what: str, config_key: str | None = None) -> Path:
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        where = f" (config key `{config_key}`)" if config_key else ""
        raise ModelLoadError(f"{what} not found: {p}{where}. Fix the path, or run `krea2-train make-tiny DIR` "
                             "for the tiny test model.")
    return p


# --------------------------------------------------------------------------------------------------- safetensors
def open_safetensors(path: Path):
    """Open a safetensors file lazily; turn the library's terse errors into a message a user can act on."""
    from safetensors import safe_open

    if path.is_dir():
        raise ModelLoadError(f"{path} is a folder, expected a .safetensors file (or point at a diffusers folder "
                             "that has config.json)")
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
        keys = list(handle.keys())
    except Exception as exc:  # safetensors raises its own SafetensorError / OSError variants
        size = path.stat().st_size
        raise ModelLoadError(
            f"{path} is not a readable safetensors file or is truncated ({size} bytes; {exc}). "
            "Re-download or re-export it; .ckpt/.pt pickles are not accepted, convert them to safetensors."
        ) from exc
    return handle, keys


def safetensors_metadata(path) -> dict:
    handle, _ = open_safetensors(Path(path))
    return handle.metadata() or {}


def original_names(keys) -> dict[str, str] | None:
    """{original name: key in the file} with any `model.diffusion_model.` / `diffusion_model.` prefix removed, or
    None when the keys are not a Krea 2 transformer (no text-fusion projector)."""
    prefix = next((p for p in facts.ORIGINAL_PREFIXES if p + facts.KREA2_MARKER in keys), "")
    names = {k[len(prefix):]: k for k in keys if k.startswith(prefix)}
    return names if facts.KREA2_MARKER in names else None


def iter_original_tensors(path: Path, dtype: torch.dtype, keep_quantized=None, padded: set | None = None):
    """Yield (original name, tensor) from an original-layout transformer file, one tensor at a time: prefixes
    stripped, ComfyUI's quantised layers dequantised exactly as ComfyUI defines them (models/quantized.py; anything
    it cannot read exactly is refused), norm scales float32 and everything else in `dtype`.

    `keep_quantized(name) -> bool`: for those weights stored as fp8 or int8 (ConvRot or not), yield the
    `QuantWeight` itself (1 byte per weight) instead of a dequantised tensor. `padded`: collects the names of the
    block-format (nvfp4/mxfp8) weights, whose stored shape may be the real one rounded up to the block."""
    handle, keys = open_safetensors(path)
    names = original_names(keys)
    if names is None:
        raise ModelLoadError(
            f"{path} is not a Krea 2 transformer: it has no `{facts.KREA2_MARKER}` (the text-fusion projector). "
            "Check that `model.transformer` points at the Krea 2 Raw/Turbo checkpoint, not a VAE, text encoder or "
            "another model."
        )
    reader = QuantReader(path, handle, names, handle.metadata() or {})
    for name, key in names.items():
        if reader.is_side(name):
            continue  # ComfyUI quantisation markers and side tensors, read with their weight
        q = reader.weight(name)
        if q is None:
            tensor = handle.get_tensor(key)
            if tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
                raise QuantFormatError(f"{path}: tensor {name} is stored as {tensor.dtype} with no ComfyUI "
                                       f"quantisation format for it, so it cannot be read exactly. {QUANT_FIX}")
        elif keep_quantized is not None and keep_quantized(name) and q.one_byte() is not None:
            yield name, q
            continue
        else:
            tensor = q.dequantize()
            if q.padded and padded is not None:
                padded.add(name)
        # Norm scales stay float32 (diffusers' _keep_in_fp32_modules); everything else takes the compute dtype.
        yield name, tensor.to(torch.float32 if name.endswith(".scale") else dtype)


def read_original_state_dict(path: Path, dtype: torch.dtype, keep_quantized=None,
                             padded: set | None = None) -> tuple[dict, dict]:
    """The whole original-layout file as (state dict with original names, header metadata); see
    `iter_original_tensors` for `keep_quantized` and `padded`."""
    state = dict(iter_original_tensors(path, dtype, keep_quantized, padded))
    return state, safetensors_metadata(path)


def _block_linear_weight(name: str) -> bool:
    """The weights kept 1-byte for training: the Linear layers of the transformer blocks (as `quantize_base`)."""
    return name.startswith("blocks.") and name.endswith(".weight") and ".qknorm." not in name and \
        not name.endswith(("norm.scale", "mod.lin.weight"))


def infer_architecture(state: dict, path: Path) -> dict:
    """Read the `Krea2Transformer2DModel` config off the tensor shapes of an original-layout state dict."""
    try:
        head_dim = state["blocks.0.attn.qknorm.qnorm.scale"].shape[0]
        hidden = state["first.weight"].shape[0]
        text_head_dim = state["txtfusion.refiner_blocks.0.attn.qknorm.qnorm.scale"].shape[0]
        text_dim = state["txtfusion.refiner_blocks.0.attn.wq.weight"].shape[1]
        config = dict(
            in_channels=state["first.weight"].shape[1],
            num_layers=1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks.")),
            attention_head_dim=head_dim,
            num_attention_heads=hidden // head_dim,
            num_key_value_heads=state["blocks.0.attn.wk.weight"].shape[0] // head_dim,
            intermediate_size=state["blocks.0.mlp.gate.weight"].shape[0],
            timestep_embed_dim=state["tmlp.0.weight"].shape[1],
            text_hidden_dim=text_dim,
            num_text_layers=state["txtfusion.projector.weight"].shape[1],
            text_num_attention_heads=state["txtfusion.refiner_blocks.0.attn.wq.weight"].shape[0] // text_head_dim,
            text_num_key_value_heads=state["txtfusion.refiner_blocks.0.attn.wk.weight"].shape[0] // text_head_dim,
            text_intermediate_size=state["txtfusion.refiner_blocks.0.mlp.gate.weight"].shape[0],
            num_layerwise_text_blocks=len({k.split(".")[2] for k in state if k.startswith("txtfusion.layerwise_blocks.")}),
            num_refiner_text_blocks=len({k.split(".")[2] for k in state if k.startswith("txtfusion.refiner_blocks.")}),
            # Krea 2 splits each head 1/4 : 3/8 : 3/8 over the (t, h, w) rotary axes: (32, 48, 48) at head dim 128.
            axes_dims_rope=(head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8),
        )
    except KeyError as exc:
        raise ModelLoadError(f"{path} is missing tensor {exc.args[0]!r}: the checkpoint is incomplete or not a "
                             "Krea 2 transformer. Re-download or re-export it.") from exc
    return config


def _check_declared(config: dict, declared: str, path: Path) -> None:
    if declared in ("auto", None):
        return
    if declared == "tiny":
        from krea2_train.models.tiny import TINY_TRANSFORMER as expected
    elif declared == "krea2":
        expected = FULL_ARCHITECTURE
    else:
        raise ModelLoadError(f"model.architecture={declared!r} is not known; use krea2, tiny or auto")
    wrong = {k: (config[k], expected[k]) for k in expected if tuple(np_list(config[k])) != tuple(np_list(expected[k]))}
    if wrong:
        detail = ", ".join(f"{k}={got} (expected {want})" for k, (got, want) in wrong.items())
        raise ModelLoadError(f"{path} does not match model.architecture={declared!r}: {detail}. Point at the right "
                             "checkpoint or set model.architecture: auto.")


def np_list(v):
    return v if isinstance(v, (list, tuple)) else [v]


def detect_variant(path: Path, metadata: dict) -> str | None:
    """'raw' / 'turbo' from header metadata or the file name; None when it cannot tell."""
    text = " ".join([path.name.lower(), *(str(v).lower() for v in metadata.values())])
    if any(w in text for w in ("turbo", "distill", "tdm")):
        return "turbo"
    if "raw" in text or "midtrain" in text:
        return "raw"
    return None


def load_transformer(path, dtype="bfloat16", device="cpu", architecture: str = "auto", expect: str | None = None,
                     allow_turbo: bool = False, config_key: str = "model.transformer", keep_quantized: bool = False):
    """Load a Krea 2 transformer (any supported on-disk format) into `Krea2Transformer2DModel`.

    `keep_quantized` (training base): the transformer blocks' Linear weights that the file stores as fp8 or int8
    (ConvRot or not) stay 1 byte per weight, as `QuantLinear`s dequantised per matmul; everything else (and every
    weight when False) is dequantised on load.

    `expect="raw"` (training) errors on a file that looks like Turbo unless `allow_turbo`, which downgrades it to a
    warning.
    """
    from accelerate import init_empty_weights
    from diffusers import Krea2Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_krea2_transformer_checkpoint_to_diffusers

    path = require_path(path, "Krea 2 transformer", config_key)
    dtype = resolve_dtype(dtype)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} is a folder without config.json; point `{config_key}` at the transformer "
                                 "single file or at a diffusers `transformer/` folder")
        model = Krea2Transformer2DModel.from_pretrained(path, torch_dtype=dtype)
        variant = detect_variant(path, {})
    else:
        padded: set = set()
        state, metadata = read_original_state_dict(path, dtype, _block_linear_weight if keep_quantized else None,
                                                   padded)
        if "txtfusion.projector.weight" in padded:  # its width is the number of text layers: must not be rounded
            raise ModelLoadError(f"{path}: txtfusion.projector is stored in a block format (nvfp4/mxfp8) whose "
                                 "padding hides the number of text layers; use a file that keeps it in bf16/fp8.")
        stored = {n: t for n, t in state.items() if isinstance(t, QuantWeight)}
        # 1-byte layers: a meta placeholder of the right shape now, the QuantLinear after the model is built
        state.update({n: torch.empty(q.qdata.shape, device="meta") for n, q in stored.items()})
        config = infer_architecture(state, path)
        _check_declared(config, architecture, path)
        padded_keys = {k for n in padded for k in convert_krea2_transformer_checkpoint_to_diffusers(
            {n: state[n]})}
        stored_keys = {next(iter(convert_krea2_transformer_checkpoint_to_diffusers({n: state[n]}))): q
                       for n, q in stored.items()}
        state = convert_krea2_transformer_checkpoint_to_diffusers(state)
        with init_empty_weights():
            model = Krea2Transformer2DModel(**config)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ModelLoadError(f"{path}: tensors do not fit Krea2Transformer2DModel (missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}). The file is incomplete or from another model.")
        for key, tensor in state.items():
            want = tuple(expected[key].shape)
            if key in padded_keys and tensor.ndim == 2 and tuple(tensor.shape) != want and all(
                    w <= g < w + 32 and g % 16 == 0 for w, g in zip(want, tensor.shape)):
                state[key] = tensor = tensor[: want[0], : want[1]].contiguous()  # the block format's padding
            if tuple(tensor.shape) != want:
                raise ModelLoadError(f"{path}: tensor {key} has shape {tuple(tensor.shape)}, expected "
                                     f"{want} for the architecture read from the file. "
                                     "The checkpoint is corrupt or mixes two models.")
        model.load_state_dict(state, assign=True)  # tensors are used in place: no second copy
        if stored_keys:
            from krea2_train.runtime.memory import install_quantized

            install_quantized(model, stored_keys)
        variant = detect_variant(path, metadata)
    if expect == "raw" and variant == "turbo":
        msg = (f"{path} looks like the Turbo (distilled) checkpoint, but training expects Raw: LoRAs trained on "
               "Turbo do not transfer well. Point `model.transformer` at Raw, or set "
               "`model.allow_turbo_training: true` to train on it anyway.")
        if not allow_turbo:
            raise ModelLoadError(msg)
        log.warning(msg)
    model.krea2_variant = variant
    return model.to(device).eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------- text encoder
def load_text_encoder(path, dtype="bfloat16", device="cpu", config_key: str = "model.text_encoder",
                      tokenizer=None):
    """Qwen3-VL model + tokenizer from a Hugging Face folder, or from ComfyUI's single file (fp8 scaled or not) with
    the tokenizer from `tokenizer` (`model.tokenizer`; models/comfy_files.py). Only the language model is used."""
    from transformers import AutoTokenizer, Qwen3VLModel

    path = require_path(path, "Qwen3-VL text encoder", config_key)
    if path.is_file() and path.suffix == ".safetensors":
        from krea2_train.models.comfy_files import load_text_encoder_file

        model, tok = load_text_encoder_file(path, tokenizer, resolve_dtype(dtype), config_key)
        return model.to(device).eval().requires_grad_(False), tok
    if not (path.is_dir() and (path / "config.json").exists()):
        raise ModelLoadError(f"{path} is not a Hugging Face model folder (no config.json). Point `{config_key}` at "
                             "the Qwen3-VL-4B-Instruct folder that holds config.json, weights and tokenizer files, "
                             "or at ComfyUI's qwen3vl_4b_*.safetensors file (with `model.tokenizer`).")
    model_type = json.loads((path / "config.json").read_text()).get("model_type", "")
    if not model_type.startswith("qwen3_vl"):
        raise ModelLoadError(f"{path}/config.json says model_type={model_type!r}; Krea 2 needs a Qwen3-VL model "
                             "(model_type qwen3_vl).")
    tok_dir = Path(str(tokenizer)).expanduser() if tokenizer else path
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    except Exception as exc:
        raise ModelLoadError(f"{tok_dir}: cannot load the tokenizer ({exc}); the folder needs tokenizer.json and "
                             "tokenizer_config.json") from exc
    from transformers.utils import logging as hf_logging

    # The HF checkpoint is Qwen3VLForConditionalGeneration; its lm_head is unused here and the load report about it
    # is noise.
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = Qwen3VLModel.from_pretrained(path, torch_dtype=resolve_dtype(dtype))
    finally:
        hf_logging.set_verbosity(previous)
    from krea2_train.models.comfy_files import check_tokenizer_fits

    check_tokenizer_fits(tokenizer, model.language_model.embed_tokens.num_embeddings, tok_dir, path)
    return model.to(device).eval().requires_grad_(False), tokenizer


# --------------------------------------------------------------------------------------------------- VAE
def load_vae(path, dtype="float32", device="cpu", config_key: str = "model.vae"):
    """Qwen-Image VAE from a diffusers folder, or a single file in diffusers or Wan 2.1 names (ComfyUI's
    qwen_image_vae.safetensors): the architecture read off the tensors (models/comfy_files.vae_file_config)."""
    from diffusers import AutoencoderKLQwenImage

    path = require_path(path, "Qwen-Image VAE", config_key)
    dtype = resolve_dtype(dtype)
    if path.is_dir():
        sub = path / "vae" if (path / "vae" / "config.json").exists() else path
        vae = AutoencoderKLQwenImage.from_pretrained(sub, torch_dtype=dtype)
    else:
        from accelerate import init_empty_weights

        from krea2_train.models.comfy_files import is_wan_vae, vae_file_config, wan_vae_to_diffusers

        handle, keys = open_safetensors(path)
        state = {k: handle.get_tensor(k) for k in keys}
        if "encoder.conv1.weight" not in state and "encoder.conv_in.weight" not in state:
            raise ModelLoadError(f"{path} is not a Qwen-Image VAE (no encoder.conv1 / encoder.conv_in). Point "
                                 f"`{config_key}` at the VAE file (ComfyUI's qwen_image_vae.safetensors) or folder.")
        # The whole architecture is read off the tensors (models/comfy_files.py), the normalisation from the header
        # or, for the real VAE only, Wan 2.1's (what ComfyUI uses); anything else is refused naming the file.
        config = vae_file_config(state, handle.metadata() or {}, path)
        if is_wan_vae(keys):  # Wan 2.1 names, as ComfyUI ships it
            state = wan_vae_to_diffusers(state, config, path)
        with init_empty_weights():
            vae = AutoencoderKLQwenImage(**config)
        expected = vae.state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        wrong = [k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape)]
        if missing or unexpected or wrong:
            raise ModelLoadError(f"{path}: tensors do not fit the Qwen-Image VAE read from the file ({config}): "
                                 f"missing {missing[:4]}, unexpected {unexpected[:4]}, wrong shape {wrong[:4]}. The "
                                 "file is incomplete or from another model; re-download it.")
        vae.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    return vae.to(device).eval().requires_grad_(False)
