"""Edit LoRAs end to end on the tiny model: a reference/ folder beside the images, check-data's per-file reports,
cached reference latents, and training with the references in context (data.reference, train.reference_method)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _pairs(tmp_path, n=5):
    """n demo images; each has a reference (another demo image, mirrored) except the last two: one missing, one
    unreadable."""
    from PIL import Image

    data, ref = tmp_path / "data", tmp_path / "data" / "reference"
    ref.mkdir(parents=True)
    pngs = sorted((ROOT / "datasets" / "demo").glob("*.png"))[:n + 1]
    for i, png in enumerate(pngs[:n]):
        shutil.copy(png, data / png.name)
        shutil.copy(png.with_suffix(".txt"), data / png.with_suffix(".txt").name)
        if i < n - 2:
            Image.open(pngs[i + 1]).transpose(Image.FLIP_LEFT_RIGHT).save(ref / png.name)
    (ref / pngs[n - 1].name).write_bytes(b"not a png")
    return data, pngs[n - 2].name, pngs[n - 1].name


def _cfg(tiny_dir, tmp_path, *extra):
    from krea2_train.config import load_config

    data, _, _ = _pairs(tmp_path)
    return load_config(ROOT / "configs" / "demo.yaml", [
        f"model.transformer={tiny_dir}/transformer_raw.safetensors",
        f"model.turbo={tiny_dir}/transformer_turbo.safetensors", f"model.text_encoder={tiny_dir}/text_encoder",
        f"model.vae={tiny_dir}/vae", "make_tiny=null", f"output_dir={tmp_path}/runs", f"cache_dir={tmp_path}/cache",
        f"data.datasets.0.path={data}", "data.datasets.0.repeats=1", "data.validation_images=0",
        "train.stages=[{resolution: 128, steps: 3, batch_size: 2}]", "data.reference=true", "data.flip=false",
        "preview.prompts=[]", "checkpoint.every_steps=0", "validation.every_steps=0", "logging.progress=none",
        "logging.tensorboard=false", "export.formats=[]", "data.num_workers=0", "optimizer.warmup_steps=0", *extra])


def test_check_data_reports_reference_problems_per_file(tiny_dir, tmp_path, one_torch_thread):
    from krea2_train import pipeline

    cfg = _cfg(tiny_dir, tmp_path)
    missing, broken = _names(cfg)
    scan = pipeline.check_data(cfg)
    kinds = {(p.kind, Path(p.file).name) for p in scan.problems}
    assert ("missing_reference", missing) in kinds
    assert ("unreadable_reference", broken) in kinds
    assert not any(k == "reference_small" for k, _ in kinds)  # demo references are as large as their targets
    assert len(scan.items) == 3  # the broken pairs are skipped; reference/ itself is not read as training images
    for i in scan.items:
        (ref,) = i.references
        assert Path(ref.name).parent.name == "reference" and Path(ref.name).name == Path(i.name).name
        assert {r: p.bucket for r, p in ref.placements.items()} == {r: p.bucket for r, p in i.placements.items()}


def _names(cfg):
    pngs = sorted(Path(cfg.data.datasets[0].path).glob("*.png"))
    return pngs[-2].name, pngs[-1].name


def test_config_errors_name_the_key(tmp_path):
    from krea2_train.config import load_config
    from krea2_train.errors import UserError

    base = ["model.transformer=a", "model.text_encoder=b", "model.vae=c", f"data.datasets=[{{path: {tmp_path}}}]"]
    with pytest.raises(UserError, match="train.reference_method"):
        load_config(None, [*base, "train.reference_method=offset"])
    with pytest.raises(UserError, match="preview.references"):
        load_config(None, [*base, "data.reference=true", "preview.prompts=[a cat]"])
    with pytest.raises(UserError, match="preview.references"):
        load_config(None, [*base, "preview.references=[x.png]"])
    # data.flip with data.reference is allowed: the references are flipped with their target
    # (test_reference_sources.test_flip_flips_the_references_with_their_target)


@pytest.mark.parametrize("method", ["index", "index_timestep_zero"])
def test_cache_and_train_with_references(tiny_dir, tmp_path, one_torch_thread, method):
    from krea2_train import pipeline
    from krea2_train.data.loader import BatchPlan, read_batch
    from krea2_train.data.source import CachedData
    from krea2_train.train.trainer import Trainer

    cfg = _cfg(tiny_dir, tmp_path, f"train.reference_method={method}")
    manifest = pipeline.cache(cfg, pipeline.check_data(cfg))
    assert len(manifest.items) == 3
    assert all(i["latents"]["128"]["reference_keys"][0] != i["latents"]["128"]["key"] for i in manifest.items)
    plan = BatchPlan(manifest, 128, 2, seed=0)
    batch = read_batch(manifest, 128, plan.batch(0)["entries"])
    (refs,) = batch["references"]
    assert refs.shape == batch["latents"].shape  # the target's bucket
    assert not torch.equal(refs, batch["latents"])

    t = Trainer(cfg)
    t.source = CachedData(cfg, t.acc, manifest=manifest)
    t.setup()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(batch["latents"].shape[0], (batch["latents"].shape[2] // 2) * (batch["latents"].shape[3] // 2),
                        64, generator=g)
    sig = torch.full((refs.shape[0],), 0.6)
    with torch.no_grad():
        with_refs = t.loss_on(batch, sigmas=sig, noise=noise)
        other = t.loss_on({**batch, "references": [refs.flip(-1)]}, sigmas=sig, noise=noise)
    assert torch.isfinite(with_refs).all()
    assert (with_refs - other).abs().max() > 1e-6  # the references reach the loss
    # data.reference_dropout: 1 drops the references of every training batch (the step's generator draws it)
    t.cfg.data.reference_dropout = 1.0
    with torch.no_grad():
        dropped = t.loss_on(batch, generator=torch.Generator().manual_seed(1), sigmas=sig, noise=noise)
        t.cfg.data.reference = False
        plain = t.loss_on(batch, sigmas=sig, noise=noise)
        t.cfg.data.reference = True
        t.cfg.data.reference_dropout = 0.0
        kept = t.loss_on(batch, generator=torch.Generator().manual_seed(1), sigmas=sig, noise=noise)
    torch.testing.assert_close(dropped, plain)
    torch.testing.assert_close(kept, with_refs)
    with pytest.raises(RuntimeError, match="reference"):
        t.loss_on({k: v for k, v in batch.items() if k != "references"}, sigmas=sig, noise=noise)
    res = t.run()
    assert res.step == 3 and not res.interrupted
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in res.history)
    assert (cfg.run_dir / "adapter" / "adapter_model.safetensors").exists()


def test_two_reference_folders(tiny_dir, tmp_path, one_torch_thread):
    """data.reference_folders [reference, reference_2]: a pair needs both (a missing second one is reported for that
    file); the batch carries reference 1 then reference 2; both folders stay out of the training images."""
    from krea2_train import pipeline
    from krea2_train.data.loader import BatchPlan, read_batch

    cfg = _cfg(tiny_dir, tmp_path, "data.reference_folders=[reference,reference_2]")
    data = Path(cfg.data.datasets[0].path)
    (data / "reference_2").mkdir()
    pngs = sorted(data.glob("*.png"))
    for png in pngs[:2]:  # the third good pair lacks its second reference
        shutil.copy(data / "reference" / png.name, data / "reference_2" / png.name)
    scan = pipeline.check_data(cfg)
    assert ("missing_reference", pngs[2].name) in {(p.kind, Path(p.file).name) for p in scan.problems}
    assert len(scan.items) == 2 and all(len(i.references) == 2 for i in scan.items)
    manifest = pipeline.cache(cfg, scan)
    batch = read_batch(manifest, 128, BatchPlan(manifest, 128, 2, seed=0).batch(0)["entries"])
    first, second = batch["references"]
    torch.testing.assert_close(first, second)  # reference_2 holds copies of reference's files
    assert first.shape == batch["latents"].shape


def test_previews_with_references(tiny_dir, tmp_path, one_torch_thread):
    """preview.references: the grid has the reference first, then Turbo, Turbo + LoRA and Raw + LoRA, each sampled
    with the reference (the Raw column differs from one sampled without it)."""
    from PIL import Image

    from krea2_train import pipeline
    from krea2_train.data.source import CachedData
    from krea2_train.inference import SampleSettings, sample_latents
    from krea2_train.train import preview
    from krea2_train.train.trainer import Trainer

    ref = sorted((ROOT / "datasets" / "demo").glob("*.png"))[0]
    cfg = _cfg(tiny_dir, tmp_path, "preview.prompts=[make it red]", f"preview.references=[{ref}]",
               "preview.resolution=64", "preview.raw_steps=2", "preview.turbo_steps=2", "preview.raw_guidance=0")
    manifest = pipeline.cache(cfg, pipeline.check_data(cfg))
    t = Trainer(cfg)
    t.source = CachedData(cfg, t.acc, manifest=manifest)
    t.setup()
    out = preview.render_previews(cfg, t.transformer, tmp_path / "run", 0)
    grid = out["preview"]
    files = list((tmp_path / "run" / "previews").glob("step-*.png"))
    assert len(files) == 1 and Image.open(files[0]).size == grid.size
    assert grid.width >= 4 * 64  # reference, Turbo, Turbo + LoRA, Raw + LoRA
    api = json.loads(Image.open(files[0]).text["prompt"])  # the embedded ComfyUI graph has the reference nodes
    assert {n["inputs"].get("image") for n in api.values() if n["class_type"] == "LoadImage"} == {ref.name}
    assert any(n["class_type"] == "FluxKontextMultiReferenceLatentMethod" for n in api.values())
    emb, mask, _, _ = preview.prompt_embeddings(cfg)
    ((lats,),), (img,) = preview.preview_references(cfg)  # one prompt, one reference
    assert lats.shape == (1, 16, 8, 8) and img.size == (64, 64)
    s = SampleSettings.raw(steps=2, guidance=0, height=64, width=64, seed=0)
    with_ref = sample_latents(t.transformer, emb, mask, s, references=[lats])
    without = sample_latents(t.transformer, emb, mask, s)
    assert (with_ref - without).abs().max() > 1e-4


def test_small_reference_is_reported(tiny_dir, tmp_path):
    from PIL import Image

    from krea2_train import pipeline

    cfg = _cfg(tiny_dir, tmp_path)
    data = Path(cfg.data.datasets[0].path)
    first = sorted(data.glob("*.png"))[0]
    Image.open(data / "reference" / first.name).resize((40, 40)).save(data / "reference" / first.name)
    scan = pipeline.check_data(cfg)
    assert ("reference_small", first.name) in {(p.kind, Path(p.file).name) for p in scan.problems}
    assert len(scan.items) == 3  # a warning: the pair still trains
