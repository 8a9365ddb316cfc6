"""Dataset sources and check-data: each source type, each bad-input case, reported per file and skipped."""

import json
from pathlib import Path

import pytest
from PIL import Image

from krea2_train.config.data import DataConfig, DatasetConfig
from krea2_train.data.checks import scan_data
from krea2_train.errors import UserError


def img(path: Path, size=(96, 80), colour=(200, 30, 30), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)
    return path


def by_kind(scan):
    out = {}
    for p in scan.problems:
        out.setdefault(p.kind, []).append(p)
    return out


def test_folder_source_recursive_with_captions_trigger_and_repeats(tmp_path):
    img(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red square\n")
    img(tmp_path / "sub" / "deeper" / "b.jpg", colour=(0, 0, 200))
    (tmp_path / "sub" / "deeper" / "b.txt").write_text("a blue square")
    cfg = DataConfig(datasets=[DatasetConfig(path=str(tmp_path), trigger_word="zkw", repeats=3)])
    scan = scan_data(cfg, [64])
    assert not scan.problems
    caps = {i.id: i.caption for i in scan.items}
    assert caps == {"0:a.png": "zkw, a red square", "0:sub/deeper/b.jpg": "zkw, a blue square"}
    assert all(i.repeats == 3 for i in scan.items)
    cfg.trigger_position = "suffix"
    assert scan_data(cfg, [64]).items[0].caption == "a red square, zkw"


def test_bad_inputs_reported_and_skipped(tmp_path):
    img(tmp_path / "good.png", colour=(1, 2, 3))
    (tmp_path / "good.txt").write_text("fine")
    img(tmp_path / "nocap.png", colour=(4, 5, 6))                                   # missing caption
    img(tmp_path / "emptycap.png", colour=(7, 8, 9))
    (tmp_path / "emptycap.txt").write_text("   \n")                                 # empty caption
    img(tmp_path / "latin1.png", colour=(10, 11, 12))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))     # not UTF-8
    img(tmp_path / "dup.png", colour=(1, 2, 3))                                      # same bytes as good.png
    (tmp_path / "fake.png").write_text("not really a png")                          # non-image with image extension
    (tmp_path / "notes.pdf").write_bytes(b"%PDF-1.4")                               # non-image file
    data = (tmp_path / "good.png").read_bytes()
    big = tmp_path / "trunc.jpg"
    Image.effect_noise((128, 128), 60).convert("RGB").save(big, quality=95)
    big.write_bytes(big.read_bytes()[: big.stat().st_size // 2])                     # truncated
    img(tmp_path / "bomb.png", size=(3000, 3000))                                   # over max_image_pixels
    img(tmp_path / "tiny.png", size=(40, 40))                                       # smaller than its bucket
    cfg = DataConfig(datasets=[DatasetConfig(path=str(tmp_path), default_caption="a default")],
                     max_image_pixels=4_000_000)
    scan = scan_data(cfg, [64])
    kinds = by_kind(scan)
    names = {i.name.split("/")[-1]: i for i in scan.items}
    assert set(names) == {"good.png", "nocap.png", "emptycap.png", "latin1.png"}  # the captioned duplicate kept
    assert names["nocap.png"].caption == "a default" and names["emptycap.png"].caption == "a default"
    assert names["latin1.png"].caption == "a default"
    assert "latin1.txt" in kinds["caption_not_utf8"][0].message and "UTF-8" in kinds["caption_not_utf8"][0].message
    assert kinds["duplicate"][0].file.endswith("dup.png") and "good.png" in kinds["duplicate"][0].message
    assert {p.file.split("/")[-1] for p in kinds["not_image"]} == {"fake.png", "notes.pdf"}
    assert [p.severity for p in kinds["not_image"] if p.file.endswith("fake.png")] == ["error"]
    assert kinds["truncated"][0].file.endswith("trunc.jpg") and kinds["truncated"][0].severity == "error"
    assert kinds["bomb"][0].file.endswith("bomb.png")
    assert kinds["too_small"][0].file.endswith("tiny.png") and "data.allow_upscale" in kinds["too_small"][0].message
    assert not any(p.file.endswith("tiny.png") for p in scan.problems if p.kind != "too_small")  # no caption noise
    assert not scan.fatal
    assert data == (tmp_path / "good.png").read_bytes()  # checking never touches the files
    # the summary's skipped count is the files marked skipped: fake, trunc, bomb, tiny and the duplicate
    skipped = {p.file.split("/")[-1] for p in scan.problems if p.severity == "error"}
    assert skipped == {"fake.png", "trunc.jpg", "bomb.png", "tiny.png", "dup.png"}
    assert f"{len(skipped)} skipped" in scan.summary()
    assert kinds["caption_not_utf8"][0].severity == "warning"  # latin1.png is used, not skipped

    # Without a default caption a missing caption is a warning and the image trains on the trigger word alone.
    cfg.datasets[0].default_caption = None
    cfg.datasets[0].trigger_word = "zkw"
    scan = scan_data(cfg, [64])
    assert {i.name.split("/")[-1]: i.caption for i in scan.items}["nocap.png"] == "zkw"
    assert by_kind(scan)["missing_caption"][0].severity == "warning"
    # a non-UTF-8 caption is reported once (not also as a missing caption), saying what the image trains on
    assert [p.file.split("/")[-1] for p in scan.problems if "latin1" in p.file] == ["latin1.txt"]
    assert "trigger word alone" in by_kind(scan)["caption_not_utf8"][0].message


def test_long_captions_and_captions_without_images(tmp_path, tiny_dir):
    from krea2_train.cli.data import token_counter
    from krea2_train.config import load_config

    for k, (name, caption) in enumerate((("short", "a red square"), ("words", "red " * 600), ("chars", "x" * 26_000),
                                         ("almost", "a red square on teal " * 20))):
        img(tmp_path / f"{name}.png", colour=(40 * k, 0, 0))  # distinct images: no duplicates
        (tmp_path / f"{name}.txt").write_text(caption)
    (tmp_path / "orphan.txt").write_text("an image that was deleted")
    cfg = DataConfig(datasets=[DatasetConfig(path=str(tmp_path))])
    scan = scan_data(cfg, [64])
    long = {p.file.split("/")[-1]: p for p in by_kind(scan)["caption_too_long"]}
    assert set(long) == {"words.png", "chars.png"}  # "almost" (420 characters) fits
    assert "at least 600 tokens" in long["words.png"].message and "estimated" in long["chars.png"].message
    assert all(p.severity == "warning" for p in long.values())  # still trained on, with the caption cut
    orphans = by_kind(scan)["caption_without_image"]
    assert [p.file.split("/")[-1] for p in orphans] == ["orphan.txt"] and "orphan.png" in orphans[0].message
    assert len(scan.items) == 4

    # with a text encoder configured, the tokenizer counts exactly
    run = load_config(None, ["model.transformer=x", f"model.text_encoder={tiny_dir}/text_encoder", "model.vae=y"])
    count = token_counter(run)
    assert count is not None and count("red " * 600) >= 600
    exact = {p.file.split("/")[-1]: p for p in by_kind(scan_data(cfg, [64], count_tokens=count))["caption_too_long"]}
    assert "words.png" in exact and "estimated" not in exact["words.png"].message


def test_upscale_only_when_allowed_and_per_stage(tmp_path):
    img(tmp_path / "small.png", size=(100, 100))
    (tmp_path / "small.txt").write_text("x")
    img(tmp_path / "big.png", size=(300, 300))
    (tmp_path / "big.txt").write_text("y")
    cfg = DataConfig(datasets=[DatasetConfig(path=str(tmp_path))])
    scan = scan_data(cfg, [64, 256])
    small = next(i for i in scan.items if i.name.endswith("small.png"))
    assert sorted(small.placements) == [64]  # used at 64 px only
    assert by_kind(scan)["too_small"][0].severity == "warning"
    cfg.allow_upscale = True
    assert all(sorted(i.placements) == [64, 256] for i in scan_data(cfg, [64, 256]).items)


def test_fatal_cases(tmp_path):
    scan = scan_data(DataConfig(datasets=[DatasetConfig(path=str(tmp_path / "nope"))]), [64])
    assert scan.fatal and "does not exist" in scan.problems[0].message and "data.datasets[0].path" in scan.problems[0].message
    (tmp_path / "empty").mkdir()
    scan = scan_data(DataConfig(datasets=[DatasetConfig(path=str(tmp_path / "empty"))]), [64])
    assert scan.fatal and by_kind(scan)["empty_dataset"]
    assert scan_data(DataConfig(), [64]).fatal
    with pytest.raises(UserError, match="data.crop"):
        scan_data(DataConfig(datasets=[DatasetConfig(path=str(tmp_path))], crop="middle"), [64])
    with pytest.raises(UserError, match="background"):
        scan_data(DataConfig(datasets=[DatasetConfig(path=str(tmp_path))], background="blurple"), [64])


def test_validation_holdout(tmp_path):
    for k in range(10):
        img(tmp_path / f"{k}.png", colour=(k, k, k))
    cfg = DataConfig(datasets=[DatasetConfig(path=str(tmp_path), default_caption="c")], validation_images=3)
    held = [i.id for i in scan_data(cfg, [64]).items if i.split == "validation"]
    assert len(held) == 3 and held == [i.id for i in scan_data(cfg, [64]).items if i.split == "validation"]
    cfg.validation_images = 0.2
    assert sum(i.split == "validation" for i in scan_data(cfg, [64]).items) == 2


def test_summary_counts_read_as_english(tmp_path):
    img(tmp_path / "only.png")
    cfg = DataConfig(datasets=[DatasetConfig(path=str(tmp_path))])  # no caption: one warning
    summary = scan_data(cfg, [64]).summary()
    assert summary.startswith("1 usable image (") and "1 warning" in summary and "warnings" not in summary
    img(tmp_path / "two.png", colour=(0, 9, 0))
    summary = scan_data(cfg, [64]).summary()
    assert summary.startswith("2 usable images (") and "2 warnings" in summary


def test_imagefolder_metadata_jsonl(tmp_path):
    root = tmp_path / "hf"
    img(root / "x1.png", colour=(1, 1, 1))
    img(root / "x2.png", colour=(2, 2, 2))
    with open(root / "metadata.jsonl", "w") as f:
        f.write(json.dumps({"file_name": "x1.png", "caption": "first"}) + "\n")
        f.write(json.dumps({"file_name": "x2.png", "caption": "second"}) + "\n")
    cfg = DataConfig(datasets=[DatasetConfig(path=str(root), caption_column="caption", trigger_word="t")])
    scan = scan_data(cfg, [64])
    assert not scan.problems
    assert sorted(i.caption for i in scan.items) == ["t, first", "t, second"]
    assert all(i.name.endswith(".png") for i in scan.items)  # messages name the file
    cfg.datasets[0].caption_column = "text"
    scan = scan_data(cfg, [64])
    assert by_kind(scan)["no_caption_column"] and "caption" in by_kind(scan)["no_caption_column"][0].message


def test_dataset_saved_to_disk(tmp_path):
    import datasets

    a = img(tmp_path / "src" / "a.png", colour=(9, 9, 9))
    b = img(tmp_path / "src" / "b.png", size=(30, 30))  # too small
    ds = datasets.Dataset.from_dict({"image": [str(a), str(b)], "text": ["alpha", "beta"]})
    ds = ds.cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "disk"))
    scan = scan_data(DataConfig(datasets=[DatasetConfig(path=str(tmp_path / "disk"))]), [64])
    assert [i.caption for i in scan.items] == ["alpha"]
    assert by_kind(scan)["too_small"]
    # Images stored as bytes inside the arrow files are read from there.
    assert scan.items[0].record.read_bytes() == a.read_bytes()


def test_check_data_cli_exit_codes(tmp_path, capsys):
    from krea2_train.cli import main

    good = tmp_path / "good"
    img(good / "a.png")
    (good / "a.txt").write_text("hello")
    (good / "b.png").write_text("broken")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""
model: {{transformer: x, text_encoder: x, vae: x}}
data:
  datasets: [{{path: {good}}}]
train:
  stages: [{{resolution: 64, steps: 1}}]
cache_dir: {tmp_path / 'cache'}
""")
    assert main(["check-data", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "b.png" in out and "not_image" in out and "1 usable" in out
    assert main(["check-data", str(cfg), "--strict"]) == 1
    assert main(["check-data", str(cfg), f"data.datasets.0.path={tmp_path / 'missing'}"]) == 1
    assert "does not exist" in capsys.readouterr().out


def test_several_datasets_each_with_its_settings(tmp_path):
    img(tmp_path / "a" / "x.png", colour=(1, 1, 1))
    (tmp_path / "a" / "x.txt").write_text("first")
    img(tmp_path / "b" / "x.png", colour=(1, 1, 1))  # same bytes, other dataset: kept (weights differ)
    img(tmp_path / "b" / "y.png", colour=(2, 2, 2))
    cfg = DataConfig(datasets=[DatasetConfig(path=str(tmp_path / "a"), trigger_word="aaa", repeats=1),
                               DatasetConfig(path=str(tmp_path / "b"), trigger_word="bbb", repeats=4,
                                             default_caption="from b", caption_dropout=0.5)])
    items = {i.id: i for i in scan_data(cfg, [64]).items}
    assert set(items) == {"0:x.png", "1:x.png", "1:y.png"}
    assert items["0:x.png"].caption == "aaa, first" and items["1:y.png"].caption == "bbb, from b"
    assert (items["1:y.png"].repeats, items["1:y.png"].caption_dropout) == (4, 0.5)


def test_duplicate_keeps_the_copy_with_a_caption(tmp_path):
    img(tmp_path / "a.png", colour=(9, 9, 9))                       # first, no caption
    img(tmp_path / "b.png", colour=(9, 9, 9))
    (tmp_path / "b.txt").write_text("a grey square")
    img(tmp_path / "c.png", colour=(9, 9, 9))
    (tmp_path / "c.txt").write_text("a later caption")             # captioned too, but after b
    scan = scan_data(DataConfig(datasets=[DatasetConfig(path=str(tmp_path))]), [64])
    assert [(i.name.split("/")[-1], i.caption) for i in scan.items] == [("b.png", "a grey square")]
    dups = by_kind(scan)["duplicate"]
    assert sorted(p.file.split("/")[-1] for p in dups) == ["a.png", "c.png"]
    assert all("b.png" in p.message for p in dups)
    assert "missing_caption" not in by_kind(scan)  # the skipped uncaptioned copy is not reported for its caption
    # Without captions anywhere the first copy wins.
    (tmp_path / "b.txt").unlink()
    (tmp_path / "c.txt").unlink()
    assert [i.name.split("/")[-1] for i in scan_data(DataConfig(datasets=[DatasetConfig(path=str(tmp_path))]),
                                                     [64]).items] == ["a.png"]


def test_too_small_image_gets_no_caption_problem(tmp_path):
    img(tmp_path / "ok.png")
    (tmp_path / "ok.txt").write_text("fine")
    img(tmp_path / "tiny.png", size=(30, 30))                      # no caption and too small: one problem only
    scan = scan_data(DataConfig(datasets=[DatasetConfig(path=str(tmp_path))]), [64])
    tiny = [p for p in scan.problems if p.file.endswith("tiny.png")]
    assert [(p.kind, p.severity) for p in tiny] == [("too_small", "error")]


def test_stage_resolution_without_train_images_is_fatal(tmp_path):
    img(tmp_path / "a.png", size=(300, 200))
    img(tmp_path / "b.png", size=(200, 200), colour=(0, 9, 0))
    cfg = DataConfig(datasets=[DatasetConfig(path=str(tmp_path), default_caption="c")])
    scan = scan_data(cfg, [64, 256])
    assert scan.fatal and scan.counts()["fatal"] == 1
    (fatal,) = [p for p in scan.problems if p.severity == "fatal"]
    assert fatal.kind == "resolution_empty"
    for text in ("256 px", "2 of 2 images", "smallest 200x200", "resolution", "add images",
                 "data.allow_upscale"):
        assert text in fatal.message, text
    assert "fatal" in scan.summary() and "1 fatal" in scan.summary()
    # Usable at 64 px still, and the other stage is fine once upscaling is allowed or the stage is lowered.
    assert all(64 in i.placements for i in scan.items)
    cfg.allow_upscale = True
    assert not scan_data(cfg, [64, 256]).fatal
    cfg.allow_upscale = False
    assert not scan_data(cfg, [64, 192]).fatal
    # Every image too small for every stage: the dataset is empty and the resolution fatal says why.
    scan = scan_data(cfg, [512])
    kinds = by_kind(scan)
    assert kinds["empty_dataset"] and "smallest 200x200" in kinds["resolution_empty"][0].message


def test_aspect_outside_range_warns(tmp_path):
    img(tmp_path / "wide.png", size=(1000, 200))
    (tmp_path / "wide.txt").write_text("a wide strip")
    img(tmp_path / "tall.png", size=(100, 400), colour=(0, 0, 9))
    (tmp_path / "tall.txt").write_text("a tall strip")
    img(tmp_path / "ok.png", size=(150, 100), colour=(0, 9, 0))
    (tmp_path / "ok.txt").write_text("fine")
    cfg = DataConfig(datasets=[DatasetConfig(path=str(tmp_path))])
    scan = scan_data(cfg, [64])
    warned = {p.file.split("/")[-1]: p for p in by_kind(scan)["extreme_aspect"]}
    assert set(warned) == {"wide.png", "tall.png"} and all(p.severity == "warning" for p in warned.values())
    assert "wide.png" in warned["wide.png"].message and "aspect ratio 5 " in warned["wide.png"].message
    assert "data.max_aspect" in warned["wide.png"].message and "data.min_aspect" in warned["tall.png"].message
    assert "0.25" in warned["tall.png"].message
    assert len(scan.items) == 3 and not scan.fatal  # still used
    cfg.min_aspect, cfg.max_aspect = 0.25, 5.0
    assert "extreme_aspect" not in by_kind(scan_data(cfg, [64]))
