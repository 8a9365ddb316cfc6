"""Two-process FSDP (torch `fully_shard` on a CPU mesh, gloo) through `accelerate launch` with the shipped CPU
config and `train.fsdp=true`, on cached demo images. One launch trains three runs of the same settings:

    ddp       the DDP reference (fp32; ddp_bf16 / fsdp_bf16: the same pair in bf16 with autocast)
    fsdp      FSDP straight through, with a Raw + Turbo preview at step 2 (Turbo swapped into the shards and back)
    resumed   FSDP stopped at step 3 (as Ctrl-C does), then resumed by a new Trainer from the checkpoint (and
              ddp_resumed the same under DDP; each refuses to resume the other way with a clear error)

FSDP must learn what DDP learns (same data, noise and dropout; only the gradient reduction differs), the resumed run
must end exactly where the straight one did (so the sharded optimiser checkpoint and the preview's weight swap are
both exact), and the adapter files must be the ordinary PEFT layout."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

SCRIPT = textwrap.dedent('''
    import sys, torch
    from krea2_train.config import load_config
    from krea2_train import pipeline
    from krea2_train.data.source import CachedData
    from krea2_train.train.trainer import Trainer
    tiny, out, data = sys.argv[1], sys.argv[2], sys.argv[3]
    base = [
        f"model.transformer={tiny}/transformer_raw.safetensors", f"model.turbo={tiny}/transformer_turbo.safetensors",
        f"model.text_encoder={tiny}/text_encoder", f"model.vae={tiny}/vae", "model.dtype=float32",
        "train.mixed_precision=no", "train.stages=[{resolution: 128, steps: 4, batch_size: 1}]", "optimizer.lr=2e-3",
        f"output_dir={out}", "checkpoint.every_steps=2", "logging.progress=none", "logging.tensorboard=false",
        "lora.rank=4", "lora.dropout=0.1", f"cache_dir={out}/cache", "data.num_workers=0",
        "train.gradient_accumulation=2", "memory.gradient_checkpointing=true",
        f"data.datasets=[{{path: {data}, trigger_word: k2demo}}]"]
    preview = ["preview.every_steps=2", "preview.prompts=[a red square]", "preview.resolution=64",
               "preview.raw_steps=2", "preview.turbo_steps=2", "preview.turbo=true"]
    pipeline.init_distributed()
    manifest = None

    def trainer(*extra):
        global manifest
        cfg = load_config(None, base + list(extra))
        if manifest is None:
            manifest = pipeline.cache(cfg, pipeline.check_data(cfg))
        t = Trainer(cfg)
        t.source = CachedData(cfg, t.acc, manifest=manifest)
        return t

    def check_turbo_swap(t):
        """The preview's Raw -> Turbo swap on the sharded model: the next forward is Turbo + LoRA, then Raw again."""
        sys.path.insert(0, tests_dir)
        from _speed_helpers import inputs
        from peft import set_peft_model_state_dict
        from krea2_train.models.loading import load_transformer
        from krea2_train.runtime.swap import copy_base_weights
        from krea2_train.train.lora import adapter_state_dict
        m, raw_file, turbo_file = t.transformer, t.cfg.model.transformer, t.cfg.model.turbo
        m.eval()
        batch = inputs(batch=1, lengths=(10,))
        adapter = adapter_state_dict(m)
        with torch.no_grad():
            out_raw = m(**batch, return_dict=False)[0]  # leaves the root's gathered weights behind
            copy_base_weights(m, turbo_file)
            m.state_dict()  # FSDP regathers the root from its shards here: Turbo must be in the shards, too
            out_turbo = m(**batch, return_dict=False)[0]
            copy_base_weights(m, raw_file)
            out_back = m(**batch, return_dict=False)[0]
            ref = load_transformer(turbo_file, dtype="float32", device="cpu")
            ref.add_adapter(t.peft_config)
            set_peft_model_state_dict(ref, adapter)
            ref.eval()
            out_ref = ref(**batch, return_dict=False)[0]
        assert not torch.allclose(out_turbo, out_raw)
        torch.testing.assert_close(out_turbo, out_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out_back, out_raw, rtol=0, atol=0)
        m.train()

    tests_dir, mode = sys.argv[4], sys.argv[5]
    if mode == "launched":  # the shipped fsdp.yaml alone turns sharding on (train.fsdp stays false)
        t = trainer("run_name=launched")
        res = t.run()
        assert res.step == 4, res
        shapes = {type(p).__name__ for p in t.transformer.parameters()}
        open(f"{out}/launched_rank{t.acc.process_index}.txt", "w").write(f"OK {t.acc.num_processes} {sorted(shapes)}")
        sys.exit(0)
    rank = None
    import os
    for name, extra in (("ddp", ["train.fsdp=false"]), ("fsdp", ["train.fsdp=true"] + preview)):
        # fsdp keeps blocks gathered from forward to backward (fsdp_reshard_after_forward: false in an accelerate
        # config), the other FSDP runs reshard: same numbers either way
        os.environ["FSDP_RESHARD_AFTER_FORWARD"] = "false" if name == "fsdp" else "true"
        t = trainer(f"run_name={name}", *extra)
        res = t.run()
        rank = t.acc.process_index
        assert res.step == 4 and not res.interrupted, res
        if name == "fsdp":
            check_turbo_swap(t)
    os.environ.pop("FSDP_RESHARD_AFTER_FORWARD")
    bf16 = ["model.dtype=bfloat16", "train.mixed_precision=bf16", "train.stages=[{resolution: 128, steps: 2, batch_size: 1}]"]
    for name, extra in (("ddp_bf16", ["train.fsdp=false"]), ("fsdp_bf16", ["train.fsdp=true"])):
        assert trainer(f"run_name={name}", *extra, *bf16).run().step == 2

    def stop_at_three(tr, step):
        if step == 3:
            tr.request_stop()

    from krea2_train.errors import UserError
    # the 48gb preset (its compile and q/k/v fusion are skipped under FSDP) with Prodigy, whose state shapes depend
    # on the weights: straight through, and stopped at step 3 then resumed
    prodigy = ["train.fsdp=true", "memory.preset=48gb", "optimizer.name=prodigy", "optimizer.lr=1.0"]
    assert trainer("run_name=prodigy", *prodigy).run().step == 4
    for name, mode, other in (("resumed", "train.fsdp=true", "train.fsdp=false"),
                              ("ddp_resumed", "train.fsdp=false", "train.fsdp=true"),
                              ("prodigy_resumed", " ".join(prodigy), " ".join(["train.fsdp=false"] + prodigy[1:]))):
        t = trainer(f"run_name={name}", *mode.split())
        t.on_step = stop_at_three
        res = t.run()
        assert res.interrupted and res.step == 3, res
        try:  # the other way of splitting the work cannot read this checkpoint: a clear error, nothing trained
            trainer(f"run_name={name}", *other.split()).run()
            raise AssertionError("resumed across DDP/FSDP")
        except UserError as e:
            assert "resume it the way it was trained" in str(e), e
        t2 = trainer(f"run_name={name}", *mode.split())
        res = t2.run()
        assert res.step == 4 and not res.interrupted, res
        if name == "resumed":
            shapes = {type(p).__name__ for p in t2.transformer.parameters()}
            open(f"{out}/result_rank{rank}.txt", "w").write(f"OK {t2.acc.num_processes} {sorted(shapes)}")
''')


@pytest.mark.slow
def test_two_process_fsdp_matches_ddp_and_resumes(tiny_dir, tmp_path, demo_images):
    from safetensors.torch import load_file

    script = tmp_path / "fsdp_train.py"
    script.write_text(SCRIPT)
    data = demo_images
    accelerate = Path(sys.executable).parent / "accelerate"
    configs = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
    args = [str(script), str(tiny_dir), str(tmp_path), str(data), str(Path(__file__).resolve().parent)]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    for launch, mode in ((["--config_file", str(configs / "cpu_ddp.yaml"), "--main_process_port", "29514"], "all"),
                         (["--config_file", str(configs / "fsdp.yaml"), "--num_processes", "2",
                           "--main_process_port", "29515"], "launched")):
        proc = subprocess.run([str(accelerate), "launch", *launch, *args, mode], capture_output=True, text=True,
                              timeout=300, env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        result = (tmp_path / f"result_rank{rank}.txt").read_text()
        assert result.startswith("OK 2 ") and "DTensor" in result, result  # really sharded, on two processes

        launched = (tmp_path / f"launched_rank{rank}.txt").read_text()
        assert launched.startswith("OK 2 ") and "DTensor" in launched, launched

    adapters = {name: load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors"))
                for name in ("ddp", "fsdp", "resumed", "launched", "ddp_resumed", "prodigy", "prodigy_resumed")}
    ddp, fsdp, resumed = adapters["ddp"], adapters["fsdp"], adapters["resumed"]
    assert ddp.keys() == fsdp.keys() == resumed.keys() and ddp
    assert any(float(v.abs().max()) > 0 for k, v in fsdp.items() if "lora_B" in k)  # B starts at zero: it trained
    for k in ddp:
        assert fsdp[k].shape == ddp[k].shape, k  # whole tensors, not one process's shard
        torch.testing.assert_close(fsdp[k], ddp[k], rtol=1e-4, atol=1e-6, msg=k)
        torch.testing.assert_close(resumed[k], fsdp[k], rtol=0, atol=0, msg=k)
        torch.testing.assert_close(adapters["ddp_resumed"][k], ddp[k], rtol=0, atol=0, msg=k)
        torch.testing.assert_close(adapters["prodigy_resumed"][k], adapters["prodigy"][k], rtol=0, atol=0, msg=k)
        torch.testing.assert_close(adapters["launched"][k], fsdp[k], rtol=0, atol=0, msg=k)

    # the real precision (bf16 base, fp32 LoRA, bf16 autocast): FSDP gathers the stored dtypes, so same arithmetic
    a = load_file(str(tmp_path / "ddp_bf16" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "fsdp_bf16" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() == ddp.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-6, msg=k)

    ckpt = tmp_path / "fsdp" / "checkpoints" / "step-000004"
    assert (ckpt / "optimizer_sharded" / "rank_1.safetensors").exists() and not (ckpt / "optimizer.bin").exists()
    assert (ckpt / "rng_0.safetensors").exists() and (ckpt / "rng_1.safetensors").exists()
    assert all(f.name.endswith((".safetensors", ".json")) for f in ckpt.rglob("*") if f.is_file())  # no pickle
    assert load_file(str(ckpt / "adapter_model.safetensors")).keys() == fsdp.keys()
    assert (tmp_path / "fsdp" / "previews" / "step-000002.png").exists()
    info = json.loads((tmp_path / "resumed" / "checkpoints" / "step-000003" / "state.json").read_text())
    assert info["reason"] == "interrupted"


@pytest.mark.parametrize("override, key", [
    ("memory.preset=24gb", "memory.quantize=int8"),
    ("memory.quantize=nf4", "memory.quantize=nf4"),
    ("memory.offload_blocks=true", "memory.offload_blocks"),
    ("optimizer.name=adamw8bit", "optimizer.name=adamw8bit"),
    ("train.mixed_precision=fp16", "train.mixed_precision=fp16"),
])
def test_fsdp_refuses_what_it_cannot_shard(override, key):
    from krea2_train.config import load_config, resolve_memory_settings
    from krea2_train.errors import UserError
    from krea2_train.runtime.sharding import check_fsdp_settings

    cfg = load_config(None, ["model.transformer=x.safetensors", "model.text_encoder=x", "model.vae=x",
                             "train.fsdp=true", override], warn_paths=False)
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        check_fsdp_settings(cfg, resolve_memory_settings(cfg.memory))
    cfg = load_config(None, ["model.transformer=x.safetensors", "model.text_encoder=x", "model.vae=x",
                             "train.fsdp=true", "memory.preset=80gb"], warn_paths=False)
    check_fsdp_settings(cfg, resolve_memory_settings(cfg.memory))  # bf16 presets shard fine


def test_fsdp_with_one_process_says_how_to_launch():
    from krea2_train.errors import UserError
    from krea2_train.runtime.sharding import make_mesh

    with pytest.raises(UserError, match="accelerate launch --config_file configs/accelerate/fsdp.yaml"):
        make_mesh(torch.device("cpu"))


def test_lokr_module_dropout_refused_on_several_processes():
    from krea2_train.config import load_config
    from krea2_train.errors import UserError
    from krea2_train.train.strategy import check_multiprocess_lora

    cfg = load_config(None, ["model.transformer=x.safetensors", "model.text_encoder=x", "model.vae=x",
                             "lora.type=lokr", "lora.dropout=0.1", "export.formats=[]"], warn_paths=False)
    check_multiprocess_lora(cfg, 1)  # one process: fine
    with pytest.raises(UserError, match=r"lora\.dropout: 0"):
        check_multiprocess_lora(cfg, 2)
