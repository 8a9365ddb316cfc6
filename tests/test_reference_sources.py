"""Edit-LoRA references from metadata.jsonl and `datasets` sources (data.datasets[i].reference_columns, or found by
name): check-data reports the same per-file problems as for reference folders, the cache keys a reference by its own
bytes whichever source gave it, and anything ambiguous is refused naming the file and the fix."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

RES = 64


def _image(path, seed, size=(96, 96)):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _folder_pairs(root, n=4):
    """n targets with captions and reference/NAME.png each (a folder dataset)."""
    for i in range(n):
        _image(root / f"p{i}.png", i)
        (root / f"p{i}.txt").write_text(f"edit {i}")
        _image(root / "reference" / f"p{i}.png", 100 + i)
    return root


def _metadata(root, lines):
    with open(root / "metadata.jsonl", "w") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")


def _data(path, *overrides, reference=True, folders=None):
    from krea2_train.config import load_config

    extra = [f"data.reference_folders={folders}"] if folders else []
    return load_config(None, ["model.transformer=a", "model.text_encoder=b", "model.vae=c",
                              f"data.datasets=[{{path: {path}}}]", f"data.reference={str(reference).lower()}",
                              "data.flip=false", *extra, *overrides]).data


def _scan(data_cfg):
    from krea2_train.data.checks import scan_data

    return scan_data(data_cfg, [RES], progress=False)


def _kinds(scan):
    return {(p.kind, Path(p.file).name) for p in scan.problems}


def _plan_keys(scan, data_cfg):
    """{item id: [reference latent key at RES]} as the cache plans them."""
    from krea2_train.data.cache import _plan
    from krea2_train.data.images import parse_colour

    _, _, items = _plan(scan, data_cfg, "text-fp", "vae-fp", parse_colour(data_cfg.background))
    return {i["id"]: i["latents"][str(RES)]["reference_keys"] for i in items}


def test_metadata_reference_column_matches_the_folder_layout(tmp_path):
    """The same pairs as a folder dataset and as metadata.jsonl `reference` paths (into another folder name): the
    same items, the same reference images and the same reference cache keys, each equal to the key computed from the
    reference file's own bytes."""
    from krea2_train.data.cache import latent_key
    from krea2_train.data.images import parse_colour

    folder = _folder_pairs(tmp_path / "folder")
    meta = tmp_path / "meta"
    shutil.copytree(folder, meta)
    (meta / "reference").rename(meta / "inputs")
    _metadata(meta, [{"file_name": f"p{i}.png", "text": f"edit {i}", "reference": f"inputs/p{i}.png"}
                     for i in range(4)])
    a_cfg, b_cfg = _data(folder), _data(meta)
    a, b = _scan(a_cfg), _scan(b_cfg)
    assert not a.fatal and not b.fatal, b.problems
    assert [i.id for i in a.items] == [i.id for i in b.items] and len(a.items) == 4
    assert a.reference_count == b.reference_count == 1
    assert [[r.sha256 for r in i.references] for i in a.items] == [[r.sha256 for r in i.references] for i in b.items]
    assert [Path(i.references[0].name).parent.name for i in b.items] == ["inputs"] * 4
    assert [i.caption for i in b.items] == [f"edit {n}" for n in range(4)]
    ka, kb = _plan_keys(a, a_cfg), _plan_keys(b, b_cfg)
    assert ka == kb
    bg = parse_colour(b_cfg.background)
    for item in b.items:  # independent: sha256 of the file named in metadata.jsonl
        ref = item.references[0]
        sha = hashlib.sha256((meta / "inputs" / Path(item.name).name).read_bytes()).hexdigest()
        assert kb[item.id] == [latent_key(sha, ref.placements[RES], False, bg, "vae-fp")]
        assert ref.placements[RES].bucket == item.placements[RES].bucket


def test_metadata_per_file_problems(tmp_path):
    """missing (no such file, null field), unreadable, small and off-aspect references are reported per target file
    with the same kinds as for a reference folder; the broken pairs are skipped, the warned ones kept."""
    root = tmp_path / "meta"
    for i in range(6):
        _image(root / f"p{i}.png", i)
    _image(root / "ref" / "p0.png", 10)
    (root / "ref" / "p2.png").write_bytes(b"not a png")
    _image(root / "ref" / "p3.png", 13, size=(40, 40))  # smaller than the 64 px bucket
    _image(root / "ref" / "p4.png", 14, size=(192, 96))  # 2:1 against a square target
    lines = [{"file_name": f"p{i}.png", "text": "t", "reference": f"ref/p{i}.png"} for i in range(5)]
    lines.append({"file_name": "p5.png", "text": "t", "reference": None})
    _metadata(root, lines)
    scan = _scan(_data(root))
    kinds = _kinds(scan)
    assert ("missing_reference", "p1.png") in kinds and ("missing_reference", "p5.png") in kinds
    assert ("unreadable_reference", "p2.png") in kinds
    assert ("reference_small", "p3.png") in kinds and ("reference_aspect", "p4.png") in kinds
    assert sorted(Path(i.name).name for i in scan.items) == ["p0.png", "p3.png", "p4.png"]
    missing = next(p for p in scan.problems if p.kind == "missing_reference" and p.file.endswith("p1.png"))
    assert "ref/p1.png" in missing.message and "column 'reference'" in missing.message
    assert {"p1.png", "p2.png", "p5.png"} <= {Path(f).name for f in scan.skipped_files()}


def test_small_reference_message_names_the_file_sizes_and_a_fix_that_works(tmp_path):
    """reference_small names the reference by its path in the dataset, sizes as WxH px; its fix is a reference of
    at least the bucket's size, or (the target as small, upscaled with it) a larger pair, never 'as large as its
    target' when it already is."""
    root = _folder_pairs(tmp_path / "data", 2)
    _image(root / "reference" / "p0.png", 10, size=(40, 40))  # the target is 96x96: only the reference is small
    _image(root / "p1.png", 1, size=(40, 40))
    _image(root / "reference" / "p1.png", 11, size=(40, 40))  # as large as its target, both upscaled
    scan = _scan(_data(root, "data.allow_upscale=true"))
    small = {Path(p.file).name: p.message for p in scan.problems if p.kind == "reference_small"}
    assert set(small) == {"p0.png", "p1.png"} and len(scan.items) == 2
    assert "reference/p0.png (40x40 px)" in small["p0.png"] and "64x64 px at the 64 px stage" in small["p0.png"]
    assert "at least 64x64 px" in small["p0.png"] and "[" not in small["p0.png"]
    assert "reference/p1.png (40x40 px)" in small["p1.png"] and "target (40x40 px) is upscaled too" in small["p1.png"]
    assert "at least" not in small["p1.png"]


def test_reference_columns_and_folders_without_data_reference_are_warned(tmp_path, capsys):
    """data.reference off: a metadata.jsonl reference column and a folder dataset's reference/ folder are named in a
    warning with the key that reads them as references (check-data CLI too); nothing is said without them."""
    from krea2_train.cli import main

    meta = _folder_pairs(tmp_path / "meta", 2)
    (meta / "reference").rename(meta / "inputs")
    _metadata(meta, [{"file_name": f"p{i}.png", "text": "t", "reference_1": f"inputs/p{i}.png"} for i in range(2)])
    folder = _folder_pairs(tmp_path / "folder", 2)
    for root, file in ((meta, meta / "metadata.jsonl"), (folder, folder / "reference")):
        scan = _scan(_data(root, reference=False))
        (p,) = [p for p in scan.problems if p.kind == "references_ignored"]
        assert p.severity == "warning" and p.file == str(file)
        assert "data.reference: true" in p.message and str(file) in p.message
    assert "['reference_1']" in next(p.message for p in _scan(_data(meta, reference=False)).problems
                                     if p.kind == "references_ignored")
    assert main(["check-data", str(folder), "data.allow_upscale=true"]) == 0
    assert "references_ignored" in capsys.readouterr().out
    plain = tmp_path / "plain"
    for i in range(2):
        _image(plain / f"p{i}.png", i)
    assert not any(p.kind == "references_ignored" for p in _scan(_data(plain, reference=False)).problems)
    assert not any(p.kind == "references_ignored" for p in _scan(_data(meta)).problems)  # read as references


def test_numbered_columns_and_a_list_column(tmp_path):
    """reference_1 / reference_2 are references 1 and 2; a `references` list column gives the count its rows agree
    on, and a row with another count is reported (reference_count) and skipped; an empty list is missing."""
    root = tmp_path / "meta"
    for i in range(4):
        _image(root / f"p{i}.png", i)
        _image(root / "a" / f"p{i}.png", 20 + i)
        _image(root / "b" / f"p{i}.png", 40 + i)
    _metadata(root, [{"file_name": f"p{i}.png", "text": "t", "reference_2": f"b/p{i}.png",
                      "reference_1": f"a/p{i}.png"} for i in range(4)])
    scan = _scan(_data(root))
    assert scan.reference_count == 2 and len(scan.items) == 4
    for item in scan.items:
        assert [Path(r.name).parent.name for r in item.references] == ["a", "b"]

    _metadata(root, [{"file_name": "p0.png", "text": "t", "references": ["a/p0.png", "b/p0.png"]},
                     {"file_name": "p1.png", "text": "t", "references": ["a/p1.png", "b/p1.png"]},
                     {"file_name": "p2.png", "text": "t", "references": ["a/p2.png"]},
                     {"file_name": "p3.png", "text": "t", "references": []}])
    scan = _scan(_data(root))
    assert scan.reference_count == 2
    kinds = _kinds(scan)
    assert ("reference_count", "p2.png") in kinds and ("missing_reference", "p3.png") in kinds
    assert sorted(Path(i.name).name for i in scan.items) == ["p0.png", "p1.png"]
    assert all([Path(r.name).parent.name for r in i.references] == ["a", "b"] for i in scan.items)
    msg = next(p.message for p in scan.problems if p.kind == "reference_count")
    assert "give it 2" in msg


def test_reference_file_name_column(tmp_path):
    """metadata.jsonl `reference_file_name` (which `datasets` reads as an image column `reference`) works as a path."""
    root = _folder_pairs(tmp_path / "meta", 2)
    (root / "reference").rename(root / "refs")
    _metadata(root, [{"file_name": f"p{i}.png", "text": "t", "reference_file_name": f"refs/p{i}.png"}
                     for i in range(2)])
    scan = _scan(_data(root))
    assert not scan.fatal and len(scan.items) == 2
    assert all(Path(i.references[0].name) == root / "refs" / Path(i.name).name for i in scan.items)


def test_imagefolder_without_a_column_uses_reference_folders(tmp_path):
    root = _folder_pairs(tmp_path / "meta", 3)
    _metadata(root, [{"file_name": f"p{i}.png", "text": "t"} for i in range(3)])
    scan = _scan(_data(root))
    assert not scan.fatal and len(scan.items) == 3
    assert all(Path(i.references[0].name).parent.name == "reference" for i in scan.items)
    shutil.rmtree(root / "reference")
    scan = _scan(_data(root))
    (p,) = [p for p in scan.problems if p.severity == "fatal"]
    assert p.kind == "no_reference_column" and "no reference column" in p.message
    assert "data.datasets[0].reference_columns" in p.message


def _disk(tmp_path, columns: dict, n=3):
    """A save_to_disk dataset with image columns (bytes in the arrow files) and a caption column."""
    import datasets

    rows = {c: [] for c in columns}
    for i in range(n):
        for c, kind in columns.items():
            if kind == "image":
                rows[c].append({"bytes": _image(tmp_path / "src" / f"{c}{i}.png", hash(c) % 1000 + i).read_bytes(),
                                "path": None})
            else:
                rows[c].append(f"make it {i}")
    feats = datasets.Features({c: datasets.Image() if k == "image" else datasets.Value("string")
                               for c, k in columns.items()})
    out = tmp_path / "disk"
    datasets.Dataset.from_dict(rows, features=feats).save_to_disk(str(out))
    return out


def test_disk_dataset_instruct_pix2pix_columns(tmp_path):
    """diffusers' InstructPix2Pix columns: the error names image_column / caption_column to set; set, input_image is
    found as the reference (bytes, keyed by their sha256); an explicit reference_columns is read as given."""
    from krea2_train.data.cache import latent_key
    from krea2_train.data.images import parse_colour

    path = _disk(tmp_path, {"input_image": "image", "edited_image": "image", "edit_prompt": "text"})
    scan = _scan(_data(path))
    (p,) = [p for p in scan.problems if p.severity == "fatal"]
    assert "image_column: edited_image" in p.message and "caption_column: edit_prompt" in p.message
    cfg = _data(path, "data.datasets.0.image_column=edited_image", "data.datasets.0.caption_column=edit_prompt")
    scan = _scan(cfg)
    assert not scan.fatal and len(scan.items) == 3 and scan.reference_count == 1
    assert ("reference_columns", "disk") in _kinds(scan)  # says which column it found
    keys = _plan_keys(scan, cfg)
    for n, item in enumerate(sorted(scan.items, key=lambda i: int(i.id.split("row")[1]))):
        sha = hashlib.sha256((tmp_path / "src" / f"input_image{n}.png").read_bytes()).hexdigest()
        assert item.references[0].sha256 == sha and item.caption == f"make it {n}"
        assert keys[item.id] == [latent_key(sha, item.references[0].placements[RES], False,
                                            parse_colour(cfg.background), "vae-fp")]
    explicit = _scan(_data(path, "data.datasets.0.image_column=edited_image",
                           "data.datasets.0.caption_column=edit_prompt", "data.datasets.0.reference_columns=[input_image]"))
    assert [i.references[0].sha256 for i in explicit.items] == [i.references[0].sha256 for i in scan.items]
    assert ("reference_columns", "disk") not in _kinds(explicit)


def _fatal(scan, kind="ambiguous_reference"):
    fatal = [p for p in scan.problems if p.severity == "fatal"]
    assert len(fatal) == 1 and fatal[0].kind == kind, scan.problems
    return fatal[0].message


def test_ambiguous_references_are_refused(tmp_path):
    root = _folder_pairs(tmp_path / "meta", 3)
    _image(root / "other" / "p1.png", 77)
    lines = [{"file_name": f"p{i}.png", "text": "t", "reference": f"reference/p{i}.png"} for i in range(3)]
    _metadata(root, lines)
    assert not _scan(_data(root)).fatal  # the column names the folder's own files: they agree
    lines[1]["reference"] = "other/p1.png"
    _metadata(root, lines)
    msg = _fatal(_scan(_data(root)))
    assert "p1.png" in msg and "other/p1.png" in msg and "disagree" in msg and "Remove" in msg

    lines[1]["reference"] = "reference/p1.png"
    for line in lines:
        line["input_image"] = line["reference"]
    _metadata(root, lines)
    msg = _fatal(_scan(_data(root)))
    assert "ambiguous" in msg and "data.datasets[0].reference_columns" in msg and "input_image" in msg
    assert not _scan(_data(root, "data.datasets.0.reference_columns=[input_image]")).fatal

    for line in lines:
        line.pop("input_image")
        line["reference_1"] = line["reference"]
    _metadata(root, lines)
    assert "reference_1" in _fatal(_scan(_data(root)))

    msg = _fatal(_scan(_data(root, "data.datasets.0.reference_columns=[nope]")), "no_reference_column")
    assert "'nope'" in msg and "data.datasets[0].reference_columns" in msg


def test_config_and_layout_mistakes_name_the_key(tmp_path):
    from krea2_train.errors import UserError

    root = _folder_pairs(tmp_path / "folder", 2)
    msg = _fatal(_scan(_data(root, "data.datasets.0.reference_columns=[reference]")))
    assert "folder dataset" in msg and "data.reference_folders" in msg
    with pytest.raises(UserError, match=r"data.datasets\[0\].reference_columns"):
        _data(root, "data.datasets.0.reference_columns=[reference]", reference=False)
    with pytest.raises(UserError, match=r"data.datasets\[0\].reference_columns"):
        _data(root, "data.datasets.0.reference_columns=[image]")


def test_datasets_with_different_reference_counts_are_refused(tmp_path):
    from krea2_train.config import load_config

    one = _folder_pairs(tmp_path / "one", 2)
    two = tmp_path / "two"
    for i in range(2):
        _image(two / f"q{i}.png", 50 + i)
        _image(two / "a" / f"q{i}.png", 60 + i)
        _image(two / "b" / f"q{i}.png", 70 + i)
    _metadata(two, [{"file_name": f"q{i}.png", "text": "t", "references": [f"a/q{i}.png", f"b/q{i}.png"]}
                    for i in range(2)])
    cfg = load_config(None, ["model.transformer=a", "model.text_encoder=b", "model.vae=c",
                             f"data.datasets=[{{path: {one}}}, {{path: {two}}}]", "data.reference=true"]).data
    msg = _fatal(_scan(cfg), "reference_count")
    assert "data.datasets[0]" in msg and "data.datasets[1]" in msg and "1 from folders" in msg and "2 from" in msg


def test_prune_keeps_reference_latents(tmp_path):
    """prune_cache keeps the entries a manifest's reference_keys name (they were deleted as unreferenced)."""
    from krea2_train.data.cache import entry_path, prune_cache

    cache = tmp_path / "cache"
    keys = {"t": "text", "img": "latents", "ref": "latents", "stale": "latents"}
    for k, kind in keys.items():
        p = entry_path(cache, kind, k * 8)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    (cache / "manifests").mkdir()
    (cache / "manifests" / "m.json").write_text(json.dumps({"empty_text": "t" * 8, "items": [
        {"text": "t" * 8, "latents": {"64": {"key": "img" * 8, "flip_key": None, "reference_keys": ["ref" * 8]}}}]}))
    files, _ = prune_cache(cache)
    assert files == 1
    assert entry_path(cache, "latents", "ref" * 8).exists() and not entry_path(cache, "latents", "stale" * 8).exists()


def test_cache_and_batches_from_metadata_references(tiny_dir, tmp_path, one_torch_thread):
    """On the tiny model: the folder layout cached first, the same pairs from metadata.jsonl need no new entry (same
    keys); two reference columns give batches with references 1 and 2 in column order, and the export metadata's
    reference_count (the ComfyUI graph's ReferenceLatent nodes) is the cache's."""
    import torch

    from krea2_train.config import load_config
    from krea2_train.data.cache import build_caches, manifest_if_ready
    from krea2_train.data.loader import BatchPlan, read_batch
    from krea2_train.pipeline import export_settings

    folder = _folder_pairs(tmp_path / "folder", 2)
    meta = tmp_path / "meta"
    shutil.copytree(folder, meta)
    (meta / "reference").rename(meta / "inputs")
    _metadata(meta, [{"file_name": f"p{i}.png", "text": f"edit {i}", "reference": f"inputs/p{i}.png"}
                     for i in range(2)])
    cfg = load_config(None, [f"model.transformer={tiny_dir}/transformer_raw.safetensors",
                             f"model.text_encoder={tiny_dir}/text_encoder", f"model.vae={tiny_dir}/vae",
                             f"data.datasets=[{{path: {folder}}}]", "data.reference=true", "data.flip=false",
                             f"cache_dir={tmp_path}/cache"])
    built = build_caches(cfg.data, cfg.model, cfg.cache_dir, [RES], scan=_scan(cfg.data), progress=False)
    cfg.data.datasets[0].path = str(meta)
    ready = manifest_if_ready(cfg.data, cfg.model, cfg.cache_dir, [RES], _scan(cfg.data))
    assert ready is not None  # nothing to encode: every reference latent is the folder layout's entry
    assert [i["latents"][str(RES)]["reference_keys"] for i in ready.items] == \
        [i["latents"][str(RES)]["reference_keys"] for i in built.items]

    _image(meta / "second" / "p0.png", 300)
    _image(meta / "second" / "p1.png", 301)
    _metadata(meta, [{"file_name": f"p{i}.png", "text": f"edit {i}", "reference_1": f"inputs/p{i}.png",
                      "reference_2": f"second/p{i}.png"} for i in range(2)])
    manifest = build_caches(cfg.data, cfg.model, cfg.cache_dir, [RES], scan=_scan(cfg.data), progress=False)
    batch = read_batch(manifest, RES, BatchPlan(manifest, RES, 2, seed=0).batch(0)["entries"])
    first, second = batch["references"]
    assert first.shape == second.shape == batch["latents"].shape
    by_name = {e["name"]: e for e in manifest.items}
    for entry in manifest.items:
        old = next(i for i in built.items if Path(i["name"]).name == Path(entry["name"]).name)
        assert entry["latents"][str(RES)]["reference_keys"][0] == old["latents"][str(RES)]["reference_keys"][0]
    assert not torch.equal(first, second) and len(by_name) == 2
    assert export_settings(cfg, manifest)[1]["reference_count"] == 2


def test_disk_dataset_list_of_images(tmp_path):
    """A save_to_disk `references` column of List(Image()): references 1 and 2 in list order, by their bytes."""
    import datasets

    def png(seed):
        return _image(tmp_path / "src" / f"{seed}.png", seed).read_bytes()

    rows = {"image": [{"bytes": png(i), "path": None} for i in range(3)], "text": ["a", "b", "c"],
            "references": [[{"bytes": png(10 + i), "path": None}, {"bytes": png(20 + i), "path": None}]
                           for i in range(3)]}
    feats = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                               "references": datasets.List(datasets.Image())})
    datasets.Dataset.from_dict(rows, features=feats).save_to_disk(str(tmp_path / "disk"))
    scan = _scan(_data(tmp_path / "disk"))
    assert not scan.fatal and scan.reference_count == 2 and len(scan.items) == 3
    for item in scan.items:
        row = int(item.id.split("row")[1])
        assert [r.sha256 for r in item.references] == [
            hashlib.sha256((tmp_path / "src" / f"{s}.png").read_bytes()).hexdigest() for s in (10 + row, 20 + row)]


def test_flip_flips_the_references_with_their_target(tiny_dir, tmp_path, one_torch_thread):
    """data.flip with data.reference: each reference is cached flipped too, and a batch's flipped targets come with
    flipped references: the cached flipped latent equals the VAE latent of the mirrored reference image, encoded here
    independently."""
    import numpy as np
    import torch
    from PIL import Image

    from krea2_train.config import load_config
    from krea2_train.data.buckets import apply
    from krea2_train.data.cache import build_caches, entry_path, prune_cache
    from krea2_train.data.loader import read_batch
    from krea2_train.models.vae import VAE

    folder = _folder_pairs(tmp_path / "folder", 2)
    cfg = load_config(None, [f"model.transformer={tiny_dir}/transformer_raw.safetensors",
                             f"model.text_encoder={tiny_dir}/text_encoder", f"model.vae={tiny_dir}/vae",
                             f"data.datasets=[{{path: {folder}}}]", "data.reference=true", "data.flip=true",
                             f"cache_dir={tmp_path}/cache"])
    scan = _scan(cfg.data)
    manifest = build_caches(cfg.data, cfg.model, cfg.cache_dir, [RES], scan=scan, progress=False)
    entries = sorted(manifest.items, key=lambda i: i["id"])
    lat = entries[0]["latents"][str(RES)]
    assert len(lat["reference_flip_keys"]) == 1 and lat["reference_flip_keys"][0] != lat["reference_keys"][0]
    flipped = read_batch(manifest, RES, [(entries[0], True, False), (entries[1], False, False)])
    plain = read_batch(manifest, RES, [(entries[0], False, False), (entries[1], False, False)])
    (ref_f,), (ref_p,) = flipped["references"], plain["references"]
    torch.testing.assert_close(ref_f[1], ref_p[1])  # the unflipped entry keeps its reference
    assert not torch.allclose(ref_f[0], ref_p[0])
    item = next(i for i in scan.items if i.id == entries[0]["id"])
    ref = item.references[0]
    img = apply(Image.open(ref.name).convert("RGB"), ref.placements[RES]).transpose(Image.FLIP_LEFT_RIGHT)
    px = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1.0
    vae = VAE.from_path(cfg.model.vae, dtype="float32", device="cpu")
    with torch.no_grad():
        expected = vae.encode(px[None])[0]
    torch.testing.assert_close(ref_f[0].float(), expected.to(torch.bfloat16).float(), atol=2e-2, rtol=2e-2)
    prune_cache(cfg.cache_dir)  # the flipped references are kept
    assert entry_path(cfg.cache_dir, "latents", lat["reference_flip_keys"][0]).exists()
