"""What a new user hits first (issue 11): every command takes what they have (a data folder, a run folder), says
what it did, refuses what would mislead, and documents every flag."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pytest

from krea2_train.cli import build_parser, main

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
DEMO_DATA = Path(__file__).resolve().parents[1] / "datasets" / "demo"


# ------------------------------------------------------------------------------------------------ config
def test_config_reports_missing_paths(tmp_path, capsys):
    rc = main(["config", str(DEMO), "data.datasets.0.path=/nope/data", f"model.vae={tmp_path}/novae",
               "make_tiny=null"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "# ok" not in out
    assert "`data.datasets.0.path`" in out and "/nope/data" in out
    assert "`model.vae`" in out and "novae" in out


def test_config_ok_when_every_path_exists(tiny_dir, capsys):
    rc = main(["config", str(DEMO), f"model.transformer={tiny_dir}/transformer_raw.safetensors",
               f"model.turbo={tiny_dir}/transformer_turbo.safetensors", f"model.text_encoder={tiny_dir}/text_encoder",
               f"model.vae={tiny_dir}/vae", f"data.datasets.0.path={DEMO_DATA}"])
    assert rc == 0 and "# ok" in capsys.readouterr().out


def test_missing_model_path_reported_once(tmp_path, capsys, caplog):
    rc = main(["cache", str(DEMO), "make_tiny=null", f"model.vae={tmp_path}/novae",
               f"cache_dir={tmp_path}/cache"])
    err = capsys.readouterr().err
    assert rc == 2
    logged = [r.getMessage() for r in caplog.records if "novae" in r.getMessage()]  # warnings go to logging
    assert err.count("novae") + len(logged) == 1, (err, logged)


# ------------------------------------------------------------------------------------------------ folders
def test_check_data_takes_a_folder(capsys):
    rc = main(["check-data", str(DEMO_DATA)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "16 usable images" in out


@pytest.mark.parametrize("command", ["cache", "train"])
def test_cache_and_train_given_a_folder_show_the_command(command, capsys):
    rc = main([command, str(DEMO_DATA)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "is a folder" in err and "model.vae=" in err
    assert f"krea2-train {command} configs/style.yaml data.datasets.0.path={DEMO_DATA}" in err


def test_cache_given_a_folder_and_model_paths_works(tiny_dir, tmp_path, demo_images, capsys):
    rc = main(["cache", str(demo_images), f"model.text_encoder={tiny_dir}/text_encoder",
               f"model.vae={tiny_dir}/vae", "model.architecture=tiny", "model.dtype=float32",
               "train.stages=[{resolution: 64, steps: 1, batch_size: 1}]", f"cache_dir={tmp_path}/cache"])
    assert rc == 0
    assert "cache ready: 4 images" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ LoRA tools
@pytest.fixture(scope="module")
def run_folder(tiny_dir, tmp_path_factory):
    """runs/NAME with the exported Civitai file, as `export` leaves it."""
    from test_export_helpers import trained_adapter

    from krea2_train.lora.writers import write_lora_file

    run = tmp_path_factory.mktemp("runs") / "mystyle"
    write_lora_file(trained_adapter(tiny_dir, r=4, alpha=4), run / "export" / "mystyle.safetensors", "civitai")
    return run


def test_inspect_takes_a_run_folder(run_folder, capsys):
    assert main(["inspect", str(run_folder)]) == 0
    captured = capsys.readouterr()
    assert "layout: comfyui" in captured.out
    assert "mystyle.safetensors" in captured.err  # says which file it read


def test_inspect_shows_references_and_turbo_strength(tiny_dir, tmp_path, capsys):
    """An edit LoRA's reference method and count and its suggested Turbo strength (header metadata, as export
    writes them; the run's transfer report wins over the header and the difference is said), on their own lines:
    the info JSON in `metadata` is cut at 300 characters."""
    import json

    from test_export_helpers import trained_adapter

    from krea2_train.lora.writers import write_lora_file

    run = tmp_path / "runs" / "edits"
    meta = {"reference_method": "index_timestep_zero", "reference_count": 2, "turbo_strength": 0.8,
            "tag_frequency": {"edits": {f"tag{i}": 1 for i in range(60)}}}  # pushes the keys past the cut
    write_lora_file(trained_adapter(tiny_dir, r=4, alpha=4), run / "export" / "edits.safetensors", "civitai",
                    metadata=meta)
    assert main(["inspect", str(run / "export" / "edits.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "edit LoRA" in out and "references: 2 images, method index_timestep_zero" in out
    assert "suggested Turbo strength: 0.8 (file metadata)" in out
    report = run / "export" / "transfer_report.json"
    report.write_text(json.dumps({"suggested_turbo_strength": 0.65}))
    assert main(["inspect", str(run), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["suggested_turbo_strength"] == {"value": 0.65, "source": f"{report}; the file's metadata says 0.8"}
    # the file by name: its own header (a copy rescaled by `convert --scale` keeps the run's report beside it)
    assert main(["inspect", str(run / "export" / "edits.safetensors"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["suggested_turbo_strength"] == {"value": 0.8, "source": f"file metadata; {report} says 0.65"}
    assert info["references"] == {"count": 2, "method": "index_timestep_zero"}
    # the trained adapter has no such header: the method comes from the run's config, the count is not guessed
    import shutil

    from omegaconf import OmegaConf

    shutil.copy(DEMO.parent / "edit_demo.yaml", run / "config.yaml")
    write_lora_file(trained_adapter(tiny_dir, r=4, alpha=4), run / "adapter" / "adapter_model.safetensors", "comfyui")
    assert main(["inspect", str(run / "adapter"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    method = OmegaConf.load(run / "config.yaml").train.reference_method
    assert info["references"] == {"count": None, "method": method} and info["kind"].startswith("edit LoRA")


def test_verify_takes_a_run_folder(run_folder, tiny_dir, capsys):
    rc = main(["verify", str(run_folder), "--turbo", str(tiny_dir / "transformer_turbo.safetensors"),
               "--device", "cpu", "--no-diffusers"])
    assert rc == 0, capsys.readouterr()


@pytest.mark.parametrize("command", ["verify", "transfer", "inspect"])
def test_lora_path_checked_before_any_model(command, tiny_dir, tmp_path, capsys):
    args = {"verify": ["--turbo", str(tiny_dir / "transformer_turbo.safetensors")],
            "transfer": ["--models", str(tiny_dir), "--out", str(tmp_path / "t")], "inspect": []}[command]
    t0 = time.perf_counter()
    rc = main([command, str(tmp_path / "nope.safetensors"), *args])
    assert rc == 2
    assert "LoRA file or run folder not found" in capsys.readouterr().err
    assert time.perf_counter() - t0 < 2.0  # no model was loaded


def test_resize_refuses_what_would_mislead(run_folder, tmp_path, capsys):
    src = str(run_folder / "export" / "mystyle.safetensors")
    for flags, words in ((["--min-energy", "2"], "min-energy"), (["--min-energy", "-1"], "min-energy"),
                         (["--rank", "32"], "only lowers")):
        assert main(["resize", src, str(tmp_path / "r.safetensors"), *flags]) == 2
        assert words in capsys.readouterr().err
    assert not (tmp_path / "r.safetensors").exists()


def test_export_without_turbo_says_not_verified(run_folder, tmp_path, capsys):
    src = str(run_folder / "export" / "mystyle.safetensors")
    assert main(["export", src, "--out", str(tmp_path / "e"), "--formats", "comfyui"]) == 0
    assert "not verified" in capsys.readouterr().out


def test_export_of_a_run_folder_sizes_the_workflow_at_its_training_resolution(run_folder, tmp_path):
    import json

    (run_folder / "config.yaml").write_text("model: {transformer: a, text_encoder: b, vae: c}\n"
                                            "train: {stages: [{resolution: 128, steps: 2}, {resolution: 64, steps: 2}]}\n")
    try:
        assert main(["export", str(run_folder / "export"), "--out", str(tmp_path / "e"), "--formats", "comfyui",
                     "--name", "mystyle"]) == 0
    finally:
        (run_folder / "config.yaml").unlink()
    api = json.loads((tmp_path / "e" / "mystyle_workflow_api.json").read_text())
    (size,) = [n["inputs"] for n in api.values() if n["class_type"] == "EmptyLatentImage"]
    assert (size["width"], size["height"]) == (128, 128)


def test_export_with_turbo_reports_each_file_once(run_folder, tiny_dir, tmp_path, capsys, caplog):
    import logging

    src = str(run_folder / "export" / "mystyle.safetensors")
    with caplog.at_level(logging.INFO):
        assert main(["export", src, "--out", str(tmp_path / "v"), "--formats", "comfyui",
                     "--turbo", str(tiny_dir / "transformer_turbo.safetensors"), "--verify-dtype", "float32"]) == 0
    shown = capsys.readouterr().out + "\n".join(r.getMessage() for r in caplog.records)
    assert shown.count("LoRA verification on Turbo") == 1, shown


# ------------------------------------------------------------------------------------------------ --help
def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def test_every_flag_has_help():
    missing = []
    for name, sub in _subparsers(build_parser()).items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            if not action.help:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, missing


def test_every_flag_with_a_default_says_it():
    """`COMMAND --help` shows what an option is when it is not given (e.g. extract --format: comfyui)."""
    silent = []
    for name, sub in _subparsers(build_parser()).items():
        for action in sub._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction) or \
                    action.default in (None, False, [], argparse.SUPPRESS):
                continue
            if "default" not in (action.help or "").lower():
                silent.append(f"{name} {'/'.join(action.option_strings)} (default {action.default!r})")
    assert not silent, silent


# ------------------------------------------------------------------------------------------------ quiet
def test_no_bitsandbytes_kernel_warning_on_a_command():
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "krea2_train.cli", "check-data", str(DEMO_DATA)], cwd=root,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr
    assert "gemm_4bit_forward" not in proc.stderr and "pip install kernels" not in proc.stderr, proc.stderr


def test_only_the_main_process_prints(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")  # what accelerate launch sets on the second process
    assert main(["check-data", str(DEMO_DATA)]) == 0
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    assert main(["check-data", str(DEMO_DATA)]) == 0
    assert "16 usable images" in capsys.readouterr().out
