"""Edit LoRAs after training: `verify` and the transfer report run with references in context (the reference forward
of models/reference.py, the run's train.reference_method), so what is checked is what the user runs; text-to-image
verification and transfer are unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_export_helpers import trained_adapter

from krea2_train.export.verify import LoraVerifyError, probe_inputs, velocity, verify_lora_file
from krea2_train.lora.formats import TrainedAdapter
from krea2_train.lora.writers import write_lora_file


@pytest.fixture(scope="module")
def adapter(tiny_dir):
    return trained_adapter(tiny_dir, r=4, alpha=4)


@pytest.fixture(scope="module")
def turbo(tiny_dir):
    from krea2_train.models.loading import load_transformer

    return load_transformer(tiny_dir / "transformer_turbo.safetensors", dtype="float32")


def _refs(seed=5, h=8, w=6):
    return [torch.randn(1, 16, h, w, generator=torch.Generator().manual_seed(seed))]


def _direct(transformer, inputs):
    """The probe's velocity through models/reference.reference_forward itself (not predict_velocity)."""
    from krea2_train.models.reference import reference_forward
    from krea2_train.schedule import position_ids

    packed, sigma, embeds, (rows, cols), refs, method = inputs
    with torch.no_grad():
        return reference_forward(transformer, packed, embeds, sigma, position_ids(embeds.shape[1], rows, cols),
                                 refs, method)


@pytest.mark.parametrize("method", ["index", "index_timestep_zero"])
def test_verify_probe_runs_the_reference_forward(turbo, method):
    refs = _refs()
    inputs = probe_inputs(turbo, 0, references=refs, reference_method=method)
    assert inputs[0].shape[1] == 4 * 3 and inputs[3] == (4, 3)  # the target has the reference's size
    v = velocity(turbo, inputs)
    torch.testing.assert_close(v, _direct(turbo, inputs))
    plain = velocity(turbo, inputs[:4])  # the same target without the reference in context
    assert (v - plain).abs().max() > 1e-4
    other = "index" if method != "index" else "index_timestep_zero"
    assert (v - velocity(turbo, inputs[:5] + (other,))).abs().max() > 1e-5  # the method is what runs
    t2i = probe_inputs(turbo, 0)
    assert len(t2i) == 4 and t2i[3] == (4, 4)  # without references: the text-to-image probe


def test_verify_with_references(adapter, turbo, tmp_path, monkeypatch):
    """A right file verifies with the references in context (every output check through the reference forward);
    a doubled scale still fails; a text-to-image report has no `references` key."""
    import krea2_train.models.reference as reference

    calls = []
    real = reference.reference_forward
    monkeypatch.setattr(reference, "reference_forward", lambda *a, **k: calls.append(a[6]) or real(*a, **k))
    path = write_lora_file(adapter, tmp_path / "l.safetensors", "diffusers", dtype="float32")
    report = verify_lora_file(path, adapter=adapter, transformer=turbo, references=_refs(),
                              reference_method="index_timestep_zero", reference_source="pair p0.png")
    assert report.ok, report.summary()
    assert report.output_change > 1e-3 and report.diffusers.startswith("loaded")
    assert len(calls) >= 4 and set(calls) == {"index_timestep_zero"}  # base, hooks, our loader, diffusers
    assert "pair p0.png" in report.references and "index_timestep_zero" in report.summary()
    assert report.to_dict()["references"] == report.references
    calls.clear()
    t2i = verify_lora_file(path, adapter=adapter, transformer=turbo)
    assert not calls and "references" not in t2i.to_dict() and "probe with references" not in t2i.summary()
    doubled = TrainedAdapter(adapter.down, adapter.up, {m: 2 * a for m, a in adapter.alpha.items()}, False)
    bad = write_lora_file(doubled, tmp_path / "bad.safetensors", "comfyui", dtype="float32")
    with pytest.raises(LoraVerifyError, match="scale"):
        verify_lora_file(bad, adapter=adapter, transformer=turbo, references=_refs())


def test_transfer_deltas_with_references_match_the_reference_forward(adapter, turbo, tmp_path):
    """Random embeddings (no text encoder): the report's Turbo delta norms equal ones computed independently with
    reference_forward, PEFT's LoRA on and off; and they differ from the text-to-image report's."""
    from krea2_train.export.transfer import _noisy_inputs, transfer_report
    from krea2_train.inference import apply_lora
    from krea2_train.models.reference import reference_forward
    from krea2_train.schedule import position_ids

    path = write_lora_file(adapter, tmp_path / "l.safetensors", "diffusers", dtype="float32")
    refs = _refs(h=4, w=4)
    sigmas = (0.8, 0.4)
    kw = dict(prompts=["x", "y"], sigmas=sigmas, height=32, width=32, device="cpu", seed=3)
    report = transfer_report(path, turbo, turbo, tmp_path / "ref", references=refs, reference_method="index",
                             reference_source="test", **kw)
    plain = transfer_report(path, turbo, turbo, tmp_path / "t2i", **kw)
    assert report["references"] == {"count": 1, "method": "index", "source": "test", "latent_sizes": [[4, 4]]}
    assert "references" not in plain
    cfg = turbo.config
    embeds = torch.randn(2, 8, cfg.num_text_layers, cfg.text_hidden_dim, generator=torch.Generator().manual_seed(4))
    x0 = torch.randn(2, 4, cfg.in_channels, generator=torch.Generator().manual_seed(3))
    pos = position_ids(8, 2, 2)
    with torch.no_grad():
        base = [reference_forward(turbo, x, embeds, s, pos, refs, "index") for x, s in _noisy_inputs(x0, sigmas, 5)]
        name = apply_lora(turbo, str(path), strength=1.0, adapter_name="independent")
        try:
            lora = [reference_forward(turbo, x, embeds, s, pos, refs, "index") for x, s in _noisy_inputs(x0, sigmas, 5)]
        finally:
            turbo.delete_adapters([name])
    for row, b, v in zip(report["per_sigma"], base, lora):
        assert row["turbo_delta_norm"] == pytest.approx(float((v - b).norm()), rel=1e-5)
    assert all(abs(a["turbo_delta_norm"] - b["turbo_delta_norm"]) > 1e-6 * b["turbo_delta_norm"]
               for a, b in zip(report["per_sigma"], plain["per_sigma"]))
    assert report["ratio"] == pytest.approx(1.0, abs=1e-5)  # Raw == Turbo here
    with pytest.raises(ValueError, match="reference latents"):
        transfer_report(path, turbo, turbo, tmp_path / "bad", references=[torch.zeros(3, 16, 4, 4)], **kw)


def _edit_cfg(tiny_dir, tmp_path, *extra):
    from test_reference_train import _cfg

    return _cfg(tiny_dir, tmp_path, "export.formats=[comfyui]", "export.verify=true", "export.transfer_report=true",
                "export.strength_sweep=[1.0]", "preview.resolution=64", "preview.raw_steps=2", "preview.turbo_steps=2",
                "preview.every_steps=0", *extra)


def test_edit_run_verifies_and_transfers_with_references(tiny_dir, tmp_path, one_torch_thread, capsys):
    """The whole job on an edit run: verify.json says the probe had a held-out pair's references and the trained
    method; the transfer report measured with preview.references, its grid starts with the reference and embeds
    the edit graph."""
    from PIL import Image

    from krea2_train import pipeline

    ref = sorted(Path(__file__).resolve().parents[1].glob("datasets/demo/*.png"))[0]
    cfg = _edit_cfg(tiny_dir, tmp_path, "preview.prompts=[make it red]", f"preview.references=[{ref}]",
                    "data.validation_images=1", "train.reference_method=index_timestep_zero")
    assert pipeline.run_all(cfg) == 0
    out = cfg.run_dir / "export"
    verify = json.loads((out / "verify.json").read_text())
    assert verify["comfyui"]["ok"]
    assert "held-out pair" in verify["comfyui"]["references"]
    assert "index_timestep_zero" in verify["comfyui"]["references"]
    transfer = json.loads((out / "transfer_report.json").read_text())
    assert transfer["references"]["source"] == "preview.references at 64 px"
    assert transfer["references"]["method"] == "index_timestep_zero" and transfer["prompts"] == ["make it red"]
    # the style distance is kept, labelled, and not read as a style result (it cannot judge an edit)
    assert "style" not in transfer and "not_a_style_result" in transfer["edit_style_distance"]
    assert "matched_strength" in transfer["edit_style_distance"]
    assert "style check does not apply to an edit LoRA" in transfer["reading"]
    assert "scripts/measure_edit.py" in transfer["reading"] and "matches Raw" not in transfer["reading"]
    assert transfer["lora"] == cfg.run_name  # what the user calls it, not "adapter"
    grid = Image.open(out / "transfer_grid.png")
    assert grid.width >= 5 * 64  # Reference, Turbo, Turbo + LoRA 1, suggested, Raw + LoRA
    api = json.loads(grid.text["prompt"])
    assert {n["inputs"].get("image") for n in api.values() if n["class_type"] == "LoadImage"} == {ref.name}
    methods = [n["inputs"] for n in api.values() if n["class_type"] == "FluxKontextMultiReferenceLatentMethod"]
    assert methods and methods[0].get("reference_latents_method") == "index_timestep_zero"

    # reports of an edit run measured without references (as before) do not count as up to date, nor a transfer
    # report whose style distance reads as a style result (as before)
    manifest = pipeline.cache(cfg, pipeline.check_data(cfg))
    assert pipeline.export_valid(cfg, manifest)
    for name in ("verify.json", "transfer_report.json"):
        saved = (out / name).read_text()
        data = json.loads(saved)
        for r in (data.values() if name == "verify.json" else [data]):
            r.pop("references")
        (out / name).write_text(json.dumps(data))
        assert not pipeline.export_valid(cfg, manifest)
        (out / name).write_text(saved)
    saved = (out / "transfer_report.json").read_text()
    (out / "transfer_report.json").write_text(json.dumps(transfer | {"style": transfer["edit_style_distance"]}))
    assert not pipeline.export_valid(cfg, manifest)
    (out / "transfer_report.json").write_text(saved)
    assert pipeline.export_valid(cfg, manifest)

    # `krea2-train verify RUN` / `transfer RUN`: the run's references and method, from its cache
    from krea2_train.cli import main

    assert main(["verify", str(cfg.run_dir), "--turbo", str(cfg.model.turbo), "--json",
                 str(tmp_path / "v.json")]) == 0
    cli = json.loads((tmp_path / "v.json").read_text())
    assert cli["ok"] and cli["references"] == verify["comfyui"]["references"]
    assert main(["transfer", str(cfg.run_dir), "--out", str(tmp_path / "tr"), "--dtype", "float32"]) == 0
    again = json.loads((tmp_path / "tr" / "transfer_report.json").read_text())
    assert again["references"] == transfer["references"]
    capsys.readouterr()
    assert main(["transfer", str(cfg.run_dir), "--out", str(tmp_path / "tr2"), "--prompt", "x"]) == 2
    assert "drop --prompt" in capsys.readouterr().err


def test_transfer_without_preview_prompts_uses_the_pairs(tiny_dir, tmp_path, one_torch_thread):
    """No preview.prompts: the held-out pairs first, then training pairs, in one bucket, with their captions and
    cached reference latents; verify takes the first held-out pair."""
    from PIL import Image

    from krea2_train import pipeline
    from krea2_train.data.loader import read_batch

    cfg = _edit_cfg(tiny_dir, tmp_path, "data.validation_images=1")
    data = Path(cfg.data.datasets[0].path)
    for n, op in enumerate((Image.FLIP_LEFT_RIGHT, Image.ROTATE_180, Image.FLIP_TOP_BOTTOM)):  # square pairs
        for sub in (data, data / "reference"):
            Image.open(sub / "poster_00.png").transpose(op).save(sub / f"square_{n}.png")
        (data / f"square_{n}.txt").write_text(f"square {n}")
    manifest = pipeline.cache(cfg, pipeline.check_data(cfg))
    pairs = pipeline.edit_pairs(cfg, manifest)
    items = {i["name"]: i for i in manifest.items}
    chosen = [items[n] for n in pairs["names"]]
    assert chosen[0]["split"] == "validation" and all(i["split"] == "train" for i in chosen[1:])
    assert len({json.dumps(i["latents"]["128"]["bucket"]) for i in chosen}) == 1
    expected = read_batch(manifest, 128, [(i, False, False) for i in chosen])["references"]
    torch.testing.assert_close(pairs["references"][0], expected[0])
    assert pairs["captions"] == [i["caption"] for i in chosen] and (pairs["width"], pairs["height"]) == (128, 128)
    assert len(chosen) == 3  # one bucket: the held-out pair and training pairs
    kw = pipeline.transfer_references(cfg, manifest)
    assert kw["prompts"] == pairs["captions"] and "1 held out" in kw["reference_source"]
    # the report on those pairs: reference column decoded from the cached latents, placeholder names in the graph
    from PIL import Image as PILImage

    from krea2_train.export.transfer import transfer_report

    lora = write_lora_file(trained_adapter(tiny_dir, r=4, alpha=4), tmp_path / "l.safetensors", "comfyui",
                           dtype="float32")
    report = transfer_report(lora, tiny_dir / "transformer_raw.safetensors", tiny_dir / "transformer_turbo.safetensors",
                             tmp_path / "tr", text_encoder=tiny_dir / "text_encoder", vae=tiny_dir / "vae",
                             sigmas=(0.5,), dtype="float32", device="cpu", sweep=[1.0], **kw)
    assert report["prompts"] == pairs["captions"] and report["references"]["latent_sizes"] == [[16, 16]]
    grid = PILImage.open(tmp_path / "tr" / "transfer_grid.png")
    assert grid.width >= 5 * 128 and grid.height >= 3 * 128
    v = pipeline.verify_references(cfg, manifest)
    assert v["references"][0].shape[0] == 1 and v["reference_method"] == cfg.train.reference_method
    torch.testing.assert_close(v["references"][0], expected[0][:1])
    # the style check's reference: the targets only (StyleReference.from_datasets also reads reference/)
    import numpy as np

    from krea2_train.evaluate.style import StyleReference

    style = pipeline._transfer_kwargs(cfg, manifest)["style_reference"]
    targets = [Image.open(i["name"]).convert("RGB") for i in sorted(manifest.items, key=lambda i: i["name"])]
    assert style.count == len(manifest.items) == len(targets)
    np.testing.assert_allclose(style.mean, StyleReference.from_images(targets).mean, rtol=1e-6)
    assert StyleReference.from_datasets(cfg.data.datasets).count > style.count
    cfg.data.reference = False
    assert pipeline.verify_references(cfg, manifest) is None
