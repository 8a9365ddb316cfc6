"""`krea2-train estimate CONFIG`: a row per stage from the config's own settings (full size for configs/style.yaml,
the tiny architecture elsewhere), monotone in rank and batch, the same number as scripts/estimate_memory.py for the
same settings, and the fit verdict / preset suggestion."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

from krea2_train.cli import main
from krea2_train.config import load_config
from krea2_train.config.memory import resolve_memory_settings
from krea2_train.estimate import command as est

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")
STYLE = str(ROOT / "configs" / "style.yaml")


def _rows(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+\d+ px\s", line)]


def test_demo_config_prints_a_row_per_stage(capsys):
    assert main(["estimate", DEMO]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    assert [(r[1], r[3]) for r in rows] == [("128", "4"), ("256", "1")]  # resolution, batch of each stage
    assert "micro model" in out and "fits a 24 GB card with" in out and "not a measurement" in out
    assert "non-square buckets of the same area" in out


def test_style_config_full_size(capsys):
    assert main(["estimate", STYLE]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    assert [(r[1], r[3]) for r in rows] == [("512", "4"), ("1024", "1")]
    assert "full-size model" in out and "memory.preset: 48gb" in out
    assert "fits a 48 GB card" in out  # the preset's size is the default card
    assert sum("<- largest" in line for line in out.splitlines()) == 1
    card = [float(r[6]) for r in rows]
    assert all(20 < c < 48 for c in card), card


def _tiny(overrides):
    cfg = load_config(DEMO, overrides, warn_paths=False)
    return est.estimate_config(cfg, tiny=True)


def test_bigger_rank_or_batch_gives_a_bigger_estimate():
    one = ["train.stages=[{resolution: 256, batch_size: 1}]"]
    base = _tiny(one + ["lora.rank=8"])["stages"][0]["est_alloc_gib"]
    rank = _tiny(one + ["lora.rank=64"])["stages"][0]["est_alloc_gib"]
    batch = _tiny(["train.stages=[{resolution: 256, batch_size: 3}]", "lora.rank=8"])["stages"][0]["est_alloc_gib"]
    assert rank > base and batch > base


def test_same_settings_as_a_bench_config_give_the_scripts_number():
    spec = importlib.util.spec_from_file_location("_estimate_memory_cli", ROOT / "scripts" / "estimate_memory.py")
    em = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = em
    spec.loader.exec_module(em)
    for name, preset in (("preset_48gb", "48gb"), ("int8", "24gb"), ("nf4_offload", "16gb")):
        script = em.estimate(name, tiny=True, rank=32, resolution=256)
        # bench_step's set-up: rank 32 (alpha = rank) on the block attention, bf16 base under bf16 autocast
        mine = _tiny([f"memory.preset={preset}", "lora.rank=32", "lora.targets=attention", "model.dtype=bfloat16",
                      "train.mixed_precision=bf16", "train.stages=[{resolution: 256, batch_size: 1}]"])
        row = mine["stages"][0]
        assert row["est_card_gib"] == pytest.approx(script["est_card_gib"], rel=1e-12), name
        assert row["weights_gib"] == pytest.approx(script["weights_gib"], rel=1e-12)


def test_verdict_suggests_only_estimated_presets(capsys):
    assert main(["estimate", DEMO, "--tiny", "--card", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "needs ~0.8 GiB" in out and "more than a 0.1 GB card" in out
    assert "memory.preset" not in out.splitlines()[-2]  # no preset is for <= 0.1 GB: nothing to suggest
    assert main(["estimate", DEMO, "memory.preset=80gb", "--card", "0.1"]) == 0
    out = capsys.readouterr().out
    line = out.splitlines()[-2]
    assert "smaller presets estimated: memory.preset: 48gb (est." in line and "16gb (est." in line
    assert "none fits" in line


def test_verdict_logic_with_a_stub_estimate():
    cfg = load_config(DEMO, ["memory.preset=80gb"], warn_paths=False)
    settings = resolve_memory_settings(dict(preset="80gb"))

    def res(card, fsdp=False):
        return dict(settings=settings, fsdp=fsdp, stages=[dict(stage=0, resolution=1024, batch=1, est_card_gib=card)])

    asked = []

    def stub(preset):
        asked.append(preset)
        return res({"48gb": 40.0, "24gb": 17.0, "16gb": 6.0}[preset])

    assert est.verdict(cfg, res(20.0), 24, stub) == [
        "fits a 24 GB card with 4.0 GiB to spare (largest: stage 0, 1024 px x 1)"]
    assert asked == []
    lines = est.verdict(cfg, res(55.7), 24, stub)
    assert lines[0].startswith("needs ~55.7 GiB") and lines[1] == "try memory.preset: 24gb (est. 17.0 GiB)"
    assert asked == ["48gb", "24gb"]  # stops at the first that fits


def test_user_errors_are_one_line(capsys):
    assert main(["estimate", DEMO, "--caption-tokens", "600"]) == 2
    assert "--caption-tokens=600" in capsys.readouterr().err
    assert main(["estimate", DEMO, "memory.preset=24gb", "--fsdp", "--gpus", "2"]) == 2
    err = capsys.readouterr().err
    assert "memory.quantize=int8" in err and len(err.strip().splitlines()) == 1
    assert main(["estimate", DEMO, "lora.blocks=[99]"]) == 2
    assert "lora.blocks" in capsys.readouterr().err


def test_verdict_first_suggests_checkpointing_every_block():
    """Recompute is the cheapest fix when some blocks keep their activations (and the only one under FSDP, where
    the quantised presets are refused)."""
    cfg = load_config(DEMO, ["memory.preset=48gb"], warn_paths=False)
    settings = resolve_memory_settings(dict(preset="48gb"))
    assert settings.checkpoint_blocks == 16

    def res(card):
        return dict(settings=settings, fsdp=True, stages=[dict(stage=0, resolution=1024, batch=1, est_card_gib=card)])

    lines = est.verdict(cfg, res(25.6), 24, lambda preset: None, lambda: res(19.5))
    assert lines[0].startswith("needs ~25.6 GiB per GPU")
    assert "memory.checkpoint_blocks: null" in lines[1] and "est. 19.5 GiB per GPU" in lines[1]
    lines = est.verdict(cfg, res(25.6), 24, lambda preset: None, lambda: res(24.5))  # does not fit either
    assert "checkpoint_blocks" not in " ".join(lines)


def test_overrides_may_follow_flags_and_fsdp_needs_gpus(capsys):
    assert main(["estimate", DEMO, "--card", "80", "lora.rank=4"]) == 0
    assert "LoRA rank 4 on" in capsys.readouterr().out
    assert main(["estimate", DEMO, "--fsdp"]) == 2
    assert "--gpus N" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["estimate", DEMO, "--card", "80", "--no-such-flag"])


@pytest.mark.parametrize("fmt,storage", [("float8_e4m3fn", "one_byte"), ("int8_convrot", "one_byte"),
                                         ("nvfp4", "dequantised")])
def test_a_comfyui_quantised_base_file_is_estimated_as_the_trainer_holds_it(tiny_dir, tmp_path, fmt, storage):
    """fp8 / int8 files keep their block weights 1 byte (the trainer's keep_quantized): estimated like
    memory.quantize=int8 on the plain file, and said so; nvfp4 is dequantised on load: the plain file's figure."""
    sys.path.insert(0, str(Path(__file__).parent))
    from _comfy_quant import quantize_file
    from safetensors.torch import load_file, save_file

    from krea2_train.models.inspect import block_weight_storage

    plain = tiny_dir / "transformer_raw.safetensors"
    state, header = quantize_file(load_file(plain), fmt, groupsize=64)  # 64: a power of 4 the tiny widths take
    qfile = tmp_path / f"raw_{fmt}.safetensors"
    save_file(state, qfile, metadata=header or None)
    assert block_weight_storage(qfile)[0] == storage and block_weight_storage(plain)[0] == "plain"
    one = ["train.stages=[{resolution: 256, batch_size: 1}]"]

    def estimate(path, *extra):
        return _tiny(one + [f"model.transformer={path}", *extra])

    got = estimate(qfile)
    want = estimate(plain, "memory.quantize=int8") if storage == "one_byte" else estimate(plain)
    assert got["stages"][0]["est_alloc_gib"] == pytest.approx(want["stages"][0]["est_alloc_gib"])
    assert estimate(plain)["notes"] == [] and len(got["notes"]) == 1 and str(qfile) in got["notes"][0]
    if storage == "one_byte":
        assert got["stages"][0]["est_alloc_gib"] < estimate(plain)["stages"][0]["est_alloc_gib"]
