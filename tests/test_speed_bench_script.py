"""scripts/bench_step.py runs end to end on CPU with the tiny model (every configuration, 1 step), and its FLOP
count for the full model at 1024 px agrees with the published estimates in FACTS.md."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_step.py"


def test_bench_step_runs_on_cpu_tiny(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    # presets are trained directly in test_memory_paths; here the script itself: one of each kind of path
    configs = "baseline,bf16_ckpt,int8,fp8_mm,nf4_offload,preset_80gb"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--configs", configs, "--steps", "1", "--warmup", "0",
         "--resolution", "64", "--text-tokens", "32", "--caption-tokens", "8", "--rank", "4", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "s/step" in proc.stdout and "baseline" in proc.stdout
    data = json.loads(out.read_text())
    assert data["header"]["model"] == "tiny"
    rows = {r["config"]: r for r in data["rows"]}
    assert set(rows) == set(configs.split(","))
    for r in rows.values():
        assert r["s_per_step"] > 0 and r["loss"] == r["loss"]  # finite timing, loss not NaN
    assert rows["baseline"]["text_tokens_run"] == 32 and rows["bf16_ckpt"]["text_tokens_run"] == 8
    assert rows["int8"]["quantize"] == "int8" and rows["nf4_offload"]["offload"]
    assert rows["baseline"]["checkpointed_blocks"] == 2 and rows["preset_80gb"]["checkpointed_blocks"] == 0


def test_flop_count_matches_published_estimate():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bench_step
    finally:
        sys.path.remove(str(SCRIPT.parent))
    from types import SimpleNamespace

    from krea2_train.models.loading import FULL_ARCHITECTURE

    cfg = SimpleNamespace(**FULL_ARCHITECTURE)
    no_ckpt = bench_step.step_flops(cfg, 128, 4096, 0.0)
    full_ckpt = bench_step.step_flops(cfg, 128, 4096, 1.0)
    assert no_ckpt == pytest.approx(2.5e14, rel=0.1)
    assert full_ckpt == pytest.approx(3.6e14, rel=0.1)
