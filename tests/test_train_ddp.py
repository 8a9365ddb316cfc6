"""Two-process CPU data parallel (gloo) through `accelerate launch` with the shipped config, on cached demo images:
both processes train and end with the same adapter, which differs from the initial one, and the checkpoint holds one
RNG state per process."""

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
    from krea2_train.train.lora import adapter_state_dict
    tiny, out, data = sys.argv[1], sys.argv[2], sys.argv[3]
    from krea2_train.cli import setup_logging
    setup_logging()  # what `krea2-train` does: only the main process logs
    cfg = load_config(None, [
        f"model.transformer={tiny}/transformer_raw.safetensors", f"model.text_encoder={tiny}/text_encoder",
        f"model.vae={tiny}/vae", "model.dtype=float32", "train.mixed_precision=no",
        "train.stages=[{resolution: 128, steps: 4, batch_size: 1}]", "optimizer.lr=2e-3", f"output_dir={out}",
        "run_name=ddp", "checkpoint.every_steps=2", "logging.progress=none", "logging.tensorboard=false",
        "lora.rank=4", "lora.dropout=0.1", f"cache_dir={out}/cache", "data.num_workers=0",
        "train.gradient_accumulation=2",
        f"data.datasets=[{{path: {data}, trigger_word: k2demo}}]"])
    # the order `krea2-train CONFIG` uses: process state first, then data checks and caching split across ranks
    pipeline.init_distributed()
    manifest = pipeline.cache(cfg, pipeline.check_data(cfg))
    t = Trainer(cfg)
    t.source = CachedData(cfg, t.acc, manifest=manifest)
    res = t.run()
    rank = t.acc.process_index
    assert t.acc.num_processes == 2, t.acc.num_processes
    torch.save(adapter_state_dict(t.transformer), f"{out}/adapter_rank{rank}.pt")
    # one file per rank: the two processes' stdout lines interleave
    open(f"{out}/result_rank{rank}.txt", "w").write(f"STEP {res.step} DISTRIBUTED {t.acc.distributed_type}")
''')


@pytest.mark.slow
def test_two_process_ddp_same_adapter(tiny_dir, tmp_path, demo_images):
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    data = demo_images
    accelerate = Path(sys.executable).parent / "accelerate"
    config = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "cpu_ddp.yaml"  # the shipped one
    cmd = [str(accelerate), "launch", "--config_file", str(config), "--main_process_port", "29513",
           str(script), str(tiny_dir), str(tmp_path), str(data)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # one copy of each message, with the global batch (1 per process x 2 processes x 2 accumulated = 4)
    assert proc.stderr.count("stage 0: 128 px") == 1, proc.stderr[-3000:]
    assert "batch 4 (1 per process x 2 processes x 2 accumulated)" in proc.stderr
    assert proc.stderr.count("LoRA: ") == 1 and "Saving current state" not in proc.stderr
    for rank in (0, 1):
        result = (tmp_path / f"result_rank{rank}.txt").read_text()
        assert result.startswith("STEP 4 ") and "MULTI_CPU" in result, result
    a = torch.load(tmp_path / "adapter_rank0.pt")
    b = torch.load(tmp_path / "adapter_rank1.pt")
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)  # B starts at zero: it trained
    ckpt = tmp_path / "ddp" / "checkpoints" / "step-000004"
    assert (ckpt / "rng_0.safetensors").exists() and (ckpt / "rng_1.safetensors").exists()
    assert all(f.name.endswith((".safetensors", ".json")) for f in ckpt.rglob("*") if f.is_file())  # no pickle
