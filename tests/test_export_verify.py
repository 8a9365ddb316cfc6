"""Verification on Turbo, export_and_verify from the trainer's adapter folder, the CLI and the transfer report."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from test_export_helpers import peer_state, trained_adapter, trained_transformer

from krea2_train.export.verify import LoraVerifyError, verify_lora_file
from krea2_train.lora.formats import TrainedAdapter, read_lora_file
from krea2_train.lora.writers import write_lora_file


@pytest.fixture(scope="module")
def adapter(tiny_dir):
    return trained_adapter(tiny_dir, use_rslora=True, r=4, alpha=6, rank_pattern={"ff.up": 2})


@pytest.fixture(scope="module")
def turbo(tiny_dir):
    from krea2_train.models.loading import load_transformer

    return load_transformer(tiny_dir / "transformer_turbo.safetensors", dtype="float32")


@pytest.mark.parametrize("fmt,dtype", [("diffusers", "bfloat16"), ("civitai", "bfloat16"), ("original", "float32")])
def test_exported_files_verify(adapter, turbo, tmp_path, fmt, dtype):
    path = write_lora_file(adapter, tmp_path / "l.safetensors", fmt, dtype=dtype)
    report = verify_lora_file(path, adapter=adapter, transformer=turbo)
    assert report.ok and report.modules == len(adapter.modules)
    assert report.max_delta_error <= report.delta_tolerance and report.output_error <= report.output_tolerance
    assert report.output_change > 1e-3  # the LoRA visibly changes Turbo's prediction
    if fmt in ("diffusers", "original"):
        assert report.diffusers.startswith("loaded") and report.diffusers_output_error < 1e-5
    else:
        assert report.diffusers.startswith("skipped")
    assert not getattr(turbo, "peft_config", {})  # verification leaves the model clean


def test_verify_catches_a_doubled_scale(adapter, turbo, tmp_path):
    doubled = TrainedAdapter(adapter.down, adapter.up, {m: 2 * a for m, a in adapter.alpha.items()}, True)
    path = write_lora_file(doubled, tmp_path / "bad.safetensors", "comfyui", dtype="float32")
    with pytest.raises(LoraVerifyError, match=r"(?s)bad\.safetensors.*scale \(alpha\) was lost or doubled.*FAILED"):
        verify_lora_file(path, adapter=adapter, transformer=turbo)


def test_verify_catches_a_dropped_module(adapter, turbo, tmp_path):
    keep = [m for m in adapter.modules if m != "img_in"]
    partial = TrainedAdapter({m: adapter.down[m] for m in keep}, {m: adapter.up[m] for m in keep},
                             {m: adapter.alpha[m] for m in keep}, True)
    path = write_lora_file(partial, tmp_path / "partial.safetensors", "diffusers", dtype="float32")
    with pytest.raises(LoraVerifyError, match="trained modules are missing from the file.*img_in"):
        verify_lora_file(path, adapter=adapter, transformer=turbo)


def test_verify_rejects_a_lora_for_another_model_size(turbo, tmp_path):
    wide = TrainedAdapter({"transformer_blocks.0.attn.to_q": torch.randn(2, 6144)},
                          {"transformer_blocks.0.attn.to_q": torch.randn(6144, 2)},
                          {"transformer_blocks.0.attn.to_q": 2.0})
    path = write_lora_file(wide, tmp_path / "full_size.safetensors", "comfyui")
    with pytest.raises(LoraVerifyError, match=r"full_size\.safetensors: mismatched shapes.*6144"):
        verify_lora_file(path, transformer=turbo)


def test_export_and_verify_from_trainer_adapter_folder(tiny_dir, tmp_path):
    """The trainer saves PEFT weights + adapter_config.json (train.lora.save_adapter); export takes that folder."""
    from krea2_train.export.export import export_and_verify

    model = trained_transformer(tiny_dir, r=4, alpha=2)
    expected = TrainedAdapter.from_model(model)
    run = tmp_path / "run" / "adapter"
    try:
        from krea2_train.train.lora import save_adapter

        save_adapter(model, model.peft_config["default"], run)
    except ImportError:  # trainer not built: write the same layout by hand
        run.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in expected.peft_state_dict().items()},
                  str(run / "adapter_model.safetensors"))
        (run / "adapter_config.json").write_text(json.dumps(expected.lora_config_dict()))
    assert max(((read_lora_file(run).adapter.delta(m) - expected.delta(m)).norm()).item()
               for m in expected.modules) < 1e-6

    out = tmp_path / "export"
    result = export_and_verify(run, out, tiny_dir / "transformer_turbo.safetensors", name="demo",
                               metadata={"trigger_words": ["zq"], "steps": 10}, transfer=True,
                               raw_path=tiny_dir / "transformer_raw.safetensors",
                               text_encoder=tiny_dir / "text_encoder", vae=tiny_dir / "vae",
                               transfer_kwargs=dict(prompts=["a red circle"], sigmas=(0.5,), height=32, width=32))
    assert set(result["paths"]) == {"diffusers", "comfyui", "civitai"}
    assert (out / "demo.safetensors").exists() and (out / "demo_diffusers" / "pytorch_lora_weights.safetensors").exists()
    manifest = json.loads((out / "export.json").read_text())
    assert set(manifest["files"]) == {"diffusers", "comfyui", "civitai"} and manifest["modules"] == len(expected.modules)
    verify = json.loads((out / "verify.json").read_text())
    assert all(r["ok"] for r in verify.values())
    # each file is measured valid for every program it is written for (the diffusers file in ComfyUI too)
    for fmt, entry in manifest["files"].items():
        assert entry["valid_for"] == entry["written_for"] == verify[fmt]["valid_for"]
    assert "comfyui" in manifest["files"]["diffusers"]["valid_for"]
    # The transfer report ran first: its strength and a Turbo sample land in the Civitai header.
    strength = json.loads((out / "transfer_report.json").read_text())["suggested_turbo_strength"]
    assert (out / "transfer_grid.png").exists()
    from safetensors import safe_open

    with safe_open(str(out / "demo.safetensors"), "pt") as f:
        header = f.metadata()
    assert float(header["ss_recommended_turbo_strength"]) == strength
    assert header["modelspec.thumbnail"].startswith("data:image/png;base64,")


def _cli(*argv):
    from krea2_train.cli import main

    return main([str(a) for a in argv])


def test_cli_tools(adapter, tiny_dir, tmp_path, capsys):
    state, _ = peer_state(adapter, "musubi")
    src = tmp_path / "musubi.safetensors"
    save_file(state, str(src))
    turbo = tiny_dir / "transformer_turbo.safetensors"

    assert _cli("inspect", src) == 0
    assert "layout: musubi" in capsys.readouterr().out
    assert _cli("convert", src, tmp_path / "d.safetensors", "--format", "diffusers") == 0
    assert read_lora_file(tmp_path / "d.safetensors").layout == "diffusers"
    assert _cli("verify", tmp_path / "d.safetensors", "--turbo", turbo, "--json", tmp_path / "v.json",
                "--against", src) == 0
    assert "result: OK" in capsys.readouterr().out and json.loads((tmp_path / "v.json").read_text())["ok"]
    assert _cli("resize", src, tmp_path / "r.safetensors", "--rank", "2", "--format", "original") == 0
    assert "energy kept" in capsys.readouterr().out
    # verifying the rank-2 file against the rank-4 original fails, with the report and exit code 1
    assert _cli("verify", tmp_path / "r.safetensors", "--turbo", turbo, "--against", src, "--no-diffusers") == 1
    assert "FAILED" in capsys.readouterr().out
    assert _cli("merge", f"{src}:0.5", tmp_path / "d.safetensors", "--out", tmp_path / "m.safetensors") == 0
    merged = read_lora_file(tmp_path / "m.safetensors").adapter
    m = "transformer_blocks.0.attn.to_q"
    assert torch.allclose(merged.delta(m), 1.5 * adapter.delta(m), atol=2e-2 * adapter.delta(m).abs().max())
    assert _cli("extract", tiny_dir / "transformer_raw.safetensors", turbo, "--out", tmp_path / "e.safetensors",
                "--rank", "4") == 0
    assert read_lora_file(tmp_path / "e.safetensors").layout == "comfyui"
    assert _cli("export", src, "--out", tmp_path / "exp", "--formats", "civitai,original", "--name", "x",
                "--trigger", "zq", "--turbo", turbo) == 0
    assert (tmp_path / "exp" / "x.safetensors").exists() and (tmp_path / "exp" / "x_original.safetensors").exists()
    # a bad file: a clear message, exit code 2, no traceback
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    assert _cli("inspect", tmp_path / "junk.safetensors") == 2
    assert "junk.safetensors" in capsys.readouterr().err


def test_transfer_report(adapter, tiny_dir, tmp_path):
    from PIL import Image

    from krea2_train.export.transfer import transfer_report

    path = write_lora_file(adapter, tmp_path / "l.safetensors", "comfyui", dtype="float32")
    report = transfer_report(path, tiny_dir / "transformer_raw.safetensors", tiny_dir / "transformer_turbo.safetensors",
                             tmp_path / "out", text_encoder=tiny_dir / "text_encoder", vae=tiny_dir / "vae",
                             prompts=["a red circle"], sigmas=(0.8, 0.3), height=32, width=32, dtype="float32")
    saved = json.loads((tmp_path / "out" / "transfer_report.json").read_text())
    assert saved["suggested_turbo_strength"] == report["suggested_turbo_strength"]
    assert 0.25 <= saved["suggested_turbo_strength"] <= 3.0 and len(saved["per_sigma"]) == 2
    assert 0 < saved["ratio"] and -1 <= saved["cosine"] <= 1
    # The fit: at the suggested strength Turbo's effect is no further from Raw's than at strength 1.
    for row in saved["per_sigma"]:
        assert row["cosine_at_suggested"] == pytest.approx(row["cosine"], abs=0.05)
    grid = Image.open(tmp_path / "out" / "transfer_grid.png")
    assert grid.size[0] >= 3 * 32


def test_transfer_report_same_model_is_identity(adapter, turbo, tmp_path):
    """Raw == Turbo: the LoRA moves both identically, so ratio 1, cosine 1, suggested strength 1 (no images)."""
    from krea2_train.export.transfer import transfer_report

    path = write_lora_file(adapter, tmp_path / "l.safetensors", "diffusers", dtype="float32")
    report = transfer_report(path, turbo, turbo, tmp_path / "out", prompts=["x", "y"], sigmas=(0.5,), height=32,
                             width=32, device="cpu")
    assert report["ratio"] == pytest.approx(1.0, abs=1e-5) and report["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert report["suggested_turbo_strength"] == pytest.approx(1.0, abs=1e-3)
    assert "grid" not in report and not getattr(turbo, "peft_config", {})


def test_verify_on_bfloat16_turbo(adapter, tiny_dir, tmp_path):
    """The real model is verified in bfloat16: rounding noise must not fail a good file, a wrong scale still fails."""
    from krea2_train.models.loading import load_transformer

    turbo_bf16 = load_transformer(tiny_dir / "transformer_turbo.safetensors", dtype="bfloat16")
    small = adapter.scaled(0.05)  # a LoRA with a small effect, as real ones have
    good = write_lora_file(small, tmp_path / "good.safetensors", "civitai")
    report = verify_lora_file(good, adapter=small, transformer=turbo_bf16, check_diffusers=False)
    assert report.ok and report.output_noise_floor > 0
    lost = TrainedAdapter(small.down, small.up, {m: float(small.rank(m)) for m in small.modules}, False)
    bad = write_lora_file(lost, tmp_path / "lost_alpha.safetensors", "civitai")
    with pytest.raises(LoraVerifyError, match="lost or doubled"):
        verify_lora_file(bad, adapter=small, transformer=turbo_bf16, check_diffusers=False)


def test_lowrank_error_matches_dense():
    from krea2_train.export.verify import lowrank_rel_error

    g = torch.Generator().manual_seed(0)
    a1, b1, a2, b2 = (torch.randn(s, generator=g) for s in [(4, 50), (30, 4), (3, 50), (30, 3)])
    dense = ((0.7 * b1 @ a1 - 1.3 * b2 @ a2).norm() / (1.3 * b2 @ a2).norm()).item()
    assert lowrank_rel_error(a1, b1, 0.7, a2, b2, 1.3) == pytest.approx(dense, rel=1e-6)
    assert lowrank_rel_error(a2, b2, 1.3, a2, b2, 1.3) < 1e-7
