"""The shipped demo dataset is clean and licensed; `krea2-train cache CONFIG` builds a cache the loader reads."""

from pathlib import Path

import pytest

from krea2_train.config.data import DataConfig, DatasetConfig
from krea2_train.data.checks import scan_data

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_demo_dataset_is_clean_small_and_cc0():
    demo = ROOT / "datasets" / "demo"
    assert "CC0" in (demo / "LICENSE").read_text()
    assert sum(p.stat().st_size for p in demo.iterdir()) < 3_000_000
    scan = scan_data(DataConfig(datasets=[DatasetConfig(path=str(demo), trigger_word="k2demo")]), [128, 256, 512],
                     progress=False)
    assert not scan.problems and len(scan.items) >= 12
    assert all(i.caption.startswith("k2demo, ") for i in scan.items)
    assert len({tuple(i.placements[512].bucket) for i in scan.items}) >= 3  # several aspect buckets


def test_demo_generator_is_deterministic(tmp_path):
    import subprocess
    import sys

    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_demo_dataset.py"), "--out", str(tmp_path),
                    "--count", "3"], check=True, capture_output=True)
    for name in ("poster_00.png", "poster_02.txt"):
        assert (tmp_path / name).read_bytes() == (ROOT / "datasets" / "demo" / name).read_bytes()


def test_cache_cli(tmp_path, tiny_dir, capsys):
    from PIL import Image

    from krea2_train.cli import main
    from krea2_train.data.cache import Manifest
    from krea2_train.data.loader import make_loader

    ds = tmp_path / "ds"
    ds.mkdir()
    for k in range(3):
        Image.new("RGB", (80, 64), (50 * k, 0, 0)).save(ds / f"{k}.png")
        (ds / f"{k}.txt").write_text(f"red {k}")
    (ds / "bad.png").write_bytes(b"nope")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""
model: {{transformer: {tiny_dir}/transformer_raw.safetensors, text_encoder: {tiny_dir}/text_encoder,
        vae: {tiny_dir}/vae, architecture: tiny}}
data:
  datasets: [{{path: {ds}, trigger_word: zkw}}]
train:
  stages: [{{resolution: 64, steps: 1, batch_size: 2}}]
cache_dir: {tmp_path / 'cache'}
""")
    assert main(["cache", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "cache ready: 3 images" in out and "1 skipped" in out
    m = Manifest.load(tmp_path / "cache" / "manifest.json")
    batch = next(iter(make_loader(m, 64, 2, seed=0, num_steps=1, num_workers=0, process_index=0, num_processes=1)))
    assert batch["latents"].shape == (2, 16, 8, 8)  # 80x64 -> the 64x64 bucket (nearest aspect)
    # A missing dataset folder is a clear error, not a traceback.
    assert main(["cache", str(cfg), f"data.datasets.0.path={tmp_path / 'gone'}"]) == 2
    assert "does not exist" in capsys.readouterr().out


def test_cache_cli_bad_model_path_fails_before_work(tmp_path, capsys):
    from krea2_train.cli import main

    code = main(["cache", str(ROOT / "configs" / "demo.yaml"), f"cache_dir={tmp_path / 'cache'}",
                 f"make_tiny={tmp_path / 'tiny'}", "model.vae=/nope/vae"])
    err = capsys.readouterr().err
    assert code == 2 and "config key `model.vae`" in err and "/nope/vae" in err
    assert not (tmp_path / "cache").exists()  # nothing cached
