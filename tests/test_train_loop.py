"""Training loop on the tiny Krea 2 with synthetic latents/embeddings of the real shapes (64 packed channels, 12 text
layers of width 32): the loss goes down, stop+resume equals an uninterrupted run, Ctrl-C leaves a usable checkpoint,
the NaN guard skips and then stops."""

import math
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from krea2_train.config import load_config
from krea2_train.train.batches import SyntheticData
from krea2_train.train.checkpoint import latest_checkpoint, list_checkpoints
from krea2_train.train.resume import training_done
from krea2_train.train.trainer import NonFiniteLossError, Trainer, train


def tiny_cfg(tiny_dir, out, *overrides):
    base = [
        f"model.transformer={tiny_dir}/transformer_raw.safetensors", f"model.text_encoder={tiny_dir}/text_encoder",
        f"model.vae={tiny_dir}/vae", "model.dtype=float32", "train.mixed_precision=no",
        "train.stages=[{resolution: 64, steps: 6, batch_size: 2}]", "optimizer.lr=2e-3", f"output_dir={out}",
        "run_name=run", "checkpoint.every_steps=3", "logging.progress=none", "logging.tensorboard=false",
        "lora.rank=4", "memory.gradient_checkpointing=false",
    ]
    return load_config(None, base + list(overrides))


def adapter(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


class FitData(SyntheticData):
    """Validation on the training samples themselves: fixed sigmas and noise make the before/after comparison exact."""

    def validation_batches(self, stage):
        lat, text = self._samples(stage.resolution)
        return [self.collate(lat[i : i + 1], [text[i]]) for i in range(len(text))]


def test_loss_goes_down(tiny_dir, tmp_path):
    cfg = tiny_cfg(tiny_dir, tmp_path, "train.stages=[{resolution: 64, steps: 30, batch_size: 2}]",
                   "lora.targets=attention_mlp", "lora.rank=8", "optimizer.lr=5e-3", "checkpoint.every_steps=0",
                   "validation.every_steps=30")
    t = Trainer(cfg, source=FitData(num_samples=4))
    t.setup()
    before = t.validation_loss(cfg.train.stages[0])
    res = t.run()
    after = json_lines(cfg.run_dir / "metrics.jsonl", "val_loss")[-1]
    assert t.state.val_history == [[30, after]]  # what loss.png draws beside the training loss
    assert after < 0.9 * before, (before, after)
    assert training_done(cfg) and res.step == 30
    assert (cfg.run_dir / "loss.png").stat().st_size > 1000
    assert (cfg.run_dir / "config.yaml").exists()


def json_lines(path, key):
    import json

    return [r[key] for r in map(json.loads, path.read_text().splitlines()) if key in r]


def test_resume_matches_uninterrupted_run(tiny_dir, tmp_path):
    # dropout + accumulation + two stages: RNG, data position and LR schedule must all be restored
    extra = ["lora.dropout=0.1", "train.gradient_accumulation=2", "optimizer.scheduler=cosine",
             "optimizer.warmup_steps=2", "train.stages=[{resolution: 64, steps: 4, batch_size: 2}, "
             "{resolution: 96, steps: 3, batch_size: 1, lr_factor: 0.5}]"]
    straight = tiny_cfg(tiny_dir, tmp_path / "a", *extra)
    train(straight, source=SyntheticData())

    resumed = tiny_cfg(tiny_dir, tmp_path / "b", *extra)
    t = Trainer(resumed, source=SyntheticData())
    t.on_step = lambda tr, step: tr.request_stop() if step == 5 else None
    first = t.run()
    assert first.interrupted and first.step == 5
    assert latest_checkpoint(resumed.run_dir).name == "step-000005"
    assert not training_done(resumed)
    second = train(resumed, source=SyntheticData())
    assert second.step == 7 and not second.interrupted

    a, b = adapter(straight.run_dir), adapter(resumed.run_dir)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert [h[0] for h in second.history] == list(range(1, 8))  # history survives the restart


def test_ctrl_c_saves_usable_checkpoint(tiny_dir, tmp_path):
    cfg = tiny_cfg(tiny_dir, tmp_path, "checkpoint.every_steps=0", "checkpoint.keep_last=2")
    t = Trainer(cfg, source=SyntheticData())
    t.on_step = lambda tr, step: os.kill(os.getpid(), signal.SIGINT) if step == 2 else None
    res = t.run()
    assert res.interrupted and res.step == 2
    ckpt = latest_checkpoint(cfg.run_dir)
    assert ckpt is not None and ckpt.name == "step-000002"
    names = {p.name for p in ckpt.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.safetensors", "scheduler.json",
            "rng_0.safetensors", "state.json"} <= names
    assert all(n.endswith((".safetensors", ".json")) for n in names), names  # no pickle
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    res = train(cfg, source=SyntheticData())  # same command again resumes and finishes
    assert res.step == 6 and training_done(cfg)


def test_resume_reads_no_pickle_and_refuses_pickle_checkpoints(tiny_dir, tmp_path, monkeypatch, caplog):
    import logging
    import pickle
    import shutil

    caplog.set_level(logging.INFO)
    cfg = tiny_cfg(tiny_dir, tmp_path, "checkpoint.every_steps=0")
    t = Trainer(cfg, source=SyntheticData())
    t.on_step = lambda tr, step: tr.request_stop() if step == 2 else None
    assert t.run().interrupted
    ckpt = latest_checkpoint(cfg.run_dir)

    def refuse(*a, **k):
        raise AssertionError("resume unpickled something")

    assert not [r for r in caplog.records if r.name.startswith("accelerate")]  # no INFO line per file saved
    with monkeypatch.context() as m:  # the resume itself must not unpickle anything
        m.setattr(torch, "load", refuse)
        m.setattr(pickle, "load", refuse)
        m.setattr(pickle, "loads", refuse)
        t = Trainer(cfg, source=SyntheticData())
        t.setup()
    assert t.state.step == 2

    # an older accelerate checkpoint (optimizer.bin, random_states_0.pkl): refused unless the user opts in
    old = tmp_path / "old" / "checkpoints" / "step-000002"
    shutil.copytree(ckpt, old)
    for name in ("optimizer.safetensors", "rng_0.safetensors"):
        (old / name).unlink()
    (old / "optimizer.bin").write_bytes(b"not read")
    (old / "random_states_0.pkl").write_bytes(b"not read")
    legacy = tiny_cfg(tiny_dir, tmp_path / "new", f"checkpoint.resume={old}")
    with pytest.raises(Exception, match="pickle format.*checkpoint.allow_pickle=true"):
        Trainer(legacy, source=SyntheticData()).setup()


def _write_accelerate_checkpoint(tr, path):
    """What checkpoints were before the pickle-free format: accelerate's save_state (optimizer.bin, scheduler.bin,
    random_states_0.pkl, custom_checkpoint_0.pkl for the TrainState) with the adapter saved by a hook."""
    import json

    from krea2_train.train import lora as lora_mod

    def hook(models, weights, output_dir):
        lora_mod.save_adapter(tr.transformer, tr.peft_config, output_dir)
        weights.clear()

    handle = tr.acc.register_save_state_pre_hook(hook)
    tr.acc._custom_objects[:] = [tr.state]
    try:
        tr.acc.save_state(str(path))
    finally:
        handle.remove()
        tr.acc._custom_objects.clear()
    position = {"step": tr.state.step, "nan_streak": 0, "skipped_steps": 0}
    (path / "state.json").write_text(json.dumps({"step": tr.state.step, "num_processes": 1, "position": position,
                                                 "trained_with": tr.settings}))


def test_pickle_checkpoint_resumes_only_when_allowed_and_bit_identically(tiny_dir, tmp_path):
    extra = ["checkpoint.every_steps=0", "lora.dropout=0.1", "optimizer.warmup_steps=2"]
    straight = tiny_cfg(tiny_dir, tmp_path / "a", *extra)
    train(straight, source=SyntheticData())

    cfg = tiny_cfg(tiny_dir, tmp_path / "b", *extra)

    def stop_hard(tr, step):  # an old checkpoint at step 3, then the process dies (no checkpoint of ours)
        if step == 3:
            _write_accelerate_checkpoint(tr, cfg.run_dir / "checkpoints" / "step-000003")
            raise RuntimeError("killed")

    t = Trainer(cfg, source=SyntheticData())
    t.on_step = stop_hard
    with pytest.raises(RuntimeError, match="killed"):
        t.run()
    assert (latest_checkpoint(cfg.run_dir) / "random_states_0.pkl").exists()
    with pytest.raises(Exception, match="checkpoint.allow_pickle=true"):
        train(cfg, source=SyntheticData())
    allowed = tiny_cfg(tiny_dir, tmp_path / "b", *extra, "checkpoint.allow_pickle=true")
    assert train(allowed, source=SyntheticData()).step == 6
    a, b = adapter(straight.run_dir), adapter(allowed.run_dir)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_killed_run_resumes_with_one_line_per_step(tiny_dir, tmp_path):
    """A kill -9 at step 5 (checkpoint at 3): the resumed run repeats 4 and 5; metrics.jsonl and TensorBoard keep
    one value per step, not both copies."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_cfg(tiny_dir, tmp_path, "logging.tensorboard=true")

    def die(tr, step):
        if step == 5:
            raise RuntimeError("killed")  # like kill -9: no checkpoint saved, rows 4 and 5 already logged

    t = Trainer(cfg, source=SyntheticData())
    t.on_step = die
    with pytest.raises(RuntimeError):
        t.run()
    for tracker in t.acc.trackers:
        tracker.finish()
    assert json_lines(cfg.run_dir / "metrics.jsonl", "step")[-1] == 5
    train(cfg, source=SyntheticData())
    import json

    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    logs = cfg.run_dir / "logs" / cfg.logging.wandb_project  # both runs' event files, read as TensorBoard does
    assert len(list(logs.glob("events.out.tfevents.*"))) == 2
    events = EventAccumulator(str(logs))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4, 5, 6]


def test_keep_last_and_resume_never(tiny_dir, tmp_path):
    cfg = tiny_cfg(tiny_dir, tmp_path, "checkpoint.every_steps=1", "checkpoint.keep_last=2")
    train(cfg, source=SyntheticData())
    assert [p.name for p in list_checkpoints(cfg.run_dir)] == ["step-000005", "step-000006"]
    assert not list((cfg.run_dir / "checkpoints").glob(".tmp-*"))
    again = tiny_cfg(tiny_dir, tmp_path, "checkpoint.resume=never")
    with pytest.raises(Exception, match="checkpoint.resume=never"):
        train(again, source=SyntheticData())


def test_nan_loss_is_skipped(tiny_dir, tmp_path):
    cfg = tiny_cfg(tiny_dir, tmp_path, "checkpoint.every_steps=0")
    res = train(cfg, source=SyntheticData(nan_at={2}))  # one poisoned micro-batch: step 3 skipped
    assert [h[0] for h in res.history] == [1, 2, 4, 5, 6]
    assert all(torch.isfinite(v).all() for v in adapter(cfg.run_dir).values())


def test_repeated_nan_stops_with_checkpoint(tiny_dir, tmp_path):
    cfg = tiny_cfg(tiny_dir, tmp_path, "checkpoint.every_steps=0", "train.nan_patience=2")
    with pytest.raises(NonFiniteLossError, match="NaN/inf for 2 steps in a row"):
        train(cfg, source=SyntheticData(nan_at={1, 2, 3}))
    ckpt = latest_checkpoint(cfg.run_dir)
    assert ckpt is not None
    weights = load_file(str(ckpt / "adapter_model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_resume_from_named_checkpoint(tiny_dir, tmp_path):
    cfg = tiny_cfg(tiny_dir, tmp_path, "checkpoint.every_steps=2", "checkpoint.keep_last=5")
    train(cfg, source=SyntheticData())
    named = cfg.run_dir / "checkpoints" / "step-000002"
    again = tiny_cfg(tiny_dir, tmp_path, f"checkpoint.resume={named}", "run_name=branch")
    t = Trainer(again, source=SyntheticData())
    t.setup()
    assert t.state.step == 2 and len(t.state.history) == 2
    bad = tiny_cfg(tiny_dir, tmp_path, f"checkpoint.resume={tmp_path}/nope", "run_name=bad")
    with pytest.raises(Exception, match="not a complete checkpoint"):
        Trainer(bad, source=SyntheticData()).setup()


@pytest.mark.parametrize("memory", [["memory.quantize=nf4"], ["memory.preset=24gb"], ["memory.preset=16gb"]])
def test_memory_options_train_through_the_trainer(tiny_dir, tmp_path, memory):
    cfg = tiny_cfg(tiny_dir, tmp_path, "model.dtype=bfloat16", "train.mixed_precision=bf16",
                   "train.stages=[{resolution: 64, steps: 2, batch_size: 1}]", "checkpoint.every_steps=0", *memory)
    t = Trainer(cfg, source=SyntheticData())
    res = t.run()
    assert res.step == 2 and len(res.history) == 2
    if "preset" in memory[0]:  # the 24/16 GB presets keep optimiser states in 8 bits
        assert type(t.optimizer.optimizer).__name__ == "AdamW8bit"
    weights = adapter(cfg.run_dir)
    assert weights and all(torch.isfinite(v).all() and v.dtype == torch.float32 for v in weights.values())


def test_non_finite_gradient_is_skipped(tiny_dir, tmp_path):
    cfg = tiny_cfg(tiny_dir, tmp_path, "checkpoint.every_steps=0")
    t = Trainer(cfg, source=SyntheticData())
    t.setup()
    real = t.acc.clip_grad_norm_
    calls = []

    def flaky(params, max_norm):
        calls.append(1)
        norm = real(params, max_norm)
        return torch.tensor(float("inf")) if len(calls) == 2 else norm

    t.acc.clip_grad_norm_ = flaky
    res = t.run()
    assert [h[0] for h in res.history] == [1, 3, 4, 5, 6] and t.state.skipped_steps == 1
    assert all(torch.isfinite(v).all() for v in adapter(cfg.run_dir).values())


def test_finished_run_with_other_settings_is_refused(tiny_dir, tmp_path):
    from krea2_train.errors import UserError

    cfg = tiny_cfg(tiny_dir, tmp_path, "checkpoint.every_steps=0")
    train(cfg, source=SyntheticData())
    assert training_done(cfg)
    assert training_done(tiny_cfg(tiny_dir, tmp_path, "logging.progress=tqdm"))  # not a training setting
    assert not training_done(tiny_cfg(tiny_dir, tmp_path, "train.stages.0.steps=8"))  # more steps: continue
    with pytest.raises(UserError, match=r"different settings \(lora.rank, optimizer.lr\)"):
        training_done(tiny_cfg(tiny_dir, tmp_path, "lora.rank=8", "optimizer.lr=1e-3"))


def test_resume_with_other_settings_is_refused_before_loading(tiny_dir, tmp_path):
    import json

    from krea2_train.errors import UserError

    cfg = tiny_cfg(tiny_dir, tmp_path, "checkpoint.every_steps=0")
    t = Trainer(cfg, source=SyntheticData())
    t.on_step = lambda tr, step: tr.request_stop() if step == 2 else None
    assert t.run().interrupted
    saved = json.loads((latest_checkpoint(cfg.run_dir) / "state.json").read_text())
    assert saved["trained_with"]["lora"]["rank"] == 4
    # a rank change used to be a PyTorch size-mismatch traceback, an lr change resumed silently
    with pytest.raises(UserError, match=r"different settings \(lora.rank\).*new run_name"):
        Trainer(tiny_cfg(tiny_dir, tmp_path, "checkpoint.every_steps=0", "lora.rank=16"), source=SyntheticData())
    with pytest.raises(UserError, match=r"different settings \(optimizer.lr\)"):
        train(tiny_cfg(tiny_dir, tmp_path, "checkpoint.every_steps=0", "optimizer.lr=1e-3"), source=SyntheticData())
    # more steps, or a setting that is not a training setting, continue it
    res = train(tiny_cfg(tiny_dir, tmp_path, "checkpoint.every_steps=0", "logging.progress=tqdm"),
                source=SyntheticData())
    assert res.step == 6 and training_done(cfg)

    # a finished run: the same command is a no-op; other settings fail and leave train_done.json alone
    done = cfg.run_dir / "train_done.json"
    before = (done.read_text(), done.stat().st_mtime_ns, [p.name for p in list_checkpoints(cfg.run_dir)])
    again = train(tiny_cfg(tiny_dir, tmp_path, "checkpoint.every_steps=0"), source=SyntheticData())
    assert again.step == 6 and not again.interrupted
    with pytest.raises(UserError, match=r"different settings \(optimizer.lr\).*new run_name"):
        train(tiny_cfg(tiny_dir, tmp_path, "checkpoint.every_steps=0", "optimizer.lr=1e-3"), source=SyntheticData())
    assert (done.read_text(), done.stat().st_mtime_ns, [p.name for p in list_checkpoints(cfg.run_dir)]) == before


def test_logged_lr_is_the_one_the_step_used(tiny_dir, tmp_path):
    import json

    cfg = tiny_cfg(tiny_dir, tmp_path, "checkpoint.every_steps=0", "optimizer.scheduler=linear",
                   "optimizer.warmup_steps=3")
    t = Trainer(cfg, source=SyntheticData())
    t.setup()
    used, step = [], t.optimizer.step

    def spy(*a, **k):
        used.append(t.optimizer.param_groups[0]["lr"])
        return step(*a, **k)

    t.optimizer.step = spy
    t.run()
    logged = [r["lr"] for r in map(json.loads, (cfg.run_dir / "metrics.jsonl").read_text().splitlines()) if "lr" in r]
    assert len(used) == 6 and len(set(used)) > 2  # warm-up then decay: the value changes every step
    assert logged == pytest.approx(used)


def test_checkpoint_is_saved_before_a_failing_preview(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("krea2_train.train.preview.prompt_embeddings", lambda cfg: None)

    def broken(self, step, tracker=None):
        raise RuntimeError("preview failed")

    monkeypatch.setattr(Trainer, "preview", broken)
    cfg = tiny_cfg(tiny_dir, tmp_path, "checkpoint.every_steps=2", "preview.every_steps=2", "preview.prompts=[a]",
                   "preview.turbo=false")
    with pytest.raises(RuntimeError, match="preview failed"):
        train(cfg, source=SyntheticData())
    assert latest_checkpoint(cfg.run_dir).name == "step-000002"  # the progress survives the preview failure


def test_preview_model_paths_fail_before_training(tiny_dir, tmp_path):
    from krea2_train.models.loading import ModelLoadError

    cfg = tiny_cfg(tiny_dir, tmp_path, "preview.every_steps=100", "preview.prompts=[a]",
                   f"model.turbo={tmp_path}/missing_turbo.safetensors")
    with pytest.raises(ModelLoadError, match="`model.turbo`"):
        train(cfg, source=SyntheticData())
    assert not list_checkpoints(cfg.run_dir)


def test_interrupt_right_after_a_periodic_save_does_not_save_again(tiny_dir, tmp_path):
    cfg = tiny_cfg(tiny_dir, tmp_path, "checkpoint.every_steps=2")
    t = Trainer(cfg, source=SyntheticData())
    t.setup()
    saves, real = [], t.ckpt._write
    t.ckpt._write = lambda *a, **k: (saves.append(t.state.step), real(*a, **k))[1]
    t.on_step = lambda tr, step: tr.request_stop() if step == 2 else None
    res = t.run()
    assert res.interrupted and res.step == 2 and saves == [2]
    assert [p.name for p in list_checkpoints(cfg.run_dir)] == ["step-000002"]
    assert train(cfg, source=SyntheticData()).step == 6  # and it resumes from it


def test_validation_noise_is_fixed_per_image_not_per_batch(tiny_dir, tmp_path):
    """The same held-out images give the same validation loss however they are batched (curves stay comparable)."""

    class Batched(SyntheticData):
        batch = 1

        def validation_batches(self, stage):
            lat, text = self._samples(stage.resolution)
            out = []
            for i in range(0, len(text), self.batch):
                b = self.collate(lat[i : i + self.batch], text[i : i + self.batch])
                b["sample_seeds"] = torch.arange(i, i + len(text[i : i + self.batch]))
                out.append(b)
            return out

    cfg = tiny_cfg(tiny_dir, tmp_path)
    t = Trainer(cfg, source=Batched(num_samples=4))
    t.setup()
    one = t.validation_loss(cfg.train.stages[0])
    t.source.batch = 2
    two = t.validation_loss(cfg.train.stages[0])
    assert one == pytest.approx(two, rel=1e-5)


def test_preset_optimiser_switch_is_recorded_not_written_into_the_config(tiny_dir, tmp_path):
    """memory.optimizer_8bit (what the 24gb/16gb presets set) runs 8-bit AdamW; the config the user wrote stays as it
    is (config.yaml says adamw) and RUN/runtime.json records what ran, so a resume compares like with like."""
    import json

    import bitsandbytes as bnb

    cfg = tiny_cfg(tiny_dir, tmp_path, "memory.optimizer_8bit=true", "train.stages=[{resolution: 64, steps: 2, batch_size: 1}]")
    t = Trainer(cfg, source=SyntheticData(num_samples=2))
    t.run()
    assert cfg.optimizer.name == "adamw"
    assert isinstance(t.optimizer.optimizer if hasattr(t.optimizer, "optimizer") else t.optimizer, bnb.optim.AdamW8bit)
    assert load_config(cfg.run_dir / "config.yaml").optimizer.name == "adamw"
    runtime = json.loads((cfg.run_dir / "runtime.json").read_text())
    assert runtime["optimizer"] == "adamw8bit" and runtime["memory"]["optimizer_8bit"] is True
    assert runtime["strategy"] == "single" and runtime["memory"]["quantize"] == "none"
    # the same command again: a finished run with the same settings, nothing retrained
    assert Trainer(cfg, source=SyntheticData(num_samples=2)).run().step == 2


@pytest.mark.parametrize("fmt, preset", [("float8_e4m3fn", ["memory.preset=16gb", "memory.quantize=none"]),
                                         ("int8_convrot", ["memory.preset=24gb"])])
def test_train_from_comfyui_quantised_raw(tiny_dir, tmp_path, fmt, preset):
    """A ComfyUI fp8_scaled / int8_convrot Raw file as the training base: its block Linear layers stay 1 byte
    (QuantLinear over the file's bytes, ConvRot applied per matmul) under the 24gb preset and under 16gb's block
    offload (nf4 off: bitsandbytes' CPU path is not what is tested here); the LoRA trains and the loss is finite."""
    from _comfy_quant import quantize_file
    from safetensors.torch import save_file

    from krea2_train.runtime.memory import QuantLinear

    state, header = quantize_file(load_file(tiny_dir / "transformer_raw.safetensors"), fmt, groupsize=64)
    base = tmp_path / f"krea2_raw_{fmt}.safetensors"
    save_file(state, base, metadata=header or None)
    cfg = tiny_cfg(tiny_dir, tmp_path / "run", f"model.transformer={base}", "checkpoint.every_steps=0",
                   "train.stages=[{resolution: 64, steps: 4, batch_size: 2}]", *preset)
    t = Trainer(cfg, source=SyntheticData())
    t.setup()
    layers = [m for m in t.transformer.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 16 and all(m.weight.element_size() == 1 for m in layers)
    assert {m.rotation for m in layers} == ({64} if fmt == "int8_convrot" else {0})
    res = t.run()
    assert res.step == 4 and all(math.isfinite(h[1]) for h in res.history)
    trained = adapter(cfg.run_dir)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in trained.items())
