"""`krea2-train caption` and `data.auto_caption` on the tiny Qwen3-VL (random weights: junk text, real plumbing).

The reference is transformers' own `Qwen3VLForConditionalGeneration.generate` on inputs built here from the tokenizer
and image processor alone (the Qwen3-VL chat layout written out, `<|image_pad|>` repeated grid.prod() / merge^2
times), so a wrong template, image size, padding, decoding or generation setting in the project shows up as
different tokens.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from krea2_train.data import caption as cap
from krea2_train.data.checks import CAPTION_TOKENS

MAX_PIXELS = 64 * 64
NEW_TOKENS = 12


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def captioner(tiny_dir):
    return cap.Captioner.from_path(tiny_dir / "text_encoder", max_pixels=MAX_PIXELS)


def _images(folder: Path, n: int = 3) -> list[Path]:
    """`n` PNGs of different sizes and content (no captions)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    sizes = [(64, 64), (48, 80), (96, 64), (64, 32), (80, 80)]
    out = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        arr[: h // 2] = (40 * i, 255 - 60 * i, 128)  # a different flat half per image
        path = folder / f"img{i}.png"
        Image.fromarray(arr).save(path)
        out.append(path)
    return out


def _settings(**kw) -> cap.CaptionSettings:
    return cap.CaptionSettings(**{"max_new_tokens": NEW_TOKENS, "max_pixels": MAX_PIXELS, "batch_size": 2, **kw})


def _reference_ids(te_dir: Path, image: Image.Image, instruction: str) -> tuple[list[int], list[int]]:
    """(prompt ids, new ids) from transformers alone: tokenizer + image processor + generate, greedy. (Without
    mm_token_type_ids transformers warns and gives other tokens: the image would sit on a line of text positions.)"""
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen3VLForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(te_dir)
    ip = AutoImageProcessor.from_pretrained(te_dir, size={"shortest_edge": MAX_PIXELS, "longest_edge": MAX_PIXELS})
    model = Qwen3VLForConditionalGeneration.from_pretrained(te_dir, dtype=torch.float32).eval()
    px = ip(images=[image], return_tensors="pt")
    n_image = int(px["image_grid_thw"][0].prod()) // ip.merge_size ** 2
    text = ("<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * n_image + "<|vision_end|>" + instruction
            + "<|im_end|>\n<|im_start|>assistant\n")
    ids = tok(text, return_tensors="pt").input_ids
    eos = [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]
    # M-RoPE places the image tokens on a 2-D grid: the model finds them by mm_token_type_ids (0 text, 1 image)
    types = (ids == tok.convert_tokens_to_ids("<|image_pad|>")).int()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px["pixel_values"],
                             image_grid_thw=px["image_grid_thw"], mm_token_type_ids=types,
                             max_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=eos, pad_token_id=tok.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    end = next((n for n, t in enumerate(new) if t in eos), len(new))
    return ids[0].tolist(), new[:end]


def test_captions_equal_transformers_generate_token_for_token(tiny_dir, tmp_path, captioner):
    te = tiny_dir / "text_encoder"
    paths = _images(tmp_path / "data", 3)
    instruction = cap.instruction_for("style")
    refs = []
    for p in paths:
        image = Image.open(p).convert("RGB")
        prompt_ids, ref = _reference_ids(te, image, instruction)
        inputs = captioner.processor(text=[captioner.chat_text(instruction)], images=[image], return_tensors="pt")
        assert inputs["input_ids"][0].tolist() == prompt_ids  # the same prompt, image tokens included
        assert captioner.generate([image], instruction, NEW_TOKENS)[0] == ref
        refs.append(ref)
    assert len({tuple(r) for r in refs}) > 1  # the answer depends on the image: the comparison can fail
    # what caption_folder writes is the reference decoded, one line, within the budget
    report = cap.caption_folder(tmp_path / "data", te, _settings(preset="style"), captioner=captioner)
    assert len(report.written) == 3 and not report.failed
    for p, ref in zip(paths, refs):
        want = cap.finish_caption(captioner.decode(ref), None, "prefix", captioner.count_tokens, CAPTION_TOKENS)
        assert p.with_suffix(".txt").read_text() == want + "\n"


def test_instruction_changes_the_answer(tiny_dir, tmp_path, captioner):
    image = Image.open(_images(tmp_path / "d", 1)[0]).convert("RGB")
    answers = {name: tuple(captioner.generate([image], cap.instruction_for(name, trigger="k2x"), NEW_TOKENS)[0])
               for name in ("style", "character", "general")}
    assert len(set(answers.values())) > 1


def test_batching_gives_the_same_text_as_one_by_one(tiny_dir, tmp_path, captioner):
    te = tiny_dir / "text_encoder"
    _images(tmp_path / "a", 5)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    cap.caption_folder(tmp_path / "a", te, _settings(batch_size=1), captioner=captioner)
    cap.caption_folder(tmp_path / "b", te, _settings(batch_size=4), captioner=captioner)  # 4 + 1, mixed sizes
    a = {p.name: p.read_text() for p in (tmp_path / "a").glob("*.txt")}
    b = {p.name: p.read_text() for p in (tmp_path / "b").glob("*.txt")}
    assert len(a) == 5 and a == b


def test_interrupted_run_resumes_with_what_is_left(tiny_dir, tmp_path, captioner, monkeypatch):
    te = tiny_dir / "text_encoder"
    paths = _images(tmp_path / "data", 3)
    real = cap.Captioner.generate
    calls = []

    def interrupt_second(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(cap.Captioner, "generate", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        cap.caption_folder(tmp_path / "data", te, _settings(batch_size=1), captioner=captioner)
    monkeypatch.setattr(cap.Captioner, "generate", real)
    first = paths[0].with_suffix(".txt")
    assert first.exists() and not paths[1].with_suffix(".txt").exists()
    assert not [p for p in (tmp_path / "data").iterdir() if p.name.startswith(".")]  # no half-written files
    stamp = first.stat().st_mtime_ns
    report = cap.caption_folder(tmp_path / "data", te, _settings(batch_size=1), captioner=captioner)
    assert sorted(Path(f).name for f, _ in report.written) == ["img1.txt", "img2.txt"]
    assert [Path(f).name for f in report.kept] == ["img0.txt"] and first.stat().st_mtime_ns == stamp


def test_existing_captions_are_kept_unless_overwrite(tiny_dir, tmp_path, captioner):
    te = tiny_dir / "text_encoder"
    paths = _images(tmp_path / "data", 3)
    paths[0].with_suffix(".txt").write_text("my own words")
    paths[1].with_suffix(".txt").write_text("  \n")  # empty: counts as no caption
    report = cap.caption_folder(tmp_path / "data", te, _settings(), captioner=captioner)
    assert paths[0].with_suffix(".txt").read_text() == "my own words"
    assert sorted(Path(f).name for f, _ in report.written) == ["img1.txt", "img2.txt"]
    report = cap.caption_folder(tmp_path / "data", te, _settings(), captioner=captioner, overwrite=True)
    assert len(report.written) == 3 and paths[0].with_suffix(".txt").read_text() != "my own words"


def test_corrupt_image_is_reported_and_skipped(tiny_dir, tmp_path, captioner):
    te = tiny_dir / "text_encoder"
    paths = _images(tmp_path / "data", 2)
    bad = tmp_path / "data" / "broken.png"
    bad.write_bytes(paths[0].read_bytes()[:120])  # truncated PNG
    report = cap.caption_folder(tmp_path / "data", te, _settings(batch_size=3), captioner=captioner)
    assert [Path(i).name for i, _ in report.failed] == ["broken.png"] and "broken.png" in report.failed[0][1]
    assert not bad.with_suffix(".txt").exists() and len(report.written) == 2
    assert "failed: " in report.summary() and "broken.png" in report.summary()


def test_trigger_word_and_token_budget(captioner):
    count = captioner.count_tokens
    long = " ".join(["A red circle lies on a blue background near a small green square."] * 120)
    assert count(long) > CAPTION_TOKENS
    out = cap.finish_caption(long, "k2style", "prefix", count, CAPTION_TOKENS)
    assert count(out) <= CAPTION_TOKENS and out.startswith("k2style, A red") and out.endswith(".")
    assert count(out) > CAPTION_TOKENS - 40  # cut at the last sentence that fits, not far before
    # named by the model already (subject presets): not added again; newlines become one line
    assert cap.finish_caption("k2char stands\nin a field", "k2char", "subject", count, 507) == "k2char stands in a field"
    assert cap.finish_caption("a person stands", "k2char", "subject", count, 507) == "k2char, a person stands"
    assert "k2char" in cap.instruction_for("character", trigger="k2char")
    assert '"the person"' in cap.instruction_for("character")
    assert cap.instruction_for("product", trigger="k2p") == cap.instruction_for("object", trigger="k2p")
    assert cap.instruction_for("general", "Say what {trigger} does.", "k2x") == "Say what k2x does."
    with pytest.raises(cap.CaptionError, match="--trigger"):
        cap.instruction_for("general", "Say what {trigger} does.")


def test_folders_that_cannot_caption_are_refused_naming_the_fix(tiny_dir, tmp_path):
    single = tmp_path / "qwen3vl_4b_fp8_scaled.safetensors"
    single.write_bytes(b"x")
    with pytest.raises(cap.CaptionError, match="no vision tower") as exc:
        cap.check_caption_folder(single)
    assert str(single) in str(exc.value) and "Qwen3-VL-4B-Instruct folder" in str(exc.value)
    te = tmp_path / "te"
    shutil.copytree(tiny_dir / "text_encoder", te)
    (te / "preprocessor_config.json").unlink()
    (te / "chat_template.json").unlink()
    with pytest.raises(cap.CaptionError, match=r"missing preprocessor_config.json, chat_template.json"):
        cap.check_caption_folder(te)


def test_text_only_folder_is_refused_and_enable_captioning_fixes_it(tmp_path):
    """A Qwen3-VL folder without the vision tokens and processor files (the micro text encoder as pretraining
    writes it): a clear refusal, and enable_captioning (what micro.assemble ships) writes a copy that captions, its
    language model rows unchanged. The shipped micro text encoder captions."""
    from transformers import Qwen3VLForConditionalGeneration

    from krea2_train.data import world
    from krea2_train.models import micro
    from krea2_train.models.tiny import enable_captioning

    model, tokenizer = micro.build_text_encoder(world.WORDS)
    text_only = tmp_path / "text_only"
    model.to(torch.bfloat16).save_pretrained(text_only, safe_serialization=True)
    tokenizer.save_pretrained(text_only)
    with pytest.raises(cap.CaptionError, match="missing preprocessor_config.json"):
        cap.Captioner.from_path(text_only)
    copy = enable_captioning(text_only, tmp_path / "te")
    image = Image.open(_images(tmp_path / "d", 1)[0]).convert("RGB")
    for folder in (copy, Path(micro.WEIGHTS_DIR) / "text_encoder"):
        c = cap.Captioner.from_path(folder, max_pixels=MAX_PIXELS)
        assert len(c.generate([image], "Describe the image.", 4)[0]) <= 4
    a = Qwen3VLForConditionalGeneration.from_pretrained(text_only).get_input_embeddings().weight
    b = Qwen3VLForConditionalGeneration.from_pretrained(copy).get_input_embeddings().weight
    assert b.dtype == torch.bfloat16 and torch.equal(a, b[: a.shape[0]])


def test_caption_cache_reuses_same_settings_and_redoes_changed(tiny_dir, tmp_path, captioner, monkeypatch):
    te = tiny_dir / "text_encoder"
    paths = _images(tmp_path / "data", 2)
    cache = tmp_path / "cache"
    first = cap.caption_folder(tmp_path / "data", te, _settings(), cache_dir=cache, captioner=captioner)
    assert first.cached == 0 and len(first.written) == 2
    for p in paths:
        p.with_suffix(".txt").unlink()
    monkeypatch.setattr(cap.Captioner, "from_path", lambda *a, **k: pytest.fail("model loaded"))
    again = cap.caption_folder(tmp_path / "data", te, _settings(), cache_dir=cache)  # nothing to generate
    assert again.cached == 2 and again.written == first.written
    # another preset is another key: generated anew (the captioner given, since loading is blocked)
    other = cap.caption_folder(tmp_path / "data", te, _settings(preset="style"), cache_dir=cache, overwrite=True,
                               captioner=captioner)
    assert other.cached == 0 and len(other.written) == 2
    k1 = cap.caption_key("abc", _settings(), "m")
    assert k1 != cap.caption_key("abc", _settings(trigger="t"), "m") != cap.caption_key("abc", _settings(), "m2")
    assert k1 != cap.caption_key("abc", _settings(max_new_tokens=NEW_TOKENS + 1), "m")


def test_cli_caption_dir_dry_run_then_write(tiny_dir, tmp_path, capsys):
    from krea2_train.cli import main

    paths = _images(tmp_path / "data", 2)
    te = tiny_dir / "text_encoder"
    common = ["--model", str(te), "--max-new-tokens", "6", "--max-pixels", str(MAX_PIXELS),
              f"cache_dir={tmp_path / 'cache'}"]
    assert main(["caption", str(tmp_path / "data"), "--dry-run", "--trigger", "k2demo", *common]) == 0
    out = capsys.readouterr().out
    assert "would write 2" in out and "img0.txt: k2demo, " in out
    assert not list((tmp_path / "data").glob("*.txt"))
    assert main(["caption", str(tmp_path / "data"), "--preset", "character", "--trigger", "k2demo", *common]) == 0
    out, err = capsys.readouterr()
    assert "captioning: 100%" in err and "img/s]" in err and "<00:00" in err  # tqdm: progress, rate, ETA
    assert "wrote 2" in out and all(p.with_suffix(".txt").read_text().startswith("k2demo") for p in paths)
    report = json.loads((tmp_path / "cache" / "captions" / "report.json").read_text())
    assert len(report["written"]) == 2 and report["max_tokens"] <= CAPTION_TOKENS
    # a folder without a model to caption with: the error shows what to type
    assert main(["caption", str(tmp_path / "data")]) == 2
    assert "--model /models/Qwen3-VL-4B-Instruct" in capsys.readouterr().err


def test_bf16_on_gpu_float32_on_cpu():
    assert cap.resolve_dtype("auto", "cuda") == torch.bfloat16 and cap.resolve_dtype("auto", "cpu") == torch.float32
    assert cap.resolve_dtype("float16", "cuda") == torch.float16


def test_caption_config_keys_are_checked():
    from krea2_train.config import load_config
    from krea2_train.config.choices import ConfigError

    base = {"data": {"datasets": [{"path": "x"}]}, "model": {"transformer": "", "text_encoder": "", "vae": ""}}
    with pytest.raises(ConfigError, match="data.caption.preset.*Did you mean `style`"):
        load_config(None, ["data.caption.preset=styel"], base=base, warn_paths=False)
    with pytest.raises(Exception, match="data.caption.max_pixels"):
        load_config(None, ["data.caption.max_pixels=100"], base=base, warn_paths=False)
    cfg = load_config(None, ["data.auto_caption=true", "data.caption.preset=product"], base=base, warn_paths=False)
    assert cfg.data.auto_caption and cfg.data.caption.preset == "product"


def test_non_folder_dataset_is_refused(tmp_path):
    from krea2_train.config import load_config

    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "metadata.jsonl").write_text("")
    base = {"data": {"datasets": [{"path": str(tmp_path / "ds")}]},
            "model": {"transformer": "", "text_encoder": "", "vae": ""}}
    cfg = load_config(None, [], base=base, warn_paths=False)
    with pytest.raises(cap.CaptionError, match=r"data.datasets\[0\].*imagefolder"):
        cap.caption_datasets(cfg.data, "unused", tmp_path / "cache")


@pytest.mark.slow
def test_two_processes_split_the_work(tiny_dir, tmp_path):
    """Under accelerate launch each process captions its share; every image gets one caption, the report all."""
    _images(tmp_path / "data", 5)
    accelerate = Path(sys.executable).parent / "accelerate"
    config = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "cpu_ddp.yaml"
    cmd = [str(accelerate), "launch", "--config_file", str(config), "--main_process_port", "29517", "-m",
           "krea2_train.cli", "caption", str(tmp_path / "data"), "--model", str(tiny_dir / "text_encoder"),
           "--max-new-tokens", "4", "--max-pixels", str(MAX_PIXELS), f"cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("captions: wrote 5") == 1, proc.stdout
    assert len(list((tmp_path / "data").glob("*.txt"))) == 5
    report = json.loads((tmp_path / "cache" / "captions" / "report.json").read_text())
    assert sorted(Path(w["file"]).name for w in report["written"]) == [f"img{i}.txt" for i in range(5)]


def test_micro_pipeline_with_auto_caption_end_to_end(tmp_path, capsys):
    """`krea2-train CONFIG` on the shipped micro model with `data.auto_caption: true` and a folder of uncaptioned
    images: captions written (trigger word first), then check-data, cache and a 2-step training run; a re-run
    captions nothing. (The micro text encoder captions through an enable_captioning copy until it ships with the
    processor files.)"""
    from krea2_train.cli import main
    from krea2_train.models.micro import WEIGHTS_DIR
    from krea2_train.models.tiny import enable_captioning

    data = tmp_path / "data"
    data.mkdir()
    for png in sorted((Path(__file__).resolve().parents[1] / "datasets" / "demo").glob("*.png"))[:4]:
        shutil.copy(png, data / png.name)  # images only
    micro_te = Path(WEIGHTS_DIR) / "text_encoder"
    te = micro_te if (micro_te / "preprocessor_config.json").exists() else enable_captioning(micro_te, tmp_path / "te")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"""
model: {{models: micro, dtype: float32}}
data:
  datasets: [{{path: {data}, trigger_word: k2demo}}]
  num_workers: 0
  auto_caption: true
  caption: {{model: {te}, preset: style, max_new_tokens: 8, max_pixels: {MAX_PIXELS}}}
lora: {{rank: 4}}
train: {{mixed_precision: "no", stages: [{{resolution: 128, steps: 2, batch_size: 2}}]}}
checkpoint: {{every_steps: 0}}
validation: {{every_steps: 0}}
preview: {{every_steps: 0, prompts: []}}
logging: {{progress: none, tensorboard: false}}
export: {{formats: [], verify: false, transfer_report: false}}
output_dir: {tmp_path}/runs
run_name: cap
cache_dir: {tmp_path}/cache
""")
    assert main([str(cfg)]) == 0
    out = capsys.readouterr().out
    captions = {p.name: p.read_text().strip() for p in data.glob("*.txt")}
    assert len(captions) == 4 and all(c.startswith("k2demo, ") for c in captions.values()), captions
    assert "captions: wrote 4" in out and "check-data: 4 " in out and "train: 2 steps" in out
    report = json.loads((tmp_path / "runs" / "cap" / "caption_report.json").read_text())
    assert len(report["written"]) == 4 and not report["failed"]
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert sorted(i["caption"] for i in manifest["items"]) == sorted(captions.values())  # trained on them
    assert (tmp_path / "runs" / "cap" / "adapter" / "adapter_model.safetensors").exists()
    assert main([str(cfg)]) == 0
    assert "caption: every image has a caption (4), skipped" in capsys.readouterr().out
