"""DoRA and LoKr exports: PEFT's weights as the reference, ComfyUI's rules (lora/consumers.comfyui_patch and, when
its source is at hand, ComfyUI's own weight_adapter code) applying the files, export + verify end to end, refusals."""

from __future__ import annotations

import json

import _comfy_source
import pytest
import torch
from test_export_helpers import TARGETS, comfyui_diffusers_names, comfyui_key_map

from krea2_train.errors import UserError
from krea2_train.export.lycoris import export_lycoris, lycoris_state, turbo_weights, verify_lycoris_file
from krea2_train.lora import lycoris
from krea2_train.lora.consumers import comfyui_patch
from krea2_train.lora.formats import LoraFormatError, read_lora_file

KINDS = ["dora", "lokr", "lokr_both"]  # lokr_both: decompose_both, so w1 is lokr_w1_a @ lokr_w1_b too


def _peft_config(kind):
    from peft import LoKrConfig, LoraConfig

    if kind == "dora":
        return LoraConfig(r=4, lora_alpha=6, use_dora=True, use_rslora=True, target_modules=TARGETS,
                          rank_pattern={"ff.up": 2}, alpha_pattern={"to_k": 3})
    if kind == "lokr":
        return LoKrConfig(r=4, alpha=6, target_modules=TARGETS, alpha_pattern={"to_k": 3})
    return LoKrConfig(r=2, alpha=5, decompose_both=True, target_modules=TARGETS)


def trained_model(tiny_dir, kind, seed=0, variant="raw"):
    """The tiny transformer with a DoRA/LoKr whose weights are random (as after training)."""
    from krea2_train.models.loading import load_transformer

    model = load_transformer(tiny_dir / f"transformer_{variant}.safetensors", dtype="float32")
    model.add_adapter(_peft_config(kind))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif "lora_" in name or "lokr_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


@pytest.fixture(scope="module")
def turbo(tiny_dir):
    from krea2_train.models.loading import load_transformer

    return load_transformer(tiny_dir / "transformer_turbo.safetensors", dtype="float32")


@pytest.fixture(scope="module", params=KINDS)
def trained(request, tiny_dir):
    model = trained_model(tiny_dir, request.param)
    return request.param, model, lycoris.from_model(model)


def peft_weights(model) -> dict:
    """{module: the weight PEFT's forward applies} (W' = layer(I) - layer(0), transposed), float64."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = {}
    with torch.no_grad():
        for name, layer in model.named_modules():
            if isinstance(layer, BaseTunerLayer) and name in dict(model.named_modules()):
                n_in = layer.get_base_layer().in_features
                eye = torch.eye(n_in, dtype=torch.float32)
                out[name] = (layer(eye) - layer(torch.zeros(1, n_in))).T.double()
    return out


def on_turbo(adapter, turbo):
    """PEFT's weights with the trained adapter on Turbo (what `train on Raw, deploy on Turbo` applies)."""
    from peft import PeftConfig, set_peft_model_state_dict

    turbo.add_adapter(PeftConfig.from_peft_type(**adapter.config), adapter_name="t")
    try:
        set_peft_model_state_dict(turbo, adapter.peft_state_dict(), adapter_name="t")
        turbo.set_adapter("t")
        return {m: w for m, w in peft_weights(turbo).items() if m in adapter.modules}
    finally:
        turbo.delete_adapters(["t"])


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_reference_math_is_peft(trained):
    """lycoris.merged (our statement of PEFT's DoRA/LoKr) equals PEFT's own forward on every adapted Linear."""
    kind, model, adapter = trained
    assert adapter.kind == ("dora" if kind == "dora" else "lokr")
    got = peft_weights(model)
    assert sorted(got) == sorted(adapter.modules) and len(got) > 20
    base = turbo_weights(model, adapter.modules)
    errs = [_rel(adapter.merged(m, base[m]) - base[m], got[m] - base[m].double()) for m in adapter.modules]
    assert max(errs) < 1e-5
    if kind == "lokr":  # both layouts occur: full w2 (text fusion) and lokr_w2_a/b (blocks)
        parts = {p for f in adapter.factors.values() for p in f}
        assert {"w1", "w2", "w2_a", "w2_b"} <= parts
    if kind == "lokr_both":
        assert {"w1_a", "w1_b"} <= {p for f in adapter.factors.values() for p in f}


@pytest.mark.parametrize("fmt", ["comfyui", "musubi", "diffusers"])
def test_comfyui_rules_apply_peft_weights_on_turbo(trained, turbo, fmt):
    """A file written for ComfyUI, applied by ComfyUI's rules to Turbo, gives PEFT's weights on Turbo at strength 1,
    and ComfyUI's strength semantics at 0.5: W + s (W_1 - W) (DoRA), W + s delta (LoKr)."""
    kind, _, adapter = trained
    if fmt == "diffusers" and kind != "dora":
        pytest.skip("LoKr has no diffusers layout")
    base = turbo_weights(turbo, adapter.modules)
    state, _ = lycoris_state(adapter, fmt, dtype=None, base_weights=base)
    if fmt == "diffusers":  # ComfyUI skips the PEFT magnitudes (diffusers' part); dora_scale is its part
        state = {k: v for k, v in state.items() if not k.endswith(".lora_magnitude_vector")}
    if kind != "dora":
        full = [m for m, f in adapter.factors.items() if "w2" in f]
        assert all(f"diffusion_model.{lycoris_key(m)}.alpha" not in state for m in full if fmt == "comfyui")
    want = on_turbo(adapter, turbo)
    patch = comfyui_patch(state, base)
    assert not patch.unloaded and sorted(patch.weights) == sorted(adapter.modules)
    assert set(patch.kinds.values()) == {"dora" if kind == "dora" else "lokr"}
    err = max(_rel(patch.weights[m] - base[m], want[m] - base[m].double()) for m in adapter.modules)
    assert err < 1e-5, err
    # the strength semantics in float64 (in float32, W + s dW cancels to ~1e-5 of a small dW)
    full = comfyui_patch(state, base, dtype=torch.float64)
    half = comfyui_patch(state, base, strength=0.5, dtype=torch.float64)
    for m in adapter.modules:
        w = base[m].double()
        expected = w + 0.5 * (full.weights[m] - w)
        assert _rel(half.weights[m] - w, expected - w) < 1e-5
        if kind != "dora":
            assert _rel(half.weights[m] - w, 0.5 * adapter.delta(m).reshape(w.shape)) < 1e-5


def lycoris_key(m):
    from krea2_train.models.keys import diffusers_to_original_module

    return diffusers_to_original_module(m)


def test_dora_file_is_exact_only_on_its_base(tiny_dir, turbo):
    """ComfyUI normalises DoRA by the base weight's norm: the Turbo-computed file is exact on Turbo, not on Raw."""
    from krea2_train.models.loading import load_transformer

    model = trained_model(tiny_dir, "dora")
    adapter = lycoris.from_model(model)
    state, _ = lycoris_state(adapter, "comfyui", dtype=None, base_weights=turbo_weights(turbo, adapter.modules))
    raw = turbo_weights(load_transformer(tiny_dir / "transformer_raw.safetensors", dtype="float32"), adapter.modules)
    patch = comfyui_patch(state, raw)
    want = peft_weights(model)  # PEFT on Raw
    err = max(_rel(patch.weights[m] - raw[m], want[m] - raw[m].double()) for m in adapter.modules)
    assert err > 1e-4  # measurably not exact on another base: why export.json notes the base


def test_comfyui_own_code_agrees(trained, turbo, tiny_dir):
    """ComfyUI's own load_lora + calculate_weight (from its source) patch exactly what our re-statement does."""
    comfy = _comfy_source.load()
    if comfy is None:
        pytest.skip(f"ComfyUI source not at {_comfy_source.COMFYUI_GIT} (set KREA2_COMFYUI_GIT)")
    kind, _, adapter = trained
    base = turbo_weights(turbo, adapter.modules)
    names = comfyui_diffusers_names(len(turbo.transformer_blocks))
    key_map = comfyui_key_map(tiny_dir / "transformer_turbo.safetensors")
    weights = {names[m]: base[m] for m in adapter.modules}
    for fmt in ("comfyui", "musubi") + (("diffusers",) if kind == "dora" else ()):
        state, _ = lycoris_state(adapter, fmt, dtype="bfloat16", base_weights=base)
        ours = comfyui_patch(state, base)
        for s in (1.0, 0.6):
            theirs, not_loaded, errors = _comfy_source.patch(comfy, state, key_map, weights, strength=s)
            # the diffusers DoRA file's PEFT magnitudes are logged, not loaded (ComfyUI applies its dora_scale)
            assert all(k.endswith(".lora_magnitude_vector") for k in not_loaded) and not errors
            assert len(not_loaded) == (len(adapter.modules) if fmt == "diffusers" else 0)
            assert sorted(theirs) == sorted(weights)
            mine = ours if s == 1.0 else comfyui_patch(state, base, strength=s)
            err = max(_rel(theirs[names[m]] - base[m], mine.weights[m] - base[m]) for m in adapter.modules)
            assert err < 1e-5, (fmt, s, err)


@pytest.mark.parametrize("kind", ["dora", "lokr"])
def test_trained_run_exports_and_verifies(tiny_dir, tmp_path, kind):
    """The trainer's RUN/adapter (PEFT DoRA/LoKr) -> export_and_verify on Turbo -> every file valid for ComfyUI,
    export.json says it is not for diffusers (measured: diffusers refuses it) nor krea2-train's plain-LoRA tools."""
    import stat

    from krea2_train.export.export import export_and_verify
    from krea2_train.train.lora import save_adapter

    model = trained_model(tiny_dir, kind)
    run = tmp_path / "run" / "adapter"
    save_adapter(model, model.peft_config["default"], run)
    out = tmp_path / "export"
    turbo_path = tiny_dir / "transformer_turbo.safetensors"
    formats = ["comfyui", "civitai", "musubi"] + (["diffusers"] if kind == "dora" else [])
    result = export_and_verify(run, out, turbo_path, formats=formats, name="demo",
                               metadata={"trigger_words": ["zq"], "steps": 10})
    manifest = json.loads((out / "export.json").read_text())
    verify = json.loads((out / "verify.json").read_text())
    assert manifest["adapter"] == kind and set(manifest["files"]) == set(formats)
    for fmt, entry in manifest["files"].items():
        want = ["diffusers", "comfyui"] if fmt == "diffusers" else ["comfyui"]
        assert sorted(entry["valid_for"]) == sorted(entry["written_for"]) == sorted(want) == sorted(
            verify[fmt]["valid_for"])
        if fmt == "diffusers":  # PEFT's DoRA keys diffusers loads (with DoRA on), plus dora_scale for ComfyUI
            assert verify[fmt]["diffusers"].startswith("loaded with DoRA")
            assert verify[fmt]["diffusers_output_error"] < 2e-2  # bf16 factors
        else:
            assert entry["not_valid_for"]["diffusers"].startswith("not read: diffusers")
        assert "krea2-train" in entry["not_valid_for"]
        assert verify[fmt]["ok"] and verify[fmt]["max_delta_error"] < 2e-2 and verify[fmt]["output_error"] < 0.1
        assert stat.S_IMODE((out / entry["path"]).stat().st_mode) == 0o644
    print(kind, {f: (r.max_delta_error, r.output_error) for f, r in result["reports"].items()})
    assert (out / "demo_workflow.json").exists()
    from safetensors import safe_open

    with safe_open(str(out / "demo.safetensors"), "pt") as f:
        header = f.metadata()
    assert header["ss_network_module"] == "lycoris.kohya" and header["krea2_train.adapter"] == kind
    assert header["sshs_model_hash"]


def test_verify_catches_a_wrong_file(tiny_dir, turbo, tmp_path):
    from safetensors.torch import save_file

    for kind in ("dora", "lokr"):
        adapter = lycoris.from_model(trained_model(tiny_dir, kind))
        base = turbo_weights(turbo, adapter.modules)
        state, header = lycoris_state(adapter, "comfyui", dtype=None, base_weights=base)
        key = next(k for k in state if k.endswith(".lora_up.weight") or k.endswith(".lokr_w1"))
        state[key] = state[key] * 2
        path = tmp_path / f"{kind}.safetensors"
        save_file(state, str(path), metadata=header)
        report = verify_lycoris_file(path, adapter, turbo)
        assert not report.ok and report.consumers["comfyui"].startswith("WRONG")


def test_refusals(tiny_dir, tmp_path, turbo, capsys):
    """Formats that cannot carry DoRA/LoKr, a DoRA without Turbo, and the plain-LoRA tools name the file and kind."""
    from krea2_train.cli import main

    dora = lycoris.from_model(trained_model(tiny_dir, "dora"))
    lokr = lycoris.from_model(trained_model(tiny_dir, "lokr"))
    for adapter, fmts in ((dora, ("original",)), (lokr, ("diffusers", "original"))):
        for fmt in fmts:
            with pytest.raises(LoraFormatError, match=f"{adapter.kind.upper()} adapter and cannot be exported as {fmt}"):
                export_lycoris(adapter, tmp_path / "x", [fmt], base_weights=turbo_weights(turbo, adapter.modules))
    with pytest.raises(UserError, match="--turbo"):
        export_lycoris(dora, tmp_path / "x", ["comfyui"])
    paths = export_lycoris(lokr, tmp_path / "lokr", ["comfyui"])  # LoKr needs no base weights
    path = paths["comfyui"]
    with pytest.raises(LoraFormatError, match=rf"{path.name} is a LoKr \(LyCORIS\) file.*ComfyUI applies it"):
        read_lora_file(path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "comfyui lokr" in out and f"yes: {len(lokr.modules)} modules as lokr" in out
    assert "loads in diffusers: no" in out
    for argv in (["convert", path, tmp_path / "o.safetensors", "--format", "diffusers"],
                 ["resize", path, tmp_path / "r.safetensors", "--rank", "2"],
                 ["merge", path, path, "--out", tmp_path / "m.safetensors"]):
        rc = main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert rc != 0 and path.name in err and "LoKr" in err, (argv, err)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dora", "lokr"])
def test_training_run_exports_and_verifies(tiny_dir, tmp_path, capsys, kind):
    """`krea2-train CONFIG` with lora.type dora/lokr: trains, exports the ComfyUI layouts, verifies them on Turbo;
    a second run skips everything (the export is recognised as fresh)."""
    from test_train_pipeline import write_config

    from krea2_train.cli import main

    cfg = write_config(tiny_dir, tmp_path, steps=2)
    formats = "[comfyui, civitai, diffusers]" if kind == "dora" else "[comfyui, civitai]"
    args = [str(cfg), f"lora.type={kind}", f"export.formats={formats}", "export.transfer_report=false"]
    assert main(args) == 0
    out = capsys.readouterr().out
    export = tmp_path / "runs" / "pipe" / "export"
    verify = json.loads((export / "verify.json").read_text())
    assert all(r["ok"] and "comfyui" in r["valid_for"] for r in verify.values())
    manifest = json.loads((export / "export.json").read_text())
    assert manifest["adapter"] == kind and all(sorted(f["valid_for"]) == sorted(f["written_for"])
                                               for f in manifest["files"].values())
    if kind == "dora":
        assert sorted(verify["diffusers"]["valid_for"]) == ["comfyui", "diffusers"]
    assert "verify: every exported file loads on Turbo" in out
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "already finished 2 steps, skipped" in out and "is up to date, skipped" in out


def test_config_accepts_comfyui_formats_for_dora_and_lokr():
    from krea2_train.config import ConfigError, load_config

    paths = ["model.transformer=/m/raw.safetensors", "model.text_encoder=/m/te", "model.vae=/m/vae"]
    with pytest.raises(ConfigError, match=r"`export.formats` has \['diffusers'\].*\['comfyui', 'civitai', 'musubi'\]"):
        load_config(None, paths + ["lora.type=lokr", "export.formats=[diffusers, comfyui]"], warn_paths=False)
    with pytest.raises(ConfigError, match=r"`export.formats` has \['original'\].*'musubi', 'diffusers'\]"):
        load_config(None, paths + ["lora.type=dora", "export.formats=[original, comfyui]"], warn_paths=False)
    cfg = load_config(None, paths + ["lora.type=lokr", "export.formats=[comfyui, civitai, musubi]"], warn_paths=False)
    assert cfg.lora.type == "lokr"
    with pytest.raises(ConfigError, match="`export.verify`.*Turbo"):
        load_config(None, paths + ["lora.type=dora", "export.formats=[comfyui]"], warn_paths=False)
    cfg = load_config(None, paths + ["lora.type=dora", "export.formats=[comfyui]", "model.turbo=/m/t.safetensors"],
                      warn_paths=False)
    assert cfg.lora.type == "dora"
