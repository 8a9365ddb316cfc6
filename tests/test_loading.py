"""Every transformer/text-encoder/VAE format we accept loads exactly; every bad input gets a message naming the
file and the fix."""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from krea2_train.models.keys import diffusers_to_original_module, original_to_diffusers_module
from krea2_train.models.loading import ModelLoadError, load_text_encoder, load_transformer, load_vae
from krea2_train.models.tiny import TINY_TRANSFORMER


@pytest.fixture(scope="module")
def reference(tiny_dir, tmp_path_factory):
    """diffusers' own single-file loader is the reference."""
    from diffusers import Krea2Transformer2DModel

    cfg_dir = tmp_path_factory.mktemp("cfg")
    (cfg_dir / "config.json").write_text(json.dumps({"_class_name": "Krea2Transformer2DModel", **TINY_TRANSFORMER}))
    model = Krea2Transformer2DModel.from_single_file(str(tiny_dir / "transformer_raw.safetensors"),
                                                     config=str(cfg_dir), torch_dtype=torch.float32)
    return {k: v.float() for k, v in model.state_dict().items()}


def assert_same(model, reference, atol=0.0):
    state = model.state_dict()
    assert set(state) == set(reference)
    for k, v in reference.items():
        torch.testing.assert_close(state[k].float(), v, atol=atol, rtol=0)


def test_official_single_file_matches_diffusers(tiny_dir, reference):
    model = load_transformer(tiny_dir / "transformer_raw.safetensors", dtype="float32", architecture="tiny")
    assert_same(model, reference)
    assert model.krea2_variant == "raw"


def test_bf16_keeps_norms_fp32(tiny_dir):
    model = load_transformer(tiny_dir / "transformer_raw.safetensors", dtype="bfloat16")
    assert model.transformer_blocks[0].norm1.weight.dtype == torch.float32
    assert model.transformer_blocks[0].attn.to_q.weight.dtype == torch.bfloat16


def test_prefixed_single_file(tiny_dir, tmp_path, reference):
    state = load_file(tiny_dir / "transformer_raw.safetensors")
    save_file({f"model.diffusion_model.{k}": v for k, v in state.items()}, tmp_path / "prefixed.safetensors")
    assert_same(load_transformer(tmp_path / "prefixed.safetensors", dtype="float32"), reference)


def test_comfyui_fp8_scaled_dequantised(tiny_dir, tmp_path, reference):
    state = load_file(tiny_dir / "transformer_raw.safetensors")
    fp8 = {}
    for k, v in state.items():
        if v.ndim == 2 and k.endswith(".weight"):
            scale = v.float().abs().max() / 448.0
            fp8[k] = (v.float() / scale).to(torch.float8_e4m3fn)
            fp8[k[: -len("weight")] + "scale_weight"] = scale.reshape(1)
        else:
            fp8[k] = v
    fp8["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)  # ComfyUI's marker tensor
    save_file(fp8, tmp_path / "fp8.safetensors")
    model = load_transformer(tmp_path / "fp8.safetensors", dtype="bfloat16")
    q = model.transformer_blocks[0].attn.to_q.weight
    assert q.dtype == torch.bfloat16
    ref_q = reference["transformer_blocks.0.attn.to_q.weight"]
    # fp8 e4m3 keeps 3 mantissa bits: relative error per element is at most 2^-4 (plus bf16 rounding).
    assert ((q.float() - ref_q).abs() <= ref_q.abs() * 0.07 + 1e-3).all()
    assert not torch.equal(q.float(), ref_q)


def test_diffusers_folder(tiny_dir, tmp_path, reference):
    model = load_transformer(tiny_dir / "transformer_raw.safetensors", dtype="float32")
    model.save_pretrained(tmp_path / "transformer")
    assert_same(load_transformer(tmp_path / "transformer", dtype="float32"), reference)


def test_missing_path_names_file_and_key(tmp_path):
    with pytest.raises(ModelLoadError, match=r"not found: .*nope.safetensors.*model.transformer"):
        load_transformer(tmp_path / "nope.safetensors")


def test_not_safetensors(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"PK\x03\x04 this is a zip/pickle, not safetensors")
    with pytest.raises(ModelLoadError, match="not a readable safetensors file or is truncated"):
        load_transformer(bad)


def test_truncated(tiny_dir, tmp_path):
    data = (tiny_dir / "transformer_raw.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated"):
        load_transformer(cut)


def test_not_krea2(tiny_dir, tmp_path):
    state = load_file(tiny_dir / "transformer_raw.safetensors")
    state.pop("txtfusion.projector.weight")
    save_file(state, tmp_path / "other.safetensors")
    with pytest.raises(ModelLoadError, match="not a Krea 2 transformer.*txtfusion.projector"):
        load_transformer(tmp_path / "other.safetensors")


def test_declared_architecture_mismatch(tiny_dir):
    with pytest.raises(ModelLoadError, match="does not match model.architecture='krea2'.*num_layers=2 \\(expected 28\\)"):
        load_transformer(tiny_dir / "transformer_raw.safetensors", architecture="krea2")


def test_inconsistent_shapes(tiny_dir, tmp_path):
    state = load_file(tiny_dir / "transformer_raw.safetensors")
    state["blocks.1.attn.wq.weight"] = state["blocks.1.attn.wq.weight"][:, :-8].contiguous()
    save_file(state, tmp_path / "mixed.safetensors")
    with pytest.raises(ModelLoadError, match="transformer_blocks.1.attn.to_q.weight has shape"):
        load_transformer(tmp_path / "mixed.safetensors")


def test_turbo_where_raw_expected(tiny_dir, caplog):
    with pytest.raises(ModelLoadError, match="looks like the Turbo.*allow_turbo_training"):
        load_transformer(tiny_dir / "transformer_turbo.safetensors", expect="raw")
    with caplog.at_level(logging.WARNING):
        model = load_transformer(tiny_dir / "transformer_turbo.safetensors", expect="raw", allow_turbo=True)
    assert model.krea2_variant == "turbo" and "looks like the Turbo" in caplog.text


def test_text_encoder_and_vae_load(tiny_dir, tmp_path):
    from diffusers import AutoencoderKLQwenImage
    from transformers import Qwen3VLModel

    model, tokenizer = load_text_encoder(tiny_dir / "text_encoder")
    assert isinstance(model, Qwen3VLModel) and tokenizer.pad_token == "<|endoftext|>"
    vae = load_vae(tiny_dir / "vae")
    assert isinstance(vae, AutoencoderKLQwenImage)
    # single file, diffusers names, config in the header
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, tmp_path / "vae.safetensors",
              metadata={"config": json.dumps({k: v for k, v in vae.config.items() if not k.startswith("_")})})
    single = load_vae(tmp_path / "vae.safetensors")
    for k, v in vae.state_dict().items():
        assert torch.equal(single.state_dict()[k], v)


def test_text_encoder_errors(tiny_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="not a Qwen3-VL text encoder"):  # a file: read as ComfyUI's single file
        load_text_encoder(tiny_dir / "transformer_raw.safetensors")
    with pytest.raises(ModelLoadError, match="not a Hugging Face model folder"):
        load_text_encoder(tiny_dir / "text_encoder" / "tokenizer.json")
    with pytest.raises(ModelLoadError, match="needs a Qwen3-VL model"):
        load_text_encoder(tiny_dir / "vae")
    with pytest.raises(ModelLoadError, match="not a Qwen-Image VAE"):
        load_vae(tiny_dir / "transformer_raw.safetensors")


def test_module_name_maps_roundtrip_against_diffusers(tiny_dir):
    """Our name table agrees with diffusers' own Krea 2 LoRA converter, for every Linear of the model."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_krea2_lora_to_diffusers

    model = load_transformer(tiny_dir / "transformer_raw.safetensors", dtype="float32")
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) > 20
    for name in linears:
        original = diffusers_to_original_module(name)
        assert original is not None, name
        assert original_to_diffusers_module(original) == name
        converted = _convert_non_diffusers_krea2_lora_to_diffusers(
            {f"diffusion_model.{original}.lora_A.weight": torch.zeros(1)})
        assert list(converted) == [f"transformer.{name}.lora_A.weight"]
