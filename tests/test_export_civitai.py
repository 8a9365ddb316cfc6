"""The Civitai file's header, read back the way Civitai, A1111-style UIs and kohya tools read it: JSON strings for
ss_tag_frequency / ss_dataset_dirs, model-spec keys, and sshs_model_hash recomputed from the file's bytes."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from types import SimpleNamespace

import pytest
from safetensors import safe_open
from test_export_helpers import trained_adapter

from krea2_train.lora.writers import write_lora_file

CAPTIONS = {  # two dataset folders, as the cache manifest lists their training items
    0: ["zq style, a red circle, Poster", "zq style, a blue square", "zq style, a red circle, poster, a red circle"],
    1: ["zq style, a cat"],
}


@pytest.fixture(scope="module")
def adapter(tiny_dir):
    return trained_adapter(tiny_dir, r=4, alpha=12, use_rslora=True, rank_pattern={"ff.down": 2})


def _data_hash_from_file(path) -> str:
    """A1111 additional-networks / Civitai AutoV3: SHA-256 of everything after the 8-byte length and the header."""
    blob = open(path, "rb").read()
    n = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + n:]).hexdigest()


def _settings():
    """pipeline.export_settings on a config with two dataset folders and a manifest of their train items."""
    from krea2_train.config.load import load_config
    from krea2_train.pipeline import export_settings

    cfg = load_config(None, ["model.transformer=raw.safetensors", "model.text_encoder=te", "model.vae=vae",
                             "data.datasets=[{path: data/posters, trigger_word: zq style}, {path: other/cats}]",
                             "export.name=zq"], warn_paths=False)
    items = [{"dataset": d, "caption": c, "split": "train"} for d, caps in CAPTIONS.items() for c in caps]
    items.append({"dataset": 1, "caption": "held out, never trained", "split": "val"})
    return export_settings(cfg, SimpleNamespace(items=items))


def test_civitai_header_reads_back(adapter, tmp_path):
    from PIL import Image

    name, metadata = _settings()
    metadata["turbo_strength"] = 1.25
    buf = io.BytesIO()
    Image.new("RGB", (640, 320), (200, 30, 30)).save(buf, format="PNG")
    path = write_lora_file(adapter, tmp_path / "c.safetensors", "civitai", metadata={"name": name, **metadata},
                           preview_png=buf.getvalue())
    with safe_open(str(path), "pt") as f:
        h = f.metadata()
        alpha = f.get_tensor("diffusion_model.blocks.0.attn.wq.alpha").item()

    # kohya / A1111: tag frequency per folder, counted here from the captions (split on commas, lower-cased).
    tags = json.loads(h["ss_tag_frequency"])
    assert set(tags) == {"posters", "cats"}
    assert tags["posters"] == {"zq style": 3, "a red circle": 3, "poster": 2, "a blue square": 1}
    assert tags["cats"] == {"zq style": 1, "a cat": 1}  # the held-out caption is not counted
    dirs = json.loads(h["ss_dataset_dirs"])
    assert dirs == {"posters": {"n_repeats": 1, "img_count": 3}, "cats": {"n_repeats": 1, "img_count": 1}}
    assert h["ss_num_train_images"] == "4"
    assert h["ss_network_module"] == "networks.lora" and h["ss_network_dim"] == "4"
    assert float(h["ss_network_alpha"]) == pytest.approx(alpha, rel=1e-5)  # equals the tensors (rsLoRA folded in)
    assert h["ss_max_train_steps"] == str(metadata["steps"]) and h["ss_resolution"] == "(512, 512)"
    # model spec
    assert h["modelspec.sai_model_spec"] == "1.0.0" and h["modelspec.architecture"] == "Krea-2/lora"
    assert h["modelspec.title"] == "zq" and h["modelspec.trigger_phrase"] == "zq style"
    assert "Turbo" in h["modelspec.usage_hint"] and "1.25" in h["modelspec.usage_hint"]
    assert h["modelspec.resolution"] == "512x512"
    png = base64.b64decode(h["modelspec.thumbnail"].split(",", 1)[1])
    assert Image.open(io.BytesIO(png)).size == (256, 128)
    # hashes: recomputed from the file as written
    assert h["sshs_model_hash"] == _data_hash_from_file(path)
    from safetensors.torch import load_file, save

    ss_only = save(load_file(str(path)), metadata={k: v for k, v in h.items() if k.startswith("ss_")})
    assert h["sshs_legacy_hash"] == hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8]


def test_model_hash_is_over_tensor_data_only(adapter, tmp_path):
    """The same tensors with other metadata hash the same; other tensors (another dtype) do not."""
    a = write_lora_file(adapter, tmp_path / "a.safetensors", "civitai", metadata={"name": "a", "steps": 1})
    b = write_lora_file(adapter, tmp_path / "b.safetensors", "civitai", metadata={"name": "b", "steps": 2,
                                                                                  "trigger_words": ["x"]})
    c = write_lora_file(adapter, tmp_path / "c.safetensors", "civitai", dtype="float32", metadata={"name": "a"})
    hashes = []
    for p in (a, b, c):
        with safe_open(str(p), "pt") as f:
            hashes.append(f.metadata()["sshs_model_hash"])
        assert hashes[-1] == _data_hash_from_file(p)
    assert hashes[0] == hashes[1] != hashes[2]


def test_epochs_count_every_process_and_stage(tmp_path):
    """ss_num_epochs: images drawn by all processes over all stages (with accumulation) / training images, rounded
    up; the process count is the one RUN/runtime.json recorded when the run trained."""
    import json
    from types import SimpleNamespace

    from krea2_train.pipeline import _epochs

    stages = [SimpleNamespace(steps=10, batch_size=4), SimpleNamespace(steps=5, batch_size=1)]
    cfg = SimpleNamespace(run_dir=tmp_path, train=SimpleNamespace(stages=stages, gradient_accumulation=2))
    assert _epochs(cfg, 14) == 7  # (40 + 5) * 2 = 90 images over 14: 6.4 passes -> 7
    (tmp_path / "runtime.json").write_text(json.dumps({"processes": 2}))
    assert _epochs(cfg, 14) == 13  # 180 / 14 = 12.9
