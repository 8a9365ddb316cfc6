"""LoRA tools: inspect, convert, resize, merge (LoRAs and into a checkpoint), extract."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from test_export_helpers import max_delta_error, peer_state, trained_adapter

from krea2_train.errors import UserError
from krea2_train.lora.formats import TrainedAdapter, read_lora_file
from krea2_train.lora.tools import (
    convert_lora,
    extract_lora,
    format_inspect,
    inspect_lora,
    merge_into_checkpoint,
    merge_loras,
    resize_lora,
)
from krea2_train.lora.writers import write_lora_file


@pytest.fixture(scope="module")
def adapter(tiny_dir):
    return trained_adapter(tiny_dir, r=4, alpha=8, rank_pattern={"ff.down": 2}, alpha_pattern={"to_gate": 3})


@pytest.fixture(scope="module")
def other(tiny_dir):
    return trained_adapter(tiny_dir, seed=1, r=3, alpha=3, use_rslora=True)


def test_inspect(adapter, tmp_path):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    path = write_lora_file(adapter, tmp_path / "c.safetensors", "civitai", metadata={"trigger_words": ["zq"]},
                           preview_png=buf.getvalue())
    info = inspect_lora(path)
    assert info["layout"] == "comfyui" and info["alpha_source"] == "tensors"
    assert info["modules"] == len(adapter.modules) and info["parameters"] == adapter.num_parameters()
    assert info["ranks"] == {4: len(adapter.modules) - 6, 2: 6}  # ff.down in 2 main + 4 text-fusion blocks
    assert info["targets"]["transformer_blocks.*.attn.to_q"] == 2 and info["targets"]["img_in"] == 1
    assert info["scales"][2.0] > 0 and info["alphas"][8] > 0
    assert info["metadata"]["modelspec.thumbnail"].startswith("<image")
    assert not info["diffusers_loadable"] and "alpha" in info["diffusers_problem"]
    text = format_inspect(info)
    assert "layout: comfyui" in text and "modelspec.trigger_phrase: zq" in text


def test_convert_keeps_dtype_and_effect(adapter, tmp_path):
    state, _ = peer_state(adapter.to("bfloat16"), "musubi")
    save_file(state, str(tmp_path / "m.safetensors"))
    out = convert_lora(tmp_path / "m.safetensors", tmp_path / "d.safetensors", "diffusers")
    lora = read_lora_file(out)
    assert lora.layout == "diffusers" and lora.adapter.dtype == torch.bfloat16
    assert max_delta_error(adapter, lora.adapter) < 2e-2  # bf16 rounding of the factors
    scaled = convert_lora(tmp_path / "m.safetensors", tmp_path / "s.safetensors", "comfyui", scale=1.5)
    assert max_delta_error(adapter.scaled(1.5), read_lora_file(scaled).adapter) < 2e-2
    # a suggested Turbo strength in the header follows the baked scale (inspect shows it; the effect is linear)
    write_lora_file(adapter, tmp_path / "t.safetensors", "comfyui", metadata={"turbo_strength": 0.9})
    baked = read_lora_file(convert_lora(tmp_path / "t.safetensors", tmp_path / "t2.safetensors", "comfyui", scale=1.5))
    assert baked.adapter.info["turbo_strength"] == pytest.approx(0.9 / 1.5)


def test_resize_is_the_best_low_rank_approximation(adapter):
    small, report = resize_lora(adapter, rank=2)
    for m in adapter.modules:
        full = adapter.delta(m)
        s = torch.linalg.svdvals(full)
        err = (small.delta(m) - full).norm()
        tol = 1e-4 * full.norm().item()  # float32 noise where the delta already has rank <= 2
        assert err.item() == pytest.approx(s[2:].norm().item(), rel=1e-3, abs=tol)  # Eckart-Young optimum
        assert report[m]["energy"] == pytest.approx(((s[:2] ** 2).sum() / (s**2).sum()).item(), rel=1e-4)
        assert small.rank(m) == min(2, *full.shape) and small.scale(m) == 1.0
    with pytest.raises(UserError, match="only lowers"):  # at or above the current rank nothing would change
        resize_lora(adapter, rank=8)
    same, _ = resize_lora(adapter, rank=8, min_energy=1.0)  # a cap above every rank keeps the delta exactly
    assert max_delta_error(adapter, same) < 1e-5
    for bad in (2, -1, 0):
        with pytest.raises(UserError, match="min-energy"):
            resize_lora(adapter, min_energy=bad)
    dyn, rep = resize_lora(adapter, min_energy=0.9)
    assert all(v["energy"] >= 0.9 - 1e-6 for v in rep.values())
    with pytest.raises(UserError):
        resize_lora(adapter)


def test_merge_loras(adapter, other):
    merged, _ = merge_loras([(adapter, 0.5), (other, -1.0)])
    for m in adapter.modules:
        want = 0.5 * adapter.delta(m) + (-1.0) * other.delta(m)
        assert torch.allclose(merged.delta(m), want, atol=1e-6)
        assert merged.rank(m) == adapter.rank(m) + other.rank(m)
    low, report = merge_loras([(adapter, 0.5), (other, -1.0)], rank=3)
    assert all(low.rank(m) <= 3 for m in low.modules) and all(0 < v["energy"] <= 1 for v in report.values())


def test_merge_into_checkpoint_then_extract_recovers_the_lora(adapter, tiny_dir, tmp_path):
    from krea2_train.models.loading import load_transformer

    raw = tiny_dir / "transformer_raw.safetensors"
    merged = merge_into_checkpoint([(adapter, 1.0)], raw, tmp_path / "merged.safetensors", dtype="float32")
    model = load_transformer(merged, dtype="float32")  # a valid official-layout checkpoint
    base = load_transformer(raw, dtype="float32")
    m = "transformer_blocks.1.attn.to_q"
    got = dict(model.named_modules())[m].weight - dict(base.named_modules())[m].weight
    assert torch.allclose(got, adapter.delta(m), atol=1e-5)
    extracted, report = extract_lora(raw, merged, rank=4)
    assert sorted(extracted.modules) == sorted(adapter.modules)  # untouched layers are skipped
    assert max_delta_error(adapter, extracted) < 1e-3
    assert min(v["energy"] for v in report.values()) > 0.999


def test_extract_turbo_minus_raw(tiny_dir):
    raw, turbo = tiny_dir / "transformer_raw.safetensors", tiny_dir / "transformer_turbo.safetensors"
    from krea2_train.lora.tools import _linear_weights

    wr, wt = _linear_weights(raw), _linear_weights(turbo)
    full, report = extract_lora(raw, turbo, rank=512)  # at full rank: exact, Raw + LoRA = Turbo
    for m in full.modules:
        assert torch.allclose(wr[m] + full.delta(m), wt[m], atol=1e-4)
    low, report = extract_lora(raw, turbo, rank=4)
    m = "transformer_blocks.0.ff.up"
    s = torch.linalg.svdvals(wt[m] - wr[m])
    assert (wr[m] + low.delta(m) - wt[m]).norm().item() == pytest.approx(s[4:].norm().item(), rel=2e-2)
    assert 0 < report[m]["energy"] < 1


def test_extract_rejects_other_models(tiny_dir, tmp_path):
    with pytest.raises(UserError, match="identical"):
        extract_lora(tiny_dir / "transformer_raw.safetensors", tiny_dir / "transformer_raw.safetensors", rank=2)


def test_merge_into_checkpoint_rejects_wrong_size(tiny_dir, tmp_path):
    big = TrainedAdapter({"img_in": torch.zeros(2, 999)}, {"img_in": torch.zeros(128, 2)}, {"img_in": 2.0})
    with pytest.raises(UserError, match="mismatched shapes"):
        merge_into_checkpoint([(big, 1.0)], tiny_dir / "transformer_raw.safetensors", tmp_path / "x.safetensors")


def test_merge_into_comfyui_fp8_scaled_checkpoint(adapter, tiny_dir, tmp_path):
    """A ComfyUI "fp8 scaled" checkpoint (prefixed, float8 weights + scale_weight) is dequantised like the loader
    does, and the merged file is a plain official-layout checkpoint."""
    from safetensors.torch import load_file

    from krea2_train.models.loading import load_transformer

    state = load_file(str(tiny_dir / "transformer_raw.safetensors"))
    fp8 = {}
    for k, v in state.items():
        if v.ndim == 2 and not k.endswith("modulation.lin"):
            scale = v.float().abs().max() / 448.0
            fp8[f"model.diffusion_model.{k}"] = (v.float() / scale).to(torch.float8_e4m3fn)
            fp8[f"model.diffusion_model.{k[:-len('.weight')]}.scale_weight"] = scale.reshape(1)
        else:
            fp8[f"model.diffusion_model.{k}"] = v
    src = tmp_path / "raw_fp8_scaled.safetensors"
    save_file(fp8, str(src))
    merged = merge_into_checkpoint([(adapter, 1.0)], src, tmp_path / "merged.safetensors", dtype="float32")
    base = dict(load_transformer(src, dtype="float32").named_modules())
    got = dict(load_transformer(merged, dtype="float32").named_modules())
    for m in ("transformer_blocks.0.ff.down", "img_in"):
        assert torch.allclose(got[m].weight, base[m].weight + adapter.delta(m), atol=1e-2 * base[m].weight.abs().max())
