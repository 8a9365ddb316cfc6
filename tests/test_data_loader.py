"""Bucketed batches from the cache: shapes, padding, seeded order, exact resume, workers, DDP split, dropout, flips
and the fixed validation set."""

from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from krea2_train.config.data import DataConfig, DatasetConfig
from krea2_train.config.model import ModelConfig
from krea2_train.data.cache import build_caches
from krea2_train.data.loader import BatchPlan, make_loader, validation_batches

SIZES = [(96, 64), (64, 96), (80, 80), (96, 64), (64, 96), (80, 80), (112, 64), (80, 80), (96, 64)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def manifest(tiny_dir, tmp_path_factory):
    from krea2_train.models.text_encoder import TextEncoder
    from krea2_train.models.vae import VAE

    root = tmp_path_factory.mktemp("loader_ds")
    for k, size in enumerate(SIZES):
        Image.new("RGB", size, (20 * k, 255 - 20 * k, 7 * k)).save(root / f"p{k}.png")
        (root / f"p{k}.txt").write_text(" ".join(["word"] * (k + 1)))  # captions of different lengths
    mc = ModelConfig(transformer="x", text_encoder=str(Path(tiny_dir) / "text_encoder"),
                     vae=str(Path(tiny_dir) / "vae"))
    cfg = DataConfig(datasets=[DatasetConfig(path=str(root), repeats=2, caption_dropout=0.25)], flip=True,
                     validation_images=2, vae_batch_size=8, text_batch_size=8)
    return build_caches(cfg, mc, tmp_path_factory.mktemp("loader_cache"), [64], progress=False,
                        text_encoder=TextEncoder.from_path(mc.text_encoder), vae=VAE.from_path(mc.vae))


def take(m, n, **kw):
    kw = {"resolution": 64, "batch_size": 3, "seed": 5, "num_workers": 0, "process_index": 0, "num_processes": 1,
          **kw}
    return list(make_loader(m, num_steps=n, **kw))


def test_batch_contents(manifest):
    for b in take(manifest, 6):
        B = len(b["ids"])
        assert isinstance(b["bucket"], tuple)
        w, h = b["bucket"]
        assert b["latents"].shape == (B, 16, h // 8, w // 8) and b["latents"].dtype == torch.bfloat16
        assert b["text"].shape[:2] == b["text_mask"].shape and b["text"].shape[2:] == (12, 32)
        assert b["text_mask"].dtype == torch.bool and b["text_mask"].any(1).all()
        assert b["text_mask"].sum(1).max() == b["text"].shape[1]  # padded to the longest caption in the batch
        assert (b["text"][~b["text_mask"]] == 0).all()
        for i, id_ in enumerate(b["ids"]):
            item = next(x for x in manifest.items if x["id"] == id_)
            key = manifest.empty_text if b["dropped"][i] else item["text"]
            t = load_file(str(manifest.text_path(key)))["text"]
            assert int(b["text_mask"][i].sum()) == t.shape[0] and torch.equal(b["text"][i, : t.shape[0]], t)
            lat = item["latents"]["64"]
            z = load_file(str(manifest.latent_path(lat["flip_key"] if b["flipped"][i] else lat["key"])))["latent"]
            assert torch.equal(b["latents"][i], z)
            assert b["captions"][i] == ("" if b["dropped"][i] else item["caption"])


def test_epoch_covers_train_items_by_repeats(manifest):
    plan = BatchPlan(manifest, 64, 3, seed=5)
    batches = take(manifest, plan.batches_per_epoch)
    seen = Counter(i for b in batches for i in b["ids"])
    train = {i["id"] for i in manifest.items if i["split"] == "train"}
    assert set(seen) == train and set(seen.values()) == {2}  # repeats=2, validation never trained on
    assert all(b["epoch"] == 0 for b in batches)
    # Random flips and caption dropout both happen, at about the configured rates.
    flips = torch.cat([b["flipped"] for b in take(manifest, 60)])
    drops = torch.cat([b["dropped"] for b in take(manifest, 60)])
    assert 0.3 < flips.float().mean() < 0.7 and 0.1 < drops.float().mean() < 0.4


def test_reproducible_and_resumable(manifest):
    full = take(manifest, 20)
    again = take(manifest, 20)
    assert [b["ids"] for b in full] == [b["ids"] for b in again]
    assert all(torch.equal(a["latents"], b["latents"]) and torch.equal(a["text"], b["text"]) for a, b in zip(full, again))
    assert [b["ids"] for b in take(manifest, 20, seed=6)] != [b["ids"] for b in full]
    resumed = take(manifest, 13, start_step=7)
    assert [b["step"] for b in resumed] == list(range(7, 20))
    assert [(b["ids"], b["flipped"].tolist(), b["dropped"].tolist()) for b in resumed] == \
        [(b["ids"], b["flipped"].tolist(), b["dropped"].tolist()) for b in full[7:]]
    # Worker processes change nothing but speed.
    workers = take(manifest, 20, num_workers=2)
    procs = take(manifest, 20, num_workers=2, worker_type="process")
    assert [b["ids"] for b in procs] == [b["ids"] for b in full]
    assert [b["ids"] for b in workers] == [b["ids"] for b in full]
    assert all(torch.equal(a["text"], b["text"]) for a, b in zip(full, workers))


def test_processes_get_disjoint_interleaved_batches(manifest):
    single = take(manifest, 12)
    p0 = take(manifest, 6, process_index=0, num_processes=2)
    p1 = take(manifest, 6, process_index=1, num_processes=2)
    assert [b["ids"] for b in p0] == [b["ids"] for b in single[0::2]]
    assert [b["ids"] for b in p1] == [b["ids"] for b in single[1::2]]


def test_validation_batches_fixed(manifest):
    val = validation_batches(manifest, 64, batch_size=4)
    ids = [i for b in val for i in b["ids"]]
    assert sorted(ids) == sorted(i["id"] for i in manifest.items if i["split"] == "validation") and len(ids) == 2
    assert not any(b["flipped"].any() or b["dropped"].any() for b in val)
    again = validation_batches(manifest, 64, batch_size=4)
    assert [b["sample_seeds"].tolist() for b in val] == [b["sample_seeds"].tolist() for b in again]


def test_bad_requests_fail_clearly(manifest):
    from krea2_train.errors import UserError

    with pytest.raises(UserError, match="resolutions"):
        BatchPlan(manifest, 512, 2, 0)
    with pytest.raises(UserError, match="drop_last"):
        BatchPlan(manifest, 64, 50, 0, drop_last=True)


def test_missing_cache_entry_is_a_clear_error(manifest, tmp_path):
    import copy
    import shutil

    from krea2_train.data.loader import CacheReadError

    m = copy.deepcopy(manifest)
    shutil.copytree(manifest.cache_dir, tmp_path / "c")
    m.cache_dir = str(tmp_path / "c")
    for p in (tmp_path / "c" / "latents").rglob("*.safetensors"):
        p.unlink()
    with pytest.raises(CacheReadError, match="krea2-train cache"):
        take(m, 1)
