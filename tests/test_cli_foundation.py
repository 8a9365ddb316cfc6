"""`make-tiny` and `sample` from the command line, and how user errors reach the terminal."""

import numpy as np
import torch
from PIL import Image

from krea2_train.cli import main


def test_sample_writes_pngs(tiny_dir, tmp_path, capsys):
    out = tmp_path / "samples"
    code = main(["sample", "--models", str(tiny_dir), "--prompt", "a red circle", "--prompt", "teal stripes",
                 "--height", "64", "--width", "96", "--seed", "3", "--dtype", "float32", "--out", str(out)])
    assert code == 0
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["a-red-circle_seed3.png", "teal-stripes_seed3.png"]  # prompt + seed
    assert Image.open(files[0]).size == (96, 64)
    # same seed, same image (alone instead of in a batch of two: only float rounding may differ)
    main(["sample", "--models", str(tiny_dir), "--prompt", "a red circle", "--height", "64", "--width", "96",
          "--seed", "3", "--dtype", "float32", "--out", str(tmp_path / "again")])
    a = np.asarray(Image.open(tmp_path / "again" / "a-red-circle_seed3.png"), dtype=np.int16)
    b = np.asarray(Image.open(files[0]), dtype=np.int16)
    assert np.abs(a - b).max() <= 2  # the second prompt: test_sample_names_the_picture_a_prompt_and_seed_give_alone


def test_user_error_is_one_line(tmp_path, capsys):
    code = main(["sample", "--transformer", str(tmp_path / "missing.safetensors"), "--text-encoder", str(tmp_path),
                 "--vae", str(tmp_path), "--prompt", "x"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: Krea 2 transformer not found") and "Traceback" not in err


def test_make_tiny_is_idempotent(tmp_path, capsys):
    assert main(["make-tiny", str(tmp_path / "t")]) == 0
    from safetensors.torch import load_file

    first = load_file(tmp_path / "t" / "transformer_raw.safetensors")
    assert main(["make-tiny", str(tmp_path / "t"), "--overwrite"]) == 0
    again = load_file(tmp_path / "t" / "transformer_raw.safetensors")
    assert set(first) == set(again) and all(torch.equal(first[k], again[k]) for k in first)  # fixed seed


def test_sample_applies_every_lora(tiny_dir, tmp_path):
    """Two LoRAs (same file name in different folders) are both active; a zero LoRA leaves the image unchanged."""
    from peft import LoraConfig

    from krea2_train.lora.formats import TrainedAdapter
    from krea2_train.lora.writers import write_lora_file
    from krea2_train.models.loading import load_transformer

    model = load_transformer(tiny_dir / "transformer_turbo.safetensors", dtype="float32")
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v", "to_out.0", "ff.up", "ff.down"]))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(2.0 * torch.randn(p.shape, generator=gen))
    active = TrainedAdapter.from_model(model)
    zero = TrainedAdapter(active.down, {k: torch.zeros_like(v) for k, v in active.up.items()}, active.alpha)
    for folder, adapter in (("a", active), ("b", zero)):
        write_lora_file(adapter, tmp_path / folder / "pytorch_lora_weights.safetensors", "diffusers", dtype="float32")

    def sample(*loras, out):
        args = ["sample", "--models", str(tiny_dir), "--prompt", "a red circle", "--height", "64", "--width", "64",
                "--dtype", "float32", "--out", str(tmp_path / out)]
        for lora in loras:
            args += ["--lora", str(tmp_path / lora / "pytorch_lora_weights.safetensors")]
        assert main(args) == 0
        (png,) = (tmp_path / out).glob("a-red-circle_seed0*.png")  # the name carries each LoRA and its strength
        assert png.name == "a-red-circle_seed0" + "".join("_pytorch_lora_weights@1" for _ in loras) + ".png"
        return np.asarray(Image.open(png), dtype=np.int16)

    base, with_a, with_both = sample(out="base"), sample("a", out="a"), sample("a", "b", out="ab")
    assert np.abs(with_a - base).mean() > 1  # the LoRA acts
    assert np.abs(with_both - with_a).max() <= 1  # the zero LoRA changes nothing, and A is still active

    # a strength sweep of one LoRA: one labelled grid, a column per strength; strength 0 is the base image
    sweep = ["sample", "--models", str(tiny_dir), "--prompt", "a red circle", "--height", "64", "--width", "64",
             "--dtype", "float32", "--out", str(tmp_path / "sweep"), "--lora", str(tmp_path / "a" /
             "pytorch_lora_weights.safetensors"), "--strengths", "0,1"]
    assert main(sweep) == 0 and main(sweep) == 0  # twice: the second grid does not overwrite the first
    grids = sorted((tmp_path / "sweep").glob("sweep_*.png"))
    assert [g.name for g in grids] == ["sweep_pytorch_lora_weights_seed0-2.png", "sweep_pytorch_lora_weights_seed0.png"]
    grid = Image.open(grids[1])
    assert grid.width == 2 * 192  # two columns, 64 px enlarged to the grid's minimum cell
    assert main(["sample", "--models", str(tiny_dir), "--prompt", "x", "--strengths", "0,1"]) == 2  # no --lora


def test_sample_size_error(tiny_dir, tmp_path, capsys):
    code = main(["sample", "--models", str(tiny_dir), "--prompt", "x", "--width", "120", "--height", "64",
                 "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "multiples of 16" in err and "try 64x128" in err


def test_sample_names_the_picture_a_prompt_and_seed_give_alone(tiny_dir, tmp_path):
    """Several --prompt in one call: each file is the picture its prompt gives alone at that seed (the name says
    prompt + seed, and previews and the transfer grid draw it so), not a slice of one batched noise draw."""
    common = ["sample", "--models", str(tiny_dir), "--height", "64", "--width", "64", "--steps", "2",
              "--dtype", "float32"]
    assert main([*common, "--prompt", "a red circle", "--prompt", "a blue square", "--out", str(tmp_path / "two")]) == 0
    assert main([*common, "--prompt", "a blue square", "--out", str(tmp_path / "one")]) == 0
    (both,), (alone,) = (tmp_path / "two").glob("a-blue-square_*.png"), (tmp_path / "one").glob("*.png")
    assert both.name == alone.name
    a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (both, alone))
    assert np.abs(a - b).max() <= 1


def test_sample_uses_a_runs_suggested_turbo_strength(tiny_dir, tmp_path, capsys):
    """`sample --lora RUN` on Turbo applies the strength RUN/export/transfer_report.json suggests (the same picture
    as --strength with that value) and says so; --strength wins; off Turbo, or with a report older than the
    adapter, it is 1.0. The settings used are printed."""
    import json
    import os
    from types import SimpleNamespace

    from test_export_helpers import trained_adapter

    from krea2_train.cli.sample import _strengths
    from krea2_train.lora.writers import write_lora_file

    run = tmp_path / "runs" / "mystyle"
    lora = write_lora_file(trained_adapter(tiny_dir, r=4, alpha=4), run / "export" / "mystyle.safetensors",
                           "comfyui", dtype="float32")
    report = run / "export" / "transfer_report.json"
    report.write_text(json.dumps({"suggested_turbo_strength": 0.35}))
    common = ["sample", "--models", str(tiny_dir), "--prompt", "a red circle", "--height", "64", "--width", "64",
              "--steps", "2", "--dtype", "float32"]

    def one(out, *extra):
        assert main([*common, "--out", str(tmp_path / out), *extra]) == 0
        (png,) = (tmp_path / out).glob("*.png")
        return png, np.asarray(Image.open(png), dtype=np.int16), capsys.readouterr().out

    png, suggested, said = one("run", "--lora", str(run))
    assert png.name == "a-red-circle_seed0_mystyle@0.35.png"
    assert f"at 0.35 (the suggested Turbo strength from {report}" in said
    assert "2 steps, guidance 0" in said and "64x64 px, seed 0" in said and str(tmp_path / "run") in said
    _, given, _ = one("given", "--lora", str(lora), "--strength", "0.35")
    _, full, said = one("full", "--lora", str(run), "--strength", "1")
    assert np.abs(suggested - given).max() <= 1 and np.abs(suggested - full).mean() > 1
    assert "at 1 (--strength)" in said

    args = SimpleNamespace(strength=[], lora=[str(run)])
    assert _strengths(args, [lora], on_turbo=True)[0] == [0.35]
    assert _strengths(args, [lora], on_turbo=False)[0] == [1.0]  # on Raw: the LoRA's training base
    adapter = run / "adapter" / "adapter_model.safetensors"
    adapter.parent.mkdir()
    adapter.write_bytes(b"")
    later = report.stat().st_mtime + 10
    os.utime(adapter, (later, later))  # trained again after the report: its strength is for the old weights
    assert _strengths(args, [lora], on_turbo=True)[0] == [1.0]
    assert "is older than" in capsys.readouterr().err
