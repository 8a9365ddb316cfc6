"""Every exported file applies the trained delta in every program that reads it: ComfyUI's LoRA key rules (restated
in test_export_helpers.py from ComfyUI's source, built from the checkpoint's weight names) and diffusers' own
Krea2Pipeline / Krea2Transformer2DModel loaders; `verify` judges each file the way each of them reads it."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open
from safetensors.torch import save_file
from test_export_helpers import comfyui_errors, comfyui_strength_ratio, max_loaded_error, trained_adapter

from krea2_train.lora.consumers import FORMAT_CONSUMERS
from krea2_train.lora.formats import FORMATS
from krea2_train.lora.writers import write_lora_file

CASES = {
    # rsLoRA: scale alpha / sqrt(r) = 6, which ComfyUI (alpha / r) and an alpha-less reader (1) both miss.
    "rslora_r4_a12": dict(use_rslora=True, r=4, alpha=12),
    # per-module ranks and alphas: a single header alpha or one .alpha would be wrong somewhere.
    "per_module": dict(r=4, alpha=8, rank_pattern={"ff.down": 2, "to_q": 6}, alpha_pattern={"to_gate": 3,
                                                                                             "img_in": 1}),
}


@pytest.fixture(scope="module", params=list(CASES))
def adapter(request, tiny_dir):
    return trained_adapter(tiny_dir, seed=1, **CASES[request.param])


@pytest.fixture(scope="module")
def turbo(tiny_dir):
    from krea2_train.models.loading import load_transformer

    return load_transformer(tiny_dir / "transformer_turbo.safetensors", dtype="float32")


def _pipe(transformer):
    from diffusers import FlowMatchEulerDiscreteScheduler, Krea2Pipeline

    return Krea2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                         transformer=transformer)


def _drop_adapters(transformer):
    for n in list(getattr(transformer, "peft_config", {}) or {}):
        transformer.delete_adapters([n])


@pytest.mark.parametrize("fmt,style", [(f, "alpha") for f in FORMATS] + [("comfyui", "baked"), ("civitai", "baked")])
def test_every_format_exact_in_comfyui_and_diffusers(adapter, turbo, tiny_dir, tmp_path, fmt, style):
    path = write_lora_file(adapter, tmp_path / f"l_{fmt}.safetensors", fmt, dtype="float32", comfyui_style=style)
    ckpt = tiny_dir / "transformer_turbo.safetensors"
    # ComfyUI: every key loads, every trained module's weight gets exactly the trained delta, at any strength.
    for strength in (1.0, 0.6):
        assert max(comfyui_errors(adapter, path, ckpt, strength).values()) < 1e-5
    # diffusers, where its loaders read the layout (the others carry .alpha tensors, which it refuses loudly).
    if "diffusers" in FORMAT_CONSUMERS[fmt] or style == "baked":
        _pipe(turbo).load_lora_weights(str(path), adapter_name="pipe")
        try:
            assert max_loaded_error(adapter, turbo, "pipe") < 1e-5
        finally:
            _drop_adapters(turbo)
    if fmt == "diffusers":  # the header says what the tensors are: alpha = rank, no rsLoRA
        with safe_open(str(path), "pt") as f:
            cfg = json.loads(f.metadata()["lora_adapter_metadata"])
        assert cfg["transformer.use_rslora"] is False and cfg["transformer.lora_alpha"] == cfg["transformer.r"]
        turbo.load_lora_adapter(str(path), prefix="transformer", adapter_name="model")
        try:
            assert max_loaded_error(adapter, turbo, "model") < 1e-5
        finally:
            _drop_adapters(turbo)


def _unbaked_diffusers_file(adapter, path):
    """A diffusers-layout file as this project wrote it before (and as diffusers' save_lora_weights does): raw factors,
    the scale only in the header. Built by hand, not by our writer."""
    state = {k: v.contiguous() for k, v in adapter.peft_state_dict("transformer.").items()}
    cfg = {f"transformer.{k}": v for k, v in adapter.lora_config_dict().items()}
    save_file(state, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(cfg)})
    return path


def test_unbaked_diffusers_file_is_misread_by_comfyui_and_verify_says_so(adapter, turbo, tiny_dir, tmp_path):
    from krea2_train.export.verify import LoraVerifyError, verify_lora_file

    path = _unbaked_diffusers_file(adapter, tmp_path / "old.safetensors")
    ratios = comfyui_strength_ratio(adapter, path, tiny_dir / "transformer_turbo.safetensors")
    expected = {m: 1.0 / adapter.scale(m) for m in adapter.modules}  # ComfyUI applies scale 1
    assert ratios == pytest.approx(expected, rel=1e-5)
    assert max(abs(r - 1) for r in ratios.values()) > 0.5  # the reference sees the wrong strength
    report = verify_lora_file(path, adapter=adapter, transformer=turbo, raise_on_failure=False)
    assert not report.ok and report.valid_for == ["krea2-train", "diffusers"]
    assert report.consumers["comfyui"].startswith("WRONG")
    assert report.comfyui_strength_ratio == pytest.approx([min(expected.values()), max(expected.values())], rel=1e-4)
    with pytest.raises(LoraVerifyError, match=r"(?s)old\.safetensors.*ComfyUI would apply .* of the trained strength"):
        verify_lora_file(path, adapter=adapter, transformer=turbo)
    assert not getattr(turbo, "peft_config", {})


def test_verify_valid_for_agrees_with_the_references(adapter, turbo, tiny_dir, tmp_path):
    """For each of our formats and a few foreign files, verify's verdict per consumer is what the references say."""
    from krea2_train.export.verify import verify_lora_file

    ckpt = tiny_dir / "transformer_turbo.safetensors"
    files = {fmt: write_lora_file(adapter, tmp_path / f"{fmt}.safetensors", fmt, dtype="float32") for fmt in FORMATS}
    files["unbaked-diffusers"] = _unbaked_diffusers_file(adapter, tmp_path / "unbaked.safetensors")
    # ai-toolkit keys (base_model.model.<original>): diffusers converts them, ComfyUI maps none of them for Krea 2.
    baked = adapter.baked()
    from krea2_train.models.keys import diffusers_to_original_module

    toolkit = {}
    for m in baked.modules:
        toolkit[f"base_model.model.{diffusers_to_original_module(m)}.lora_A.weight"] = baked.down[m].contiguous()
        toolkit[f"base_model.model.{diffusers_to_original_module(m)}.lora_B.weight"] = baked.up[m].contiguous()
    save_file(toolkit, str(tmp_path / "toolkit.safetensors"))
    files["ai-toolkit"] = tmp_path / "toolkit.safetensors"
    for what, path in files.items():
        report = verify_lora_file(path, adapter=adapter, transformer=turbo, raise_on_failure=False)
        try:
            comfy_ok = max(comfyui_errors(adapter, path, ckpt).values()) < 1e-4
        except AssertionError:  # keys ComfyUI does not load
            comfy_ok = False
        assert (report.consumers["comfyui"] == "valid") == comfy_ok, (what, report.summary())
        if what in FORMAT_CONSUMERS:
            assert report.ok and report.valid_for == list(FORMAT_CONSUMERS[what]), (what, report.summary())
    assert report.consumers["comfyui"].startswith("not read") and "diffusers" in report.valid_for


@pytest.mark.parametrize("strength", [0.5, 1.7, -1.0])
@pytest.mark.parametrize("fmt", ["comfyui", "diffusers"])
def test_verify_at_any_strength(adapter, turbo, tmp_path, fmt, strength):
    """A correct file verifies at the strength asked (it once failed with 'scale lost or doubled' by 1 - strength);
    a file with a doubled scale still fails at that strength."""
    from krea2_train.export.verify import LoraVerifyError, verify_lora_file
    from krea2_train.lora.formats import TrainedAdapter

    path = write_lora_file(adapter, tmp_path / "l.safetensors", fmt, dtype="float32")
    report = verify_lora_file(path, adapter=adapter, transformer=turbo, strength=strength)
    assert report.ok and report.strength == strength and report.max_delta_error < 1e-5
    assert report.output_error < report.output_tolerance
    if fmt == "diffusers":
        assert report.diffusers_delta_error < 1e-5
    doubled = TrainedAdapter(adapter.down, adapter.up, {m: 2 * a for m, a in adapter.alpha.items()}, adapter.use_rslora)
    bad = write_lora_file(doubled, tmp_path / "bad.safetensors", fmt, dtype="float32")
    with pytest.raises(LoraVerifyError, match="lost or doubled"):
        verify_lora_file(bad, adapter=adapter, transformer=turbo, strength=strength)


def test_cli_verify_strength(adapter, tiny_dir, tmp_path, capsys):
    from krea2_train.cli import main

    path = write_lora_file(adapter, tmp_path / "l.safetensors", "civitai")
    turbo = tiny_dir / "transformer_turbo.safetensors"
    assert main(["verify", str(path), "--turbo", str(turbo), "--strength", "0.5", "--json", str(tmp_path / "v.json")]) == 0
    out = capsys.readouterr().out
    assert "result: OK" in out and "valid for: krea2-train, comfyui" in out
    saved = json.loads((tmp_path / "v.json").read_text())
    assert saved["strength"] == 0.5 and saved["valid_for"] == ["krea2-train", "comfyui"]
    assert main(["verify", str(path), "--turbo", str(turbo), "--strength", "0"]) == 2
    assert "strength 0" in capsys.readouterr().err


def test_bf16_diffusers_file_is_baked_in_full_precision(adapter, tiny_dir, tmp_path):
    """Baking happens before rounding to bf16: the file is as close to the trained delta as a bf16 file can be."""
    path = write_lora_file(adapter, tmp_path / "l.safetensors", "diffusers", dtype="bfloat16")
    errs = comfyui_errors(adapter, path, tiny_dir / "transformer_turbo.safetensors")
    assert max(errs.values()) < 2e-2


def test_inspect_says_how_comfyui_reads_the_file(adapter, tiny_dir, tmp_path):
    """`inspect` (no Turbo needed) flags the file ComfyUI would load at another strength, with the measured factor."""
    from krea2_train.lora.tools import format_inspect, inspect_lora

    old = inspect_lora(_unbaked_diffusers_file(adapter, tmp_path / "old.safetensors"))
    ratios = comfyui_strength_ratio(adapter, tmp_path / "old.safetensors", tiny_dir / "transformer_turbo.safetensors")
    assert old["comfyui_exact"] is False and f"x{min(ratios.values()):.3g}" in old["comfyui"]
    assert "WRONG strength" in format_inspect(old)
    for fmt in FORMATS:
        info = inspect_lora(write_lora_file(adapter, tmp_path / f"{fmt}.safetensors", fmt, dtype="float32"))
        assert info["comfyui_exact"] is True, (fmt, info["comfyui"])
