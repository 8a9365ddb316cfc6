"""Text and latent caches on the tiny model: contents, reuse, invalidation, interrupted runs resuming, and two
processes producing one complete cache."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from krea2_train.config.data import DataConfig, DatasetConfig
from krea2_train.config.model import ModelConfig
from krea2_train.data import cache as cache_mod
from krea2_train.data.cache import Manifest, build_caches, entry_valid

CAPTIONS = ["a red square", "two blue circles on white", "green", "a yellow star over a dark sea at night", "pink"]
SIZES = [(96, 80), (80, 96), (64, 64), (112, 64), (72, 72)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_dataset(root: Path, n=5):
    root.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        g = torch.Generator().manual_seed(k)
        arr = (torch.rand(SIZES[k][1], SIZES[k][0], 3, generator=g) * 255).byte().numpy()
        Image.fromarray(arr).save(root / f"im{k}.png")
        (root / f"im{k}.txt").write_text(CAPTIONS[k])
    return root


@pytest.fixture(scope="module")
def models(tiny_dir):
    from krea2_train.models.text_encoder import TextEncoder
    from krea2_train.models.vae import VAE

    mc = ModelConfig(transformer=str(Path(tiny_dir) / "transformer_raw.safetensors"),
                     text_encoder=str(Path(tiny_dir) / "text_encoder"), vae=str(Path(tiny_dir) / "vae"))
    return mc, TextEncoder.from_path(mc.text_encoder), VAE.from_path(mc.vae)


class Counting:
    """Wraps an encoder; counts inputs; can fail after `fail_after` calls (a killed run)."""

    def __init__(self, inner, fail_after=None):
        self.inner, self.calls, self.inputs, self.fail_after = inner, 0, 0, fail_after

    def encode(self, x):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        self.inputs += len(x)
        return self.inner.encode(x)


def cfg_for(root, **kw):
    return DataConfig(datasets=[DatasetConfig(path=str(root), trigger_word="zkw")], validation_images=1,
                      vae_batch_size=2, text_batch_size=2, **kw)


def no_loading(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a warm cache must not load any encoder")

    monkeypatch.setattr("krea2_train.models.text_encoder.TextEncoder.from_path", boom)
    monkeypatch.setattr("krea2_train.models.vae.VAE.from_path", boom)


def test_cache_contents_match_encoders_and_are_reused(tmp_path, models, monkeypatch):
    mc, te, vae = models
    root = make_dataset(tmp_path / "ds")
    cache = tmp_path / "cache"
    m = build_caches(cfg_for(root), mc, cache, [64], progress=False, text_encoder=te, vae=vae)
    assert len(m.items) == 5 and sum(i["split"] == "validation" for i in m.items) == 1
    # Text: trimmed to the valid tokens, bf16, equal to the encoder's output.
    item = next(i for i in m.items if i["caption"] == "zkw, a red square")
    t = load_file(str(m.text_path(item["text"])))["text"]
    ref_e, ref_m = te.encode(["zkw, a red square"])
    assert t.dtype == torch.bfloat16 and t.shape == (int(ref_m.sum()), 12, 32)
    torch.testing.assert_close(t.float(), ref_e[0][ref_m[0]].bfloat16().float())
    assert load_file(str(m.text_path(m.empty_text)))["text"].shape[0] >= 0  # the empty caption is cached
    # Latents: the normalised VAE latent of the recorded crop.
    lat = item["latents"]["64"]
    z = load_file(str(m.latent_path(lat["key"])))["latent"]
    w, h = lat["bucket"]
    assert z.dtype == torch.bfloat16 and z.shape == (16, h // 8, w // 8)
    img = Image.open(root / "im0.png").convert("RGB").resize(tuple(lat["resized"]), Image.LANCZOS, reducing_gap=3.0)
    img = img.crop((lat["left"], lat["top"], lat["left"] + w, lat["top"] + h))
    px = torch.from_numpy(__import__("numpy").asarray(img).copy()).permute(2, 0, 1).float()[None] / 127.5 - 1
    torch.testing.assert_close(z.float(), vae.encode(px)[0].bfloat16().float())
    # Manifest on disk is what the loader reads.
    m2 = Manifest.load(cache / "manifest.json")
    assert m2.items == m.items and Path(m2.cache_dir) == cache
    # Second run: nothing loaded, nothing rewritten.
    mtimes = {p: p.stat().st_mtime_ns for p in cache.rglob("*.safetensors")}
    no_loading(monkeypatch)
    from krea2_train.data.checks import scan_data

    ready = cache_mod.manifest_if_ready(cfg_for(root), mc, cache, [64], scan_data(cfg_for(root), [64]))
    assert ready is not None and ready.items == m.items and ready.path == m.path
    flipped = cfg_for(root, flip=True)  # needs flipped latents that do not exist yet
    assert cache_mod.manifest_if_ready(flipped, mc, cache, [64], scan_data(flipped, [64])) is None
    m3 = build_caches(cfg_for(root), mc, cache, [64], progress=False)
    assert m3.items == m.items
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.safetensors")} == mtimes


def test_keys_change_with_what_changes_the_tensor(tmp_path, models):
    mc, te, vae = models
    root = make_dataset(tmp_path / "ds")
    cache = tmp_path / "cache"
    base = build_caches(cfg_for(root), mc, cache, [64], progress=False, text_encoder=te, vae=vae)
    keys = {i["id"]: i for i in base.items}
    # A changed caption: one new text entry, nothing else encoded.
    (root / "im2.txt").write_text("green and orange")
    t, v = Counting(te), Counting(vae)
    m = build_caches(cfg_for(root), mc, cache, [64], progress=False, text_encoder=t, vae=v)
    assert (t.inputs, v.inputs) == (1, 0)
    changed = {i["id"]: i for i in m.items}
    assert changed["0:im2.png"]["text"] != keys["0:im2.png"]["text"]
    # Changed image bytes: a new latent for that image only.
    Image.new("RGB", (96, 80), (5, 5, 5)).save(root / "im0.png")
    v = Counting(vae)
    m = build_caches(cfg_for(root), mc, cache, [64], progress=False, text_encoder=t, vae=v)
    assert v.inputs == 1
    assert {i["id"]: i for i in m.items}["0:im0.png"]["latents"]["64"]["key"] != keys["0:im0.png"]["latents"]["64"]["key"]
    # Flip adds a variant per image (encoded alongside); the unflipped entries are reused.
    v = Counting(vae)
    m = build_caches(cfg_for(root, flip=True), mc, cache, [64], progress=False, text_encoder=t, vae=v)
    assert v.inputs == 5 * 2 and all(i["latents"]["64"]["flip_key"] for i in m.items)
    a = load_file(str(m.latent_path(m.items[1]["latents"]["64"]["key"])))["latent"]
    b = load_file(str(m.latent_path(m.items[1]["latents"]["64"]["flip_key"])))["latent"]
    assert not torch.equal(a, b)
    # Another background colour or encoder dtype gives other keys.
    other = cache_mod.latent_key("x", cache_mod.Placement((64, 64), (64, 64), 0, 0), False, (0, 0, 0), "fp")
    assert other != cache_mod.latent_key("x", cache_mod.Placement((64, 64), (64, 64), 0, 0), False, (255,) * 3, "fp")
    assert cache_mod.text_fingerprint(mc.text_encoder, "float32") != cache_mod.text_fingerprint(mc.text_encoder,
                                                                                                "bfloat16")
    # A damaged entry (truncated on disk) is detected and recomputed.
    victim = m.latent_path(m.items[2]["latents"]["64"]["key"])
    victim.write_bytes(victim.read_bytes()[:-64])
    assert not entry_valid(victim, m.items[2]["latents"]["64"]["key"])
    v = Counting(vae)
    build_caches(cfg_for(root, flip=True), mc, cache, [64], progress=False, text_encoder=t, vae=v)
    assert v.inputs >= 1 and entry_valid(victim, m.items[2]["latents"]["64"]["key"])
    # Pruning with only the latest manifest kept removes exactly the superseded entries (old caption, old image).
    for old in (cache / "manifests").glob("*.json"):
        if str(old) != m.path:
            old.unlink()
    files, _ = cache_mod.prune_cache(cache)
    assert files == 2
    assert all(entry_valid(m.latent_path(i["latents"]["64"]["key"]), i["latents"]["64"]["key"]) for i in m.items)
    assert all(entry_valid(m.text_path(i["text"]), i["text"]) for i in m.items)


def test_interrupted_caching_resumes(tmp_path, models):
    mc, te, vae = models
    root = make_dataset(tmp_path / "ds")
    cache = tmp_path / "cache"
    cfg = cfg_for(root)
    cfg.vae_batch_size = 1
    with pytest.raises(KeyboardInterrupt):
        build_caches(cfg, mc, cache, [64], progress=False, text_encoder=te, vae=Counting(vae, fail_after=2))
    done = list((cache / "latents").rglob("*.safetensors"))
    assert len(done) == 2 and not list(cache.rglob("*.tmp"))  # whole files only
    assert not (cache / "manifest.json").exists()
    v = Counting(vae)
    m = build_caches(cfg, mc, cache, [64], progress=False, text_encoder=te, vae=v)
    assert v.inputs == 3 and len(m.items) == 5


def test_image_changed_after_check_is_skipped_not_fatal(tmp_path, models):
    from krea2_train.data.checks import scan_data

    mc, te, vae = models
    root = make_dataset(tmp_path / "ds")
    scan = scan_data(cfg_for(root), [64], progress=False)
    (root / "im3.png").write_bytes(b"garbage now")
    m = build_caches(cfg_for(root), mc, tmp_path / "cache", [64], scan=scan, progress=False, text_encoder=te, vae=vae)
    assert len(m.items) == 4 and any("im3.png" in p for p in m.problems)


SCRIPT = """
import json, sys
from accelerate import PartialState
from krea2_train.data.cache import build_caches
from krea2_train.config.data import DataConfig, DatasetConfig
from krea2_train.config.model import ModelConfig
root, cache, tiny, out = sys.argv[1:]
state = PartialState(cpu=True)

class Count:
    def __init__(self, inner): self.inner, self.n = inner, 0
    def encode(self, x):
        self.n += len(x)
        return self.inner.encode(x)

from krea2_train.models.text_encoder import TextEncoder
from krea2_train.models.vae import VAE
te, vae = Count(TextEncoder.from_path(tiny + "/text_encoder")), Count(VAE.from_path(tiny + "/vae"))
mc = ModelConfig(transformer="x", text_encoder=tiny + "/text_encoder", vae=tiny + "/vae")
cfg = DataConfig(datasets=[DatasetConfig(path=root)], vae_batch_size=1, text_batch_size=1)
m = build_caches(cfg, mc, cache, [64], progress=False, text_encoder=te, vae=vae)
json.dump({"rank": state.process_index, "world": state.num_processes, "text": te.n, "latents": vae.n,
           "items": len(m.items), "manifest": m.path}, open(f"{out}/{state.process_index}.json", "w"))
"""


def test_two_processes_build_one_complete_cache(tmp_path, tiny_dir):
    import json

    root = make_dataset(tmp_path / "ds")
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        "29533", str(script), str(root), str(tmp_path / "cache"), str(tiny_dir), str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    res = [json.loads((tmp_path / f"{k}.json").read_text()) for k in (0, 1)]
    assert [x["world"] for x in res] == [2, 2]
    # Each process encoded a disjoint share; together everything once (5 images, 5 captions + the empty one).
    assert sum(x["latents"] for x in res) == 5 and all(x["latents"] >= 2 for x in res)
    assert sum(x["text"] for x in res) == 6 and all(x["text"] == 3 for x in res)
    assert res[0]["manifest"] == res[1]["manifest"] and all(x["items"] == 5 for x in res)
    m = Manifest.load(res[0]["manifest"])
    for item in m.items:
        assert entry_valid(m.latent_path(item["latents"]["64"]["key"]), item["latents"]["64"]["key"])
        assert entry_valid(m.text_path(item["text"]), item["text"])


def test_encoders_loaded_by_caching_are_released(tmp_path, models, monkeypatch):
    import weakref

    from krea2_train.models.text_encoder import TextEncoder
    from krea2_train.models.vae import VAE

    mc, _, _ = models
    refs = []
    real_te, real_vae = TextEncoder.from_path, VAE.from_path

    def track(loader):
        def load(*a, **k):
            obj = loader(*a, **k)
            refs.append(weakref.ref(obj))
            return obj
        return load

    monkeypatch.setattr(TextEncoder, "from_path", track(real_te))
    monkeypatch.setattr(VAE, "from_path", track(real_vae))
    m = build_caches(cfg_for(make_dataset(tmp_path / "ds", n=2)), mc, tmp_path / "cache", [64], progress=False)
    assert len(m.items) == 2 and len(refs) == 2
    assert all(r() is None for r in refs)  # nothing holds the text encoder or the VAE once caching is done
