"""A Turbo LoRA in ComfyUI's full LoRA format: lora_down/lora_up (+ .alpha) and full-weight deltas `.diff` (weight +=
strength * diff) / `.diff_b` (bias += strength * diff_b), read by lora.turbo.read_turbo_lora and applied by
inference.stacked_lora exactly as ComfyUI's own load_lora + calculate_weight patch the weights (tests/_comfy_source.py
runs them from ComfyUI's source), on the tiny model."""

from __future__ import annotations

import re
from types import SimpleNamespace

import _comfy_source
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_krea2_transformer_checkpoint_to_diffusers as to_diffusers
from safetensors.torch import load_file, save_file
from test_export_helpers import comfyui_key_map, trained_transformer

from krea2_train.errors import UserError
from krea2_train.inference import SampleSettings, predict_velocity, sample_latents, stacked_lora
from krea2_train.lora.formats import TrainedAdapter
from krea2_train.lora.tools import extract_lora
from krea2_train.lora.turbo import TurboSourceError, read_turbo_lora, transformer_file_kind
from krea2_train.lora.writers import lora_state_for_format
from krea2_train.models.keys import diffusers_to_original_module
from krea2_train.models.loading import load_transformer
from krea2_train.train import preview


def _linear(key: str) -> bool:
    return key.endswith(".weight") and not key.endswith(("norm.scale",))


def delta_key(key: str) -> str:
    """ComfyUI's name for a full delta of checkpoint tensor `key` (its extractor's `.diff` / `.diff_b`; for the
    parameters not called weight/bias, the key map's own name + `.diff`)."""
    if key.endswith(".weight"):
        return f"diffusion_model.{key[:-len('.weight')]}.diff"
    if key.endswith(".bias"):
        return f"diffusion_model.{key[:-len('.bias')]}.diff_b"
    return f"diffusion_model.{key}.diff"


@pytest.fixture(scope="module")
def files(tiny_dir, tmp_path_factory):
    """(mixed: LoRA factors for the Linear weights but the projector + .diff/.diff_b for everything else, fp16 as
    ComfyUI's extractor saves them; full: every tensor as an exact float32 delta)."""
    raw_path, turbo_path = tiny_dir / "transformer_raw.safetensors", tiny_dir / "transformer_turbo.safetensors"
    raw, turbo = load_file(raw_path), load_file(turbo_path)
    adapter, _ = extract_lora(raw_path, turbo_path, rank=8)
    keep = [m for m in adapter.modules if m != "text_fusion.projector"]
    adapter = TrainedAdapter({m: adapter.down[m] for m in keep}, {m: adapter.up[m] for m in keep},
                             {m: adapter.alpha[m] for m in keep})
    state, _ = lora_state_for_format(adapter, "comfyui")
    lora_weights = {f"{diffusers_to_original_module(m)}.weight" for m in keep}
    deltas = {delta_key(k): (turbo[k].float() - raw[k].float()) for k in raw if k not in lora_weights}
    assert any(k.endswith(".diff_b") for k in deltas) and any(k.endswith(".scale.diff") for k in deltas)
    assert any(k.endswith("mod.lin.diff") for k in deltas) and "diffusion_model.txtfusion.projector.diff" in deltas
    root = tmp_path_factory.mktemp("turbo_diff")
    mixed = root / "krea2_turbo_lora_rank_8_bf16.safetensors"
    save_file({**{k: v.contiguous().to(torch.bfloat16) for k, v in state.items()},
               **{k: v.half() for k, v in deltas.items()}}, mixed)
    full = root / "full_diff.safetensors"
    save_file({delta_key(k): (turbo[k].float() - raw[k].float()).contiguous() for k in raw}, full)
    return SimpleNamespace(mixed=mixed, full=full, raw=raw_path, turbo=turbo_path)


def effective_state(model) -> dict:
    """{diffusers parameter name: the weight the model computes with}: PEFT LoRA deltas of every active adapter
    added to their base layer's weight."""
    from peft.tuners.lora import LoraLayer

    out = {}
    torch.set_grad_enabled(False)
    for name, module in model.named_modules():
        for leaf, p in module.named_parameters(recurse=False):
            if ".lora_" in f"{name}.{leaf}" or "lora_" in name.rsplit(".", 1)[-1]:
                continue
            out[f"{name}.{leaf}".replace(".base_layer", "")] = p.detach().float().clone()
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for a in module.active_adapters:
                if a in module.lora_A:
                    out[f"{name}.weight"] = out[f"{name}.weight"] + module.get_delta_weight(a).float()
    torch.set_grad_enabled(True)
    return out


def assert_unchanged(model, before: dict) -> None:
    """Every tensor as before, no other LoRA left (PEFT leaves its emptied wrapper: `x.base_layer.weight` is
    `x.weight`)."""
    after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items()}
    before = {k.replace(".base_layer", ""): v for k, v in before.items()}
    assert sorted(after) == sorted(before)
    assert all(torch.equal(before[k], v) for k, v in after.items())


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_patch_equals_comfyui_own_code(files, strength):
    """ComfyUI's load_lora + calculate_weight (its source) on every tensor of the file vs our stacked_lora: the same
    weights, LoRA modules and deltas alike, at strength 1 and 0.6; the model is back bit for bit after."""
    comfy = _comfy_source.load()
    if comfy is None:
        pytest.skip(f"ComfyUI source not at {_comfy_source.COMFYUI_GIT} (set KREA2_COMFYUI_GIT)")
    lora = load_file(files.mixed)
    raw = load_file(files.raw)
    weights = {f"diffusion_model.{k}": v for k, v in raw.items()}
    theirs, not_loaded, errors = _comfy_source.patch(comfy, lora, comfyui_key_map(files.raw), weights, strength)
    assert not not_loaded and not errors
    assert len(theirs) == len(raw)  # every tensor patched: LoRA factors or a delta
    want = to_diffusers({k: theirs[f"diffusion_model.{k}"] for k in raw})

    model = load_transformer(files.raw, dtype="float32")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    turbo = read_turbo_lora(files.mixed)
    assert turbo.adapter is not None and len(turbo.diffs) == len(raw) - len(turbo.adapter.modules)
    with stacked_lora(model, turbo, strength, "turbo_lora"):
        ours = effective_state(model)
    assert sorted(ours) == sorted(want)
    base = to_diffusers({k: v.float() for k, v in raw.items()})
    worst = max(float((ours[k] - want[k]).abs().max() / (want[k] - base[k]).abs().max().clamp(min=1e-12))
                for k in want)
    print(f"strength {strength}: max error vs ComfyUI relative to each tensor's change: {worst:.2e}")
    assert worst < 1e-5
    assert "turbo_lora" not in (getattr(model, "peft_config", None) or {})
    assert_unchanged(model, before)


def test_full_deltas_turn_raw_into_turbo(files, one_torch_thread):
    """Independent of ComfyUI: a file of exact float32 deltas for every tensor (ComfyUI's full_diff type) stacked on
    Raw at strength 1 is Turbo: same velocity as the Turbo checkpoint."""
    raw = load_transformer(files.raw, dtype="float32")
    turbo = load_transformer(files.turbo, dtype="float32")
    assert transformer_file_kind(files.full) == "lora"
    lora = read_turbo_lora(files.full)
    assert lora.adapter is None and len(lora.diffs) == len(raw.state_dict())
    g = torch.Generator().manual_seed(0)
    x, emb, sigma = torch.randn(1, 16, 64, generator=g), torch.randn(1, 5, 12, 32, generator=g), torch.tensor([0.7])
    want = predict_velocity(turbo, x, sigma, emb, None, (4, 4))
    plain = predict_velocity(raw, x, sigma, emb, None, (4, 4))
    with stacked_lora(raw, lora, 1.0):
        got = predict_velocity(raw, x, sigma, emb, None, (4, 4))
    err = float((got - want).abs().max() / (want - plain).abs().max())
    print(f"Raw + full deltas vs Turbo: relative error {err:.2e}")
    assert err < 1e-5
    torch.testing.assert_close(predict_velocity(raw, x, sigma, emb, None, (4, 4)), plain, rtol=0, atol=0)


@pytest.mark.parametrize("memory, which", [("plain", "mixed"), ("offload", "mixed"), ("offload", "full")])
def test_preview_with_deltas_equals_turbo_by_hand(tiny_dir, files, memory, which):
    """The preview path (train/preview._turbo_lora_latents) with the mixed file (LoRA + deltas) or the full one
    (deltas only: no adapter is added) under a training LoRA, with and without block offload (poisoned CPU homes: a
    delta lost on the next onload would show): Raw + LoRA + deltas merged by hand."""
    from krea2_train.runtime.memory import offload_blocks

    model = trained_transformer(tiny_dir).eval()
    training = TrainedAdapter.from_model(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if memory == "offload":
        offload_blocks(model, "cpu", poison=True)
    path = getattr(files, which)
    turbo = read_turbo_lora(path)
    cfg = SimpleNamespace(model=SimpleNamespace(dtype="float32"), preview=SimpleNamespace(
        turbo=str(path), turbo_steps=3, turbo_lora_strength=0.7, prompts=["a red circle"]))
    emb, mask = torch.randn(1, 5, 12, 32), torch.ones(1, 5, dtype=torch.bool)
    size = dict(height=64, width=64, seed=1)
    preview._TURBO_ALONE.clear()
    preview._TURBO_LORAS.clear()
    alone, with_lora = preview._turbo_lora_latents(cfg, model, emb, mask, size, str(path), "cpu")

    def by_hand(adapters):
        m = load_transformer(files.raw, dtype="float32")
        with torch.no_grad():
            for adapter, s in adapters:
                for mod in adapter.modules if adapter is not None else ():
                    m.get_submodule(mod).weight += s * adapter.delta(mod)
            for name, d in turbo.diffs.items():
                m.get_parameter(name).add_(0.7 * d)
        return m

    settings = SampleSettings.turbo(steps=3, **size)
    torch.testing.assert_close(alone, sample_latents(by_hand([(turbo.adapter, 0.7)]), emb, mask, settings),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(with_lora, sample_latents(by_hand([(turbo.adapter, 0.7), (training, 1.0)]), emb,
                                                         mask, settings), rtol=0, atol=1e-5)
    if memory == "offload":
        model._krea2_offloader.remove()
    assert_unchanged(model, before)


def test_sample_cli_reads_deltas(files):
    from krea2_train.cli.sample import _turbo_lora

    lora = _turbo_lora(SimpleNamespace(turbo_lora=str(files.mixed)))
    assert lora.adapter is not None and lora.diffs


def test_what_cannot_be_applied_exactly_is_refused(files, tmp_path):
    mixed = load_file(files.mixed)
    cases = {
        "set_weight": ({**mixed, "diffusion_model.first.set_weight": mixed["diffusion_model.first.diff"]
                        if "diffusion_model.first.diff" in mixed else torch.zeros(1)}, "set_weight"),
        "bias_of_a_norm": ({**mixed, "diffusion_model.last.norm.scale.diff_b": torch.zeros(128)},
                           "bias delta on the parameter last.norm.scale"),
        "lora_and_diff": ({**mixed, "diffusion_model.blocks.0.attn.wq.diff": torch.zeros(128, 128)},
                          r"blocks?\.0.*both lora factors and a full `\.diff`"),
        "unknown_prefix": ({**mixed, "something.blocks.0.prenorm.scale.diff": torch.zeros(128)},
                           "something.blocks.0.prenorm.scale.diff is none of these"),
        "not_krea2": ({**mixed, "diffusion_model.double_blocks.0.img_mod.lin.diff": torch.zeros(8)},
                      "not a Krea 2 transformer parameter"),
        "two_namings": ({**mixed, "transformer.img_in.diff_b": torch.zeros(128)}, "both patch"),
    }
    for name, (state, match) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(state, path)
        with pytest.raises(TurboSourceError, match=match) as err:
            read_turbo_lora(path)
        assert str(path) in str(err.value), name
    # a delta of the wrong shape or for a missing parameter: refused before anything is changed
    model = load_transformer(files.raw, dtype="float32")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wrong = {**mixed, "diffusion_model.last.norm.scale.diff": torch.zeros(7)}
    save_file(wrong, tmp_path / "wrong.safetensors")
    with pytest.raises(UserError, match=r"wrong.safetensors: diffusion_model.last.norm.scale.diff has shape \(7,\)"):
        with stacked_lora(model, tmp_path / "wrong.safetensors", 1.0):
            pass
    extra = {**mixed, "diffusion_model.blocks.5.prenorm.scale.diff": torch.zeros(128)}  # the tiny model has 2 blocks
    save_file(extra, tmp_path / "extra.safetensors")
    with pytest.raises(UserError, match="blocks.5.prenorm.scale.diff patches transformer_blocks.5.norm1.weight"):
        with stacked_lora(model, tmp_path / "extra.safetensors", 1.0):
            pass
    assert_unchanged(model, before)
    assert not re.search("turbo|stacked", " ".join(n for n, _ in model.named_parameters()))


# ------------------------------------------------------------------------------------------------------- extract
def test_extract_writes_comfyui_deltas(files, tmp_path, capsys, one_torch_thread):
    """`krea2-train extract RAW TURBO --deltas biases|all`: the LoRA plus Turbo - Raw exactly for what a LoRA cannot
    carry, named as ComfyUI's extractor names bias deltas (`<module>.diff_b`) and its key map other parameters;
    ComfyUI's own load_lora reads every key; at full rank Raw + the file is Turbo."""
    from krea2_train.cli import main

    raw, turbo = load_file(files.raw), load_file(files.turbo)
    out = {}
    for which in ("biases", "all"):
        out[which] = tmp_path / f"turbo_{which}.safetensors"
        assert main(["extract", str(files.raw), str(files.turbo), "--out", str(out[which]), "--rank", "256",
                     "--deltas", which, "--dtype", "float32"]) == 0
    keys = {w: [k for k in load_file(p) if k.endswith((".diff", ".diff_b"))] for w, p in out.items()}
    assert sorted(keys["biases"]) == sorted(f"diffusion_model.{k[:-len('.bias')]}.diff_b" for k in raw
                                            if k.endswith(".bias"))
    others = [k for k in raw if not k.endswith((".weight", ".bias"))]  # norm scales, modulation tables
    assert sorted(keys["all"]) == sorted(keys["biases"] + [f"diffusion_model.{k}.diff" for k in others])
    comfy = _comfy_source.load()
    if comfy is not None:
        weights = {f"diffusion_model.{k}": v for k, v in raw.items()}
        theirs, not_loaded, errors = _comfy_source.patch(comfy, load_file(out["all"]), comfyui_key_map(files.raw),
                                                         weights)
        assert not not_loaded and not errors and len(theirs) == len(raw)
        for k in others + [k for k in raw if k.endswith(".bias")]:  # the deltas: exactly Turbo's tensors
            torch.testing.assert_close(theirs[f"diffusion_model.{k}"], turbo[k].float(), rtol=0, atol=1e-6)
    model, target = load_transformer(files.raw, dtype="float32"), load_transformer(files.turbo, dtype="float32")
    g = torch.Generator().manual_seed(1)
    x, emb, sigma = torch.randn(1, 16, 64, generator=g), torch.randn(1, 5, 12, 32, generator=g), torch.tensor([0.5])
    want = predict_velocity(target, x, sigma, emb, None, (4, 4))
    errs = {}
    for which, path in out.items():
        with stacked_lora(model, path, 1.0), torch.no_grad():
            errs[which] = float((predict_velocity(model, x, sigma, emb, None, (4, 4)) - want).norm() / want.norm())
    print(f"full-rank extract vs Turbo: velocity rel err {errs}")
    assert errs["all"] < 1e-4 < errs["biases"]
    capsys.readouterr()
    assert main(["extract", str(files.raw), str(files.turbo), "--out", str(tmp_path / "d"), "--deltas", "all",
                 "--format", "diffusers"]) != 0
    assert "Only --format comfyui carries" in capsys.readouterr().err and not (tmp_path / "d").exists()


def test_deltas_refused_on_one_byte_and_sharded_weights(files, tmp_path, monkeypatch):
    """A `.diff` on a Linear weight the base keeps 1 byte (ComfyUI fp8 file, keep_quantized) cannot be added exactly;
    any delta on an FSDP-sharded parameter is refused too. Nothing is changed."""
    from _comfy_quant import quantize_file

    from krea2_train.runtime import sharding

    state, header = quantize_file(load_file(files.raw), "float8_e4m3fn", groupsize=64)
    save_file(state, tmp_path / "raw_fp8.safetensors", metadata=header)
    model = load_transformer(tmp_path / "raw_fp8.safetensors", dtype="float32", keep_quantized=True)
    assert model.transformer_blocks[0].attn.to_q.weight.element_size() == 1
    save_file({"diffusion_model.blocks.0.attn.wq.diff": torch.zeros(128, 128)}, tmp_path / "wq.safetensors")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match=r"wq.safetensors: diffusion_model.blocks.0.attn.wq.diff .*1-byte quantised"):
        with stacked_lora(model, tmp_path / "wq.safetensors", 1.0):
            pass
    with stacked_lora(model, files.full.parent / "krea2_turbo_lora_rank_8_bf16.safetensors", 1.0):
        pass  # biases, norms and tables stay float in a 1-byte base: the mixed file applies
    assert_unchanged(model, before)
    plain = load_transformer(files.raw, dtype="float32")
    monkeypatch.setattr(sharding, "is_sharded", lambda t: t is plain.final_layer.norm.weight)
    with pytest.raises(UserError, match="FSDP-sharded"):
        with stacked_lora(plain, files.mixed, 1.0):
            pass


def test_run_start_checks_the_deltas_fit(files, tmp_path, monkeypatch):
    """train/trainer.py calls check_turbo_lora_fits once the model is built: a delta file that cannot be applied
    to this transformer (here: sharded) is refused at the start, naming preview.turbo, not at the first preview."""
    from krea2_train.lora.turbo import check_turbo_lora_fits
    from krea2_train.runtime import sharding

    model = load_transformer(files.raw, dtype="float32")
    cfg = SimpleNamespace(model=SimpleNamespace(turbo=None), preview=SimpleNamespace(
        prompts=["a red circle"], turbo=str(files.mixed)))
    check_turbo_lora_fits(cfg, model)  # fits
    monkeypatch.setattr(sharding, "is_sharded", lambda t: t is model.img_in.bias)
    with pytest.raises(UserError, match="preview.turbo: .*FSDP-sharded"):
        check_turbo_lora_fits(cfg, model)
    cfg.preview.prompts = []
    check_turbo_lora_fits(cfg, model)  # no previews: nothing to check


def test_other_delta_namings_comfyui_maps(files, tmp_path):
    """The other names ComfyUI's Krea 2 key map gives a delta (a bias by its own name + .diff, diffusers Linear
    names under diffusion_model. / transformer.) patch what ComfyUI's code patches."""
    comfy = _comfy_source.load()
    if comfy is None:
        pytest.skip("ComfyUI source not available")
    g = torch.Generator().manual_seed(3)
    lora = {"diffusion_model.first.bias.diff": torch.randn(128, generator=g),
            "transformer.time_embed.linear_1.diff_b": torch.randn(128, generator=g),
            "diffusion_model.transformer_blocks.0.attn.to_q.diff": torch.randn(128, 128, generator=g),
            "transformer.transformer_blocks.1.ff.up.diff": torch.randn(256, 128, generator=g)}
    raw = load_file(files.raw)
    theirs, not_loaded, errors = _comfy_source.patch(comfy, lora, comfyui_key_map(files.raw),
                                                     {f"diffusion_model.{k}": v for k, v in raw.items()}, 0.5)
    assert not not_loaded and not errors and len(theirs) == 4
    want = to_diffusers({k: theirs.get(f"diffusion_model.{k}", v.float()) for k, v in raw.items()})
    save_file(lora, tmp_path / "names.safetensors")
    model = load_transformer(files.raw, dtype="float32")
    with stacked_lora(model, tmp_path / "names.safetensors", 0.5):
        ours = effective_state(model)
    base = to_diffusers({k: v.float() for k, v in raw.items()})
    changed = [k for k in want if not torch.equal(want[k], base[k])]
    assert len(changed) == 4
    for k in want:
        torch.testing.assert_close(ours[k], want[k], rtol=0, atol=1e-6)


def test_inspect_describes_a_turbo_lora_with_deltas(files, tmp_path, capsys):
    """`inspect` reads what `extract --deltas` writes (and a header-less Comfy-Org-style file): LoRA modules, .diff /
    .diff_b counts, rank and the base it goes on; the plain-LoRA tools still refuse the file, naming inspect."""
    import json

    from krea2_train.cli import main

    out = tmp_path / "turbo.safetensors"
    assert main(["extract", str(files.raw), str(files.turbo), "--out", str(out), "--rank", "4", "--deltas",
                 "biases"]) == 0
    keys = list(load_file(out))
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["deltas"] == {"diff": sum(k.endswith(".diff") for k in keys),
                              "diff_b": sum(k.endswith(".diff_b") for k in keys)} and info["deltas"]["diff_b"] > 0
    assert info["modules"] == sum(k.endswith(".lora_down.weight") for k in keys)
    assert max(info["ranks"], key=int) in (4, "4") and info["kind"].startswith("Turbo LoRA")
    assert "Raw" in info["applies_to"] and not info["diffusers_loadable"]
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"deltas: {info['deltas']['diff']} .diff + {info['deltas']['diff_b']} .diff_b" in text
    assert "Turbo LoRA" in text and "applies to: Krea 2 Raw" in text
    # no header saying where it came from: described, but not claimed to be Turbo minus Raw
    assert main(["inspect", str(files.mixed), "--json"]) == 0
    mixed = json.loads(capsys.readouterr().out)
    assert mixed["kind"].startswith("LoRA with full-weight deltas") and mixed["deltas"]["diff_b"] > 0
    # training / converting / merging read plain LoRAs only: still a clear refusal
    assert main(["convert", str(out), str(tmp_path / "c.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "full-weight delta" in err and "`inspect` describes it" in err


def test_extract_deltas_refusal_names_the_reason(files, tmp_path, capsys):
    """--deltas with a layout other than comfyui: the message says why for that layout and what to use; an unknown
    --format is refused before any SVD."""
    from krea2_train.cli import main

    for fmt, why in (("civitai", "written in the comfyui layout only"), ("musubi", "musubi-tuner"),
                     ("diffusers", "diffusers' Krea 2 loader reads no")):
        assert main(["extract", str(files.raw), str(files.turbo), "--out", str(tmp_path / "x"), "--deltas", "all",
                     "--format", fmt]) == 2
        err = capsys.readouterr().err
        assert why in err and "use --format comfyui, or --deltas none" in err, err
    assert main(["extract", str(files.raw), str(files.turbo), "--out", str(tmp_path / "x"), "--format", "nope"]) == 2
    assert "unknown LoRA format 'nope'" in capsys.readouterr().err and not (tmp_path / "x").exists()
