"""A concept slider under two-process CPU data parallel (gloo, `accelerate launch`): both signs' backward passes
per micro-batch (the first without gradient sync) and gradient accumulation end with the same adapter on both
processes, one that differs from the initial one."""

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
    from krea2_train.train.trainer import Trainer
    from krea2_train.train.lora import adapter_state_dict
    tiny, out = sys.argv[1], sys.argv[2]
    cfg = load_config(None, [
        f"model.transformer={tiny}/transformer_raw.safetensors", f"model.text_encoder={tiny}/text_encoder",
        f"model.vae={tiny}/vae", "model.dtype=float32", "train.mixed_precision=no", "train.mode=slider",
        "train.sliders=[{target: a cat, positive: a big cat, negative: a small cat, anchors: [a dog]}]",
        "train.stages=[{resolution: 64, steps: 3, batch_size: 1}]", "optimizer.lr=2e-3", f"output_dir={out}",
        "run_name=ddp", "checkpoint.every_steps=0", "logging.progress=none", "logging.tensorboard=false",
        "lora.rank=4", f"cache_dir={out}/cache", "train.gradient_accumulation=2", "export.formats=[]"])
    pipeline.init_distributed()
    t = Trainer(cfg)
    res = t.run()
    assert t.acc.num_processes == 2, t.acc.num_processes
    torch.save(adapter_state_dict(t.transformer), f"{out}/adapter_rank{t.acc.process_index}.pt")
''')


@pytest.mark.slow
def test_two_process_ddp_slider_same_adapter(tiny_dir, tmp_path):
    script = tmp_path / "ddp_slider.py"
    script.write_text(SCRIPT)
    accelerate = Path(sys.executable).parent / "accelerate"
    config = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "cpu_ddp.yaml"
    cmd = [str(accelerate), "launch", "--config_file", str(config), "--main_process_port", "29517",
           str(script), str(tiny_dir), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a = torch.load(tmp_path / "adapter_rank0.pt")
    b = torch.load(tmp_path / "adapter_rank1.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(float(v.abs().sum()) > 0 for k, v in a.items() if "lora_B" in k)  # trained (B starts at zero)
