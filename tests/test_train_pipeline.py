"""`krea2-train CONFIG` end to end on the tiny model and the demo dataset: check-data, cache, train, export, verify;
a second run skips every step; SIGTERM during `krea2-train train` leaves a checkpoint the next run resumes from;
a bad config fails before any work with the key named."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from krea2_train.cli import main

ROOT = Path(__file__).resolve().parents[1]


def small_dataset(tmp_path) -> Path:
    """Six demo images (two held out): caching stays a few seconds."""
    import shutil

    out = tmp_path / "data"
    out.mkdir(exist_ok=True)
    for png in sorted((ROOT / "datasets" / "demo").glob("*.png"))[:6]:
        shutil.copy(png, out / png.name)
        shutil.copy(png.with_suffix(".txt"), out / png.with_suffix(".txt").name)
    return out


def write_config(tiny_dir, tmp_path, steps=4, **extra) -> Path:
    data = small_dataset(tmp_path)
    text = f"""
model:
  transformer: {tiny_dir}/transformer_raw.safetensors
  turbo: {tiny_dir}/transformer_turbo.safetensors
  text_encoder: {tiny_dir}/text_encoder
  vae: {tiny_dir}/vae
  architecture: tiny
  dtype: float32
data:
  datasets: [{{path: {data}, trigger_word: k2demo}}]
  validation_images: 2
  num_workers: 0
lora: {{rank: 4}}
train:
  mixed_precision: "no"
  stages: [{{resolution: 128, steps: {steps}, batch_size: 2}}]
optimizer: {{lr: 1.0e-3}}
checkpoint: {{every_steps: {extra.get("every", 2)}}}
validation: {{every_steps: 2}}
preview: {{every_steps: 0, prompts: ["k2demo, a red circle"], resolution: 64, raw_steps: 2, turbo_steps: 2}}
logging: {{progress: none, tensorboard: true}}
export: {{formats: [diffusers, comfyui], verify: true, transfer_report: true}}
output_dir: {tmp_path}/runs
run_name: pipe
cache_dir: {tmp_path}/cache
seed: 3
"""
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


@pytest.mark.slow
def test_run_all_then_everything_is_skipped(tiny_dir, tmp_path, capsys):
    cfg = write_config(tiny_dir, tmp_path)
    assert main([str(cfg)]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "pipe"
    for step in ("check-data", "cache", "train", "verify", "export"):
        assert f"==> {step}" in out, out
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    assert (run / "config.yaml").exists() and (run / "loss.png").exists()
    assert (run / "export" / "pipe_comfyui.safetensors").exists()
    assert all(r["ok"] for r in json.loads((run / "export" / "verify.json").read_text()).values())
    assert (run / "export" / "transfer_report.json").exists() and (run / "export" / "transfer_grid.png").exists()
    assert (run / "previews" / "step-000004.png").exists()  # final preview (Raw + Turbo grid)
    from PIL import Image as _Image

    steps = _Image.open(run / "previews" / "over_steps.png")  # every preview of the run, one under another
    assert steps.height > _Image.open(run / "previews" / "step-000004.png").height
    # both pictures carry ComfyUI's graph for the exported file, as SaveImage writes it (tEXt workflow + prompt)
    from PIL import Image

    for png, strength in ((run / "previews" / "step-000004.png", 1.0),
                          (run / "export" / "transfer_grid.png", None)):
        text = Image.open(png).text
        api = json.loads(text["prompt"])
        lora = next(n["inputs"] for n in api.values() if n["class_type"] == "LoraLoaderModelOnly")
        assert lora["lora_name"] == "pipe_comfyui.safetensors" and "nodes" in json.loads(text["workflow"])
        report = json.loads((run / "export" / "transfer_report.json").read_text())
        want = strength if strength is not None else round(report["suggested_turbo_strength"], 2)
        assert lora["strength_model"] == pytest.approx(want)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in m for m in metrics) and all("lr" in m for m in metrics if "loss" in m)
    assert list((run / "logs").rglob("events.out.tfevents.*")), "TensorBoard events"
    page = (run / "index.html").read_text()  # the run page, with the data report check-data left for it
    assert "not there yet" not in page and f"open {run / 'index.html'}" in out

    # `transfer RUN` takes the run's models, prompts, preview size and training images (not 1024 px on a tiny model)
    assert main(["transfer", str(run), "--out", str(tmp_path / "transfer")]) == 0
    again = json.loads((tmp_path / "transfer" / "transfer_report.json").read_text())
    assert again["resolution"] == [64, 64] and again["prompts"] == ["k2demo, a red circle"] and "style" in again
    capsys.readouterr()

    assert main([str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "cache: up to date" in out or "only missing entries" in out
    assert "already finished 4 steps, skipped" in out and "is up to date, skipped" in out


def test_bad_config_fails_before_any_work(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model: {transformer: a, text_encoder: b, vae: c}\nlora: {rnak: 4}\noutput_dir: " +
                   str(tmp_path / "runs") + "\n")
    assert main([str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "`lora.rnak`" in err and "Did you mean `rank`" in err and "Traceback" not in err
    cfg.write_text("model: {transformer: a, text_encoder: b, vae: c}\noutput_dir: " + str(tmp_path / "runs") + "\n")
    assert main(["train", str(cfg), "lora.rank=4", "optimizer.name=adam"]) == 2
    assert "optimizer.name" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_sigterm_saves_checkpoint_and_resumes(tiny_dir, tmp_path):
    cfg = write_config(tiny_dir, tmp_path, steps=400, every=0)
    exe = Path(sys.executable).parent / "krea2-train"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([str(exe), "train", str(cfg), "preview.prompts=[]", "validation.every_steps=0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    metrics = tmp_path / "runs" / "pipe" / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "checkpoint saved" in out
    ckpts = sorted((tmp_path / "runs" / "pipe" / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "adapter_model.safetensors").exists()
    stopped = int(ckpts[0].name.split("-")[1])
    assert 3 <= stopped < 400
    # the same command resumes from it (only a few more steps here)
    assert main(["train", str(cfg), f"train.stages=[{{resolution: 128, steps: {stopped + 2}, batch_size: 2}}]",
                 "preview.prompts=[]"]) == 0
    done = json.loads((tmp_path / "runs" / "pipe" / "train_done.json").read_text())
    assert done["step"] == stopped + 2


@pytest.mark.slow
def test_resume_on_cached_data_matches_straight_run(tiny_dir, tmp_path):
    """Stop+resume equals an uninterrupted run with the real loader too (flip and caption dropout on)."""
    import torch
    from safetensors.torch import load_file

    from krea2_train import pipeline
    from krea2_train.config import load_config
    from krea2_train.data.source import CachedData
    from krea2_train.train.trainer import Trainer

    path = write_config(tiny_dir, tmp_path, steps=4)
    extra = ["data.flip=true", "data.datasets.0.caption_dropout=0.3", "preview.prompts=[]", "export.verify=false",
             "validation.every_steps=0", "checkpoint.every_steps=0"]
    manifest = None

    def run(name, stop_at=None):
        nonlocal manifest
        cfg = load_config(path, extra + [f"run_name={name}"])
        if manifest is None:
            manifest = pipeline.cache(cfg, pipeline.check_data(cfg))
        t = Trainer(cfg)
        t.source = CachedData(cfg, t.acc, manifest=manifest)
        if stop_at:
            t.on_step = lambda tr, step: tr.request_stop() if step == stop_at else None
        return t.run(), cfg

    run("straight")
    first, _ = run("resumed", stop_at=2)
    assert first.interrupted and first.step == 2
    second, cfg = run("resumed")
    assert second.step == 4
    a = load_file(str(tmp_path / "runs" / "straight" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(cfg.run_dir / "adapter" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.slow
def test_demo_config_lowers_the_loss(tiny_dir, tmp_path):
    """configs/demo.yaml as shipped (shortened to its first stage): the held-out validation loss, at fixed sigmas and
    noise, goes down, and so does the training loss."""
    from krea2_train import pipeline
    from krea2_train.config import load_config
    from krea2_train.data.source import CachedData
    from krea2_train.train.trainer import Trainer

    cfg = load_config(ROOT / "configs" / "demo.yaml", [
        f"model.transformer={tiny_dir}/transformer_raw.safetensors",
        f"model.turbo={tiny_dir}/transformer_turbo.safetensors", f"model.text_encoder={tiny_dir}/text_encoder",
        f"model.vae={tiny_dir}/vae", "make_tiny=null", f"output_dir={tmp_path}/runs", f"cache_dir={tmp_path}/cache",
        f"data.datasets.0.path={ROOT}/datasets/demo", "train.stages=[{resolution: 128, steps: 30, batch_size: 2}]",
        "preview.prompts=[]", "checkpoint.every_steps=0", "validation.every_steps=30", "logging.progress=none",
        "logging.tensorboard=false", "optimizer.warmup_steps=5", "data.flip=false"])
    manifest = pipeline.cache(cfg, pipeline.check_data(cfg))
    t = Trainer(cfg)
    t.source = CachedData(cfg, t.acc, manifest=manifest)
    t.setup()
    before = t.validation_loss(cfg.train.stages[0])
    res = t.run()
    after = json.loads([line for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()
                        if "val_loss" in line][-1])["val_loss"]
    assert after < 0.95 * before, (before, after)  # 1.43 -> 1.28 as shipped
    losses = [loss for _, loss in res.history]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10


@pytest.mark.slow
def test_ctrl_c_to_process_group_with_loader_workers(tiny_dir, tmp_path):
    """Ctrl-C in a terminal signals the whole process group, loader workers included: the run still finishes its
    step (several micro-batches here), saves a checkpoint and exits with 130."""
    cfg = write_config(tiny_dir, tmp_path, steps=400, every=0)
    exe = Path(sys.executable).parent / "krea2-train"
    proc = subprocess.Popen([str(exe), "train", str(cfg), "preview.prompts=[]", "validation.every_steps=0",
                             "data.num_workers=2", "train.gradient_accumulation=3"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = tmp_path / "runs" / "pipe" / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "worker" not in out.lower() or "exited unexpectedly" not in out, out
    assert len(list((tmp_path / "runs" / "pipe" / "checkpoints").glob("step-*"))) == 1


def _export_cfg(tmp_path, *extra):
    from krea2_train.config import load_config

    return load_config(None, ["model.transformer=a", "model.text_encoder=b", "model.vae=c", "run_name=r",
                              f"output_dir={tmp_path}", "export.formats=[comfyui]", "export.verify=false",
                              f"data.datasets=[{{path: {tmp_path}, trigger_word: k2demo}}]", *extra])


def test_export_freshness_compares_name_and_metadata(tmp_path):
    from krea2_train.pipeline import export_settings, export_valid

    cfg = _export_cfg(tmp_path)
    (cfg.run_dir / "adapter").mkdir(parents=True)
    (cfg.run_dir / "adapter" / "adapter_model.safetensors").write_bytes(b"x")
    (cfg.run_dir / "export").mkdir()
    name, metadata = export_settings(cfg)
    # what export_lora writes: its own keys (name inside metadata, a suggested Turbo strength) come along
    (cfg.run_dir / "export" / "export.json").write_text(json.dumps(
        {"name": name, "metadata": {"name": name, **metadata, "turbo_strength": 0.8},
         "files": {"comfyui": {"path": f"{name}_comfyui.safetensors"}},
         "comfyui_workflow": {"models": {"unet": "krea2_turbo_fp8_scaled.safetensors",
                                         "text_encoder": "qwen3vl_4b_fp8_scaled.safetensors",
                                         "vae": "qwen_image_vae.safetensors"}}}))
    assert export_valid(cfg)
    assert not export_valid(_export_cfg(tmp_path, "export.comfyui_unet=krea2_turbo_bf16.safetensors"))
    assert not export_valid(_export_cfg(tmp_path, "export.name=other"))
    assert not export_valid(_export_cfg(tmp_path, "export.trigger_words=[newword]"))
    assert not export_valid(_export_cfg(tmp_path, "export.formats=[comfyui, diffusers]"))
    assert export_valid(_export_cfg(tmp_path, "export.trigger_words=[k2demo]"))  # same words, said explicitly


def test_export_lines_come_before_verify(tmp_path, monkeypatch, capsys):
    from krea2_train import pipeline

    cfg = _export_cfg(tmp_path, "export.verify=true", "model.turbo=t")
    fake = {"comfyui": tmp_path / "r_comfyui.safetensors"}
    monkeypatch.setattr("krea2_train.export.export.export_and_verify", lambda *a, **k: {"paths": fake})
    assert pipeline.export(cfg) == fake
    out = capsys.readouterr().out
    assert out.index("==> export: comfyui:") < out.index("==> verify:"), out


def test_wrong_model_path_fails_before_any_work(tiny_dir, tmp_path, capsys):
    cfg = write_config(tiny_dir, tmp_path)
    assert main([str(cfg), f"model.turbo={tmp_path}/no_such_turbo.safetensors"]) == 2
    captured = capsys.readouterr()
    assert "`model.turbo`" in captured.err and "no_such_turbo" in captured.err and "Traceback" not in captured.err
    assert "==> check-data" not in captured.out and not (tmp_path / "cache").exists()
    # `krea2-train train` checks them before building the caches too
    assert main(["train", str(cfg), f"model.vae={tmp_path}/no_such_vae"]) == 2
    assert "`model.vae`" in capsys.readouterr().err and not (tmp_path / "cache").exists()


def test_one_stage_resolutions_for_data_commands_and_trainer():
    from krea2_train.cli import data as data_cli
    from krea2_train.data import source as data_source

    assert data_cli.stage_resolutions is data_source.stage_resolutions
