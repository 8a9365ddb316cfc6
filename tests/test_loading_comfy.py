"""ComfyUI's quantised transformer files, written from the tiny model by an independent quantiser (tests/_comfy_quant.py)
that follows ComfyUI's rules: each loads within its format's precision of the original weights, or is refused with a
message naming the file, the layer and the format. Nothing loads wrong."""

import math

import pytest
import torch
from _comfy_quant import marker, quantize_file, regular_hadamard
from safetensors.torch import load_file, save_file

from krea2_train.models.loading import ModelLoadError, load_transformer
from krea2_train.models.quantized import QuantFormatError, hadamard

FORMATS = ["float8_e4m3fn", "int8_convrot", "int8_tensorwise", "nvfp4", "mxfp8"]


@pytest.fixture(scope="module")
def original(tiny_dir):
    return load_file(tiny_dir / "transformer_raw.safetensors")


@pytest.fixture(scope="module")
def exact(tiny_dir):
    """The unquantised tiny model's weights (loader exact against diffusers: tests/test_loading.py)."""
    model = load_transformer(tiny_dir / "transformer_raw.safetensors", dtype="float32")
    return {k: v.float() for k, v in model.state_dict().items()}


def write(tmp_path, state, header=None, name="q.safetensors"):
    save_file(state, tmp_path / name, metadata=header or None)
    return tmp_path / name


def bound(fmt, w, groupsize=256):
    """The most a weight may be off after quantisation in `fmt`, per element (or per row for ConvRot, whose rounding
    error is spread by the rotation), from the format's rule applied to the original weight."""
    w = w.float()
    if fmt == "float8_e4m3fn":  # 3 mantissa bits: half an ulp is 2^-4 relative; e4m3 subnormals step 2^-9
        s = w.abs().max() / 448
        return w.abs() / 16 + s * 2 ** -9
    if fmt == "mxfp8":
        n, k = w.shape
        amax = w.reshape(n, k // 32, 32).abs().amax(-1, keepdim=True)
        s = torch.exp2(torch.ceil(torch.log2(amax.clamp(min=1e-30) / 448)))
        return w.abs() / 16 + (s * 2 ** -9).expand(n, k // 32, 32).reshape(n, k)
    if fmt == "nvfp4":  # e2m1 steps are at most 2 (4 -> 6) times the block scale amax_b / 6 (+1/16 fp8 rounding)
        n, k = w.shape
        amax = w.reshape(n, k // 16, 16).abs().amax(-1, keepdim=True)
        return (amax / 6 * 1.07).expand(n, k // 16, 16).reshape(n, k) + 1e-7
    if fmt == "int8_tensorwise":
        return (w.abs().amax(1, keepdim=True) / 127 / 2).expand_as(w) * 1.001
    # int8 ConvRot: half a step (row scale / 2) per rotated element; the rotation is orthogonal, so per row the
    # error's L2 norm is at most sqrt(K) * scale / 2
    n, k = w.shape
    rot = (w.reshape(n, k // groupsize, groupsize) @ regular_hadamard(groupsize).T).reshape(n, k)
    return rot.abs().amax(1) / 127 / 2 * math.sqrt(k) * 1.001


def check_close(model, exact, fmt, quantised_keys, groupsize=256):
    state = {k: v.float() for k, v in model.state_dict().items()}
    errors = {}
    for key, ref in exact.items():
        got = state[key]
        if key not in quantised_keys:
            assert torch.equal(got, ref), key
            continue
        diff = got - ref
        b = bound(fmt, ref, groupsize)
        if fmt == "int8_convrot":
            assert (diff.norm(dim=1) <= b + 1e-7).all(), key
        else:
            assert (diff.abs() <= b).all(), (key, (diff.abs() - b).max())
        errors[key] = (diff.norm() / ref.norm()).item()
    assert errors and all(e > 0 for e in errors.values())  # quantised for real
    return errors


def quantised_block_keys(exact, select=lambda k, w: True):
    return {k for k, w in exact.items() if k.startswith("transformer_blocks.") and k.endswith(".weight")
            and w.ndim == 2 and select(k, w)}


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_recovers_the_weights(original, exact, tmp_path, fmt):
    gs = 64 if fmt == "int8_convrot" else 256  # the tiny model's 128/256 input features: group 64 rotates all
    state, header = quantize_file(original, fmt, groupsize=gs)
    model = load_transformer(write(tmp_path, state, header), dtype="float32")
    errors = check_close(model, exact, fmt, quantised_block_keys(exact), gs)
    worst = max(errors.values())
    assert worst < {"float8_e4m3fn": 0.05, "mxfp8": 0.05, "nvfp4": 0.2}.get(fmt, 0.02), errors


def test_int8_convrot_groupsize_256(original, exact, tmp_path):
    """Comfy-Org's files rotate in groups of 256: in the tiny model only mlp.down has 256 input features."""
    sel = lambda n, t: t.shape[1] % 256 == 0  # noqa: E731
    state, header = quantize_file(original, "int8_convrot", select=lambda n, t: n.startswith("blocks.") and sel(n, t))
    model = load_transformer(write(tmp_path, state, header), dtype="float32")
    keys = quantised_block_keys(exact, lambda k, w: w.shape[1] % 256 == 0)
    assert keys and all(".ff.down." in k for k in keys)
    check_close(model, exact, "int8_convrot", keys, 256)


@pytest.mark.parametrize("style", ["header", "legacy"])
def test_fp8_marked_by_header_or_legacy(original, exact, tmp_path, style):
    state, header = quantize_file(original, "float8_e4m3fn", style=style)
    model = load_transformer(write(tmp_path, state, header), dtype="float32")
    check_close(model, exact, "float8_e4m3fn", quantised_block_keys(exact))


def test_int8_header_convrot(original, exact, tmp_path):
    state, header = quantize_file(original, "int8_convrot", style="header", groupsize=64)
    model = load_transformer(write(tmp_path, state, header), dtype="float32")
    check_close(model, exact, "int8_convrot", quantised_block_keys(exact), 64)


def test_hadamard_is_comfyuis():
    for size in (4, 16, 64, 256):
        h = hadamard(size)
        torch.testing.assert_close(h, regular_hadamard(size), rtol=0, atol=1e-7)
        torch.testing.assert_close(h @ h, torch.eye(size), rtol=0, atol=1e-5)  # symmetric and orthogonal
    with pytest.raises(ValueError):
        hadamard(128)


def one_layer(original, fmt, **kw):
    """Quantise only blocks.0.attn.wq (a 128x128 weight; ConvRot in groups of 64)."""
    kw.setdefault("groupsize", 64)
    return quantize_file(original, fmt, select=lambda n, t: n == "blocks.0.attn.wq.weight", **kw)


def refused(tmp_path, state, header=None, *words):
    path = write(tmp_path, state, header, "bad.safetensors")
    with pytest.raises(ModelLoadError if not words or words[0] != "quant" else QuantFormatError) as err:
        load_transformer(path, dtype="float32")
    msg = str(err.value)
    assert str(path) in msg
    return msg


@pytest.mark.parametrize("fmt, side", [("int8_convrot", "weight_scale"), ("int8_tensorwise", "weight_scale"),
                                       ("float8_e4m3fn", "weight_scale"), ("nvfp4", "weight_scale_2"),
                                       ("nvfp4", "weight_scale"), ("mxfp8", "weight_scale")])
def test_missing_scale_is_refused(original, tmp_path, fmt, side):
    state, header = one_layer(original, fmt)
    del state[f"blocks.0.attn.wq.{side}"]
    msg = refused(tmp_path, state, header)
    assert "blocks.0.attn.wq" in msg and "missing" in msg


def test_unmarked_int8_is_refused(original, tmp_path):
    """The silent wrong answer of issue 13: int8 values cast with no scale (relative error 1.4e3). Without its
    marker an int8 weight cannot be read; with it, it loads exactly (test_each_format_recovers_the_weights)."""
    state, header = one_layer(original, "int8_convrot")
    del state["blocks.0.attn.wq.comfy_quant"]
    msg = refused(tmp_path, state, header)
    assert "int8" in msg and "blocks.0.attn.wq" in msg


def test_fp8_without_scale_in_a_scaled_file_is_refused(original, tmp_path):
    state, header = quantize_file(original, "float8_e4m3fn", style="legacy")
    del state["blocks.1.mlp.up.scale_weight"]
    assert "without a scale" in refused(tmp_path, state, header)


@pytest.mark.parametrize("conf, why", [
    ({"format": "convrot_w4a4", "convrot_groupsize": 256}, "not supported"),
    ({"format": "asym_w4a8_int8"}, "not supported"),
    ({"format": "int4_magic"}, "unknown quantisation format"),
    ({"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 128}, "power of 4"),
    ({"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 256}, "does not divide"),
    ({"format": "float8_e4m3fn"}, "stored as torch.int8"),
])
def test_formats_not_read_exactly_are_refused(original, tmp_path, conf, why):
    state, header = one_layer(original, "int8_convrot")
    state["blocks.0.attn.wq.comfy_quant"] = marker(conf)
    msg = refused(tmp_path, state, header)
    assert why in msg and conf["format"] in msg and "blocks.0.attn.wq" in msg


def test_bad_scale_shape_and_orphan_side_tensor_refused(original, tmp_path):
    state, header = one_layer(original, "int8_tensorwise")
    state["blocks.0.attn.wq.weight_scale"] = torch.ones(3, 1)
    assert "weight_scale has shape" in refused(tmp_path, state, header)
    state, header = one_layer(original, "float8_e4m3fn")
    state["blocks.0.attn.nothing.weight_scale"] = torch.ones(())
    assert "belongs to no weight" in refused(tmp_path, state, header)


def test_nvfp4_projector_padding_refused(original, tmp_path):
    """txtfusion.projector is 1x12: nvfp4 pads it to 16x16, which would hide the number of text layers."""
    from _comfy_quant import nvfp4

    state = dict(original)
    w = torch.nn.functional.pad(state["txtfusion.projector.weight"].float(), (0, 4, 0, 15))
    parts = nvfp4(w)
    state["txtfusion.projector.weight"] = parts.pop("weight")
    state.update({f"txtfusion.projector.{k}": v for k, v in parts.items()})
    state["txtfusion.projector.comfy_quant"] = marker({"format": "nvfp4"})
    assert "number of text layers" in refused(tmp_path, state)


# ------------------------------------------------------------------------------------------ 1-byte training base
@pytest.mark.parametrize("fmt, cls", [("float8_e4m3fn", "Fp8Linear"), ("int8_convrot", "Int8Linear")])
def test_training_base_stays_one_byte_and_matches(original, tmp_path, fmt, cls):
    """keep_quantized: the blocks' Linear layers are QuantLinears over the file's own bytes (nothing requantised);
    forward and input gradient equal the dequantised-on-load model's (same weights, different order of operations)."""
    from krea2_train.runtime import memory

    state, header = quantize_file(original, fmt, groupsize=64)
    path = write(tmp_path, state, header)
    kept = load_transformer(path, dtype="float32", keep_quantized=True)
    plain = load_transformer(path, dtype="float32")
    layer = kept.transformer_blocks[0].attn.to_q
    assert type(layer).__name__ == cls and layer.weight.element_size() == 1
    assert layer.rotation == (64 if fmt == "int8_convrot" else 0)
    assert kept._krea2_file_quantized == [fmt if fmt != "int8_convrot" else "int8_tensorwise_convrot"]
    n = sum(isinstance(m, memory.QuantLinear) for m in kept.modules())
    assert n == 2 * 8  # 2 blocks x (q, k, v, out, gate, mlp gate, up, down)
    for key, w in plain.state_dict().items():  # same weights: the QuantLinear's dequantised weight is exact
        if key.endswith(".weight") and key[: -len(".weight")] in dict(kept.named_modules()):
            mod = kept.get_submodule(key[: -len(".weight")])
            if isinstance(mod, memory.QuantLinear):
                torch.testing.assert_close(mod.dequantized_weight(), w, rtol=0, atol=1e-6)
    torch.manual_seed(0)
    x = torch.randn(3, 5, 128, requires_grad=True)
    y = layer(x)
    ref_layer = plain.transformer_blocks[0].attn.to_q
    torch.testing.assert_close(y, ref_layer(x), rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (gr,) = torch.autograd.grad(ref_layer(x), x, g)
    torch.testing.assert_close(gx, gr, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------- Turbo files
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantised_turbo_swaps_into_a_base(tiny_dir, tmp_path, fmt):
    """Previews swap Turbo's weights into the training base in place (runtime/swap.py): from a quantised Turbo file
    the base gets exactly the weights load_transformer reads from it; and back to Raw bit for bit."""
    from krea2_train.runtime.swap import copy_base_weights

    turbo_state, header = quantize_file(load_file(tiny_dir / "transformer_turbo.safetensors"), fmt, groupsize=64)
    turbo = write(tmp_path, turbo_state, header, "krea2_turbo_q.safetensors")
    base = load_transformer(tiny_dir / "transformer_raw.safetensors", dtype="float32")
    raw = {k: v.clone() for k, v in base.state_dict().items()}
    copy_base_weights(base, turbo)
    want = load_transformer(turbo, dtype="float32").state_dict()
    for k, v in base.state_dict().items():
        assert torch.equal(v, want[k]), k
    copy_base_weights(base, tiny_dir / "transformer_raw.safetensors")
    assert all(torch.equal(v, raw[k]) for k, v in base.state_dict().items())


def test_one_byte_base_cannot_be_swapped_in_place(tmp_path, original):
    """A 1-byte base is refused by the in-place swap (TypeError), so previews fall back to a separate Turbo copy."""
    from krea2_train.runtime.swap import copy_base_weights

    state, header = quantize_file(original, "int8_convrot", groupsize=64)
    path = write(tmp_path, state, header)
    with pytest.raises(TypeError):
        copy_base_weights(load_transformer(path, dtype="float32", keep_quantized=True), path)


# ---------------------------------------------------------------------------------------------------- inspect
def test_inspect_checkpoint(tiny_dir, original, tmp_path, capsys):
    from krea2_train.cli import main

    state, header = quantize_file(original, "int8_convrot", groupsize=64)
    path = write(tmp_path, state, header, "krea2_raw_int8_convrot.safetensors")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "raw" in out and "int8_tensorwise" in out and "16 x int8_tensorwise convrot/64" in out
    assert "text fusion:" in out and "loads: yes" in out
    assert main(["inspect", str(tiny_dir / "transformer_turbo.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "turbo" in out and "bf16" in out
    state["blocks.0.attn.wq.comfy_quant"] = marker({"format": "convrot_w4a4"})
    bad = write(tmp_path, state, header, "bad.safetensors")
    assert main(["inspect", str(bad)]) == 0
    assert "loads: NO" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- text encoder file
def _comfy_text_encoder_file(tiny_dir, tmp_path, fp8_layers: bool):
    """The tiny Qwen3-VL as ComfyUI ships the real one: one file, Hugging Face's tensor names, language-model Linear
    weights fp8 scaled with comfy_quant markers (qwen3vl_4b_fp8_scaled.safetensors)."""
    from _comfy_quant import fp8

    state = load_file(tiny_dir / "text_encoder" / "model.safetensors")
    out = {}
    for k, v in state.items():
        if fp8_layers and k.startswith("model.language_model.layers.") and k.endswith("_proj.weight"):
            parts = fp8(v)
            out[k] = parts["weight"]
            out[k[: -len("weight")] + "weight_scale"] = parts["weight_scale"]
            out[k[: -len("weight")] + "comfy_quant"] = marker({"format": "float8_e4m3fn"})
        else:
            out[k] = v
    return write(tmp_path, out, None, "qwen3vl_tiny_fp8_scaled.safetensors" if fp8_layers else "qwen3vl_tiny.safetensors")


@pytest.mark.parametrize("with_config", [True, False])
def test_single_file_text_encoder(tiny_dir, tmp_path, with_config):
    """Hidden states from the single file equal the folder's (bf16/fp32 file: exactly; the config read from the
    tokenizer folder's config.json or inferred from the shapes), and the fp8-scaled file within fp8 precision."""
    import shutil

    from krea2_train.models.text_encoder import TextEncoder

    tok = tmp_path / "tok"
    tok.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json") + (("config.json",) if with_config else ()):
        shutil.copy(tiny_dir / "text_encoder" / f, tok / f)
    ref = TextEncoder.from_path(tiny_dir / "text_encoder")
    prompts = ["a red cube on a table", "two cats"]
    want, mask = ref.encode(prompts)
    plain = TextEncoder.from_path(_comfy_text_encoder_file(tiny_dir, tmp_path, False), tokenizer=tok)
    got, got_mask = plain.encode(prompts)
    assert torch.equal(got_mask, mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    scaled = TextEncoder.from_path(_comfy_text_encoder_file(tiny_dir, tmp_path, True), tokenizer=tok)
    got8, _ = scaled.encode(prompts)
    rel = ((got8 - want).norm() / want.norm()).item()
    assert 0 < rel < 0.1, rel


def test_single_file_text_encoder_needs_tokenizer(tiny_dir, tmp_path):
    from krea2_train.models.loading import load_text_encoder

    path = _comfy_text_encoder_file(tiny_dir, tmp_path, True)
    with pytest.raises(ModelLoadError, match="model.tokenizer"):
        load_text_encoder(path)
    with pytest.raises(ModelLoadError, match="not a Qwen3-VL text encoder"):
        load_text_encoder(tiny_dir / "transformer_raw.safetensors", tokenizer=tiny_dir / "text_encoder")


def test_config_check_says_the_tokenizer_is_missing(tiny_dir, tmp_path):
    """`krea2-train config` (model path checks) names model.tokenizer before any work when the text encoder is
    ComfyUI's single file."""
    from krea2_train.config import load_config
    from krea2_train.models.paths import model_path_problems

    te = _comfy_text_encoder_file(tiny_dir, tmp_path, True)
    base = [f"model.transformer={tiny_dir}/transformer_raw.safetensors", f"model.text_encoder={te}",
            f"model.vae={tiny_dir}/vae", f"output_dir={tmp_path}"]
    problems = model_path_problems(load_config(None, base))
    assert len(problems) == 1 and "model.tokenizer" in problems[0] and "model.text_encoder" in problems[0]
    assert model_path_problems(load_config(None, base + [f"model.tokenizer={tiny_dir}/text_encoder"])) == []
