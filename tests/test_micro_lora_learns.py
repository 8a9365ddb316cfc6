"""A LoRA trained on the shipped micro Krea 2's Raw learns the demo posters' style and carries it to Turbo.

Measured with the package's style score (evaluate/style.py: palette, ink, outlines, texture of the pictures), on
Turbo samples of prompts the LoRA was not trained on, without and with the LoRA. The same short run on the wrong
images (the micro world's own flat shapes) or at a learning rate of ~0 must not move Turbo toward the posters:
the check can fail, and it is the training that moves it, not loading any LoRA.
"""

from pathlib import Path

import pytest
import torch

from krea2_train.cli import main

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["k2demo, a mustard circle and a navy bar, flat bauhaus poster",
           "k2demo, a teal triangle at the right, flat bauhaus poster",
           "k2demo, a red square at the top, a navy circle, flat bauhaus poster",
           "k2demo, a navy half circle, a mustard square, flat bauhaus poster"]
SEEDS = (11, 12)
STEPS = 150

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def _config(tmp_path, data: Path, lr: float) -> Path:
    text = f"""
model: {{models: micro, dtype: float32}}
data:
  datasets: [{{path: {data}, trigger_word: k2demo, caption_dropout: 0.1}}]
  validation_images: 0
  num_workers: 0
  flip: true
lora: {{rank: 16, targets: attention_mlp}}
train:
  mixed_precision: "no"
  stages: [{{resolution: 128, steps: {STEPS}, batch_size: 4}}]
optimizer: {{name: adamw, lr: {lr}, scheduler: cosine, warmup_steps: 20}}
checkpoint: {{every_steps: 1000}}
validation: {{every_steps: 0}}
preview: {{every_steps: 0}}
logging: {{progress: none, tensorboard: false}}
export: {{formats: [], verify: false, transfer_report: false}}
output_dir: {tmp_path}/runs
run_name: lora
cache_dir: {tmp_path}/cache
seed: 7
"""
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def _world_images(folder: Path) -> Path:
    """16 images of the micro world, captioned like the posters (trigger word first): the wrong training set."""
    from krea2_train.data import world

    folder.mkdir(parents=True)
    for i in range(16):
        image, caption, _ = world.world_item(99, i)
        image.save(folder / f"world_{i:02d}.png")
        (folder / f"world_{i:02d}.txt").write_text(f"k2demo, {caption}, flat bauhaus poster")
    return folder


@pytest.fixture(scope="module")
def micro_turbo():
    from krea2_train.models.micro import load_micro

    return load_micro("turbo")


def _turbo_images(parts, adapter=None):
    from krea2_train.evaluate.prompt_following import sample_images
    from krea2_train.inference import SampleSettings, apply_lora

    transformer, text_encoder, vae = parts
    settings = SampleSettings.turbo(height=128, width=128)
    prompts = [p for p in PROMPTS for _ in SEEDS]
    seeds = [s for _ in PROMPTS for s in SEEDS]
    if adapter is None:
        return sample_images(transformer, text_encoder, vae, prompts, settings, seeds)
    name = apply_lora(transformer, str(adapter), strength=1.0, adapter_name="under_test")
    try:
        return sample_images(transformer, text_encoder, vae, prompts, settings, seeds)
    finally:
        transformer.delete_adapters([name])


@pytest.fixture(scope="module")
def adapters():
    return {}  # {training: adapter file}, filled by `closures`


@pytest.fixture(scope="module")
def closures(tmp_path_factory, micro_turbo, adapters):
    """{training: share of Turbo's style gap to the posters that the LoRA closes at strength 1}."""
    from krea2_train.evaluate.style import StyleReference

    reference = StyleReference.from_folder(ROOT / "datasets" / "demo")
    with torch.no_grad():
        base = _turbo_images(micro_turbo)
    out = {}
    for name, lr, data in (("posters", 2e-3, ROOT / "datasets" / "demo"), ("zero_lr", 1e-12, ROOT / "datasets" / "demo"),
                           ("wrong_images", 2e-3, None)):
        tmp = tmp_path_factory.mktemp(name)
        data = data or _world_images(tmp / "world")
        assert main([str(_config(tmp, data, lr))]) == 0
        adapter = adapters[name] = tmp / "runs" / "lora" / "adapter" / "adapter_model.safetensors"
        with torch.no_grad():
            out[name] = reference.closure(base, _turbo_images(micro_turbo, adapter))
    print("style gap closed on Turbo:", {k: round(v, 3) for k, v in out.items()})
    return out


def test_posters_move_turbo_toward_the_style(closures):
    assert closures["posters"] >= 0.5, closures  # issue 18's target: half of Turbo's gap (measured 0.66)


def test_zero_learning_rate_moves_nothing(closures):
    assert abs(closures["zero_lr"]) < 0.05, closures


def test_wrong_images_do_not_teach_the_style(closures):
    assert closures["wrong_images"] < 0.25, closures  # measured 0.07


def test_suggested_turbo_strength_is_where_turbo_looks_like_raw(closures, adapters, tmp_path):
    """Issue 18's check of the transfer report: its suggested Turbo strength against the strength at which Turbo's
    pictures reach Raw + LoRA's style distance to the posters (other seeds, another statistic): within 25%. The
    velocity fit alone missed by 45-68% on the demo LoRA."""
    from krea2_train.export.transfer import transfer_report
    from krea2_train.models.micro import WEIGHTS_DIR as W

    report = transfer_report(adapters["posters"], W / "transformer_raw.safetensors",
                             W / "transformer_turbo.safetensors", tmp_path, text_encoder=W / "text_encoder",
                             vae=W / "vae", prompts=PROMPTS, height=128, width=128, dtype="float32", device="cpu",
                             style_reference=ROOT / "datasets" / "demo")
    style = report["style"]
    print("suggested", report["suggested_turbo_strength"], "velocity fit", report["velocity_fit_strength"],
          "pictures", style["matched_strength"], "error", round(style["suggestion_error"], 3))
    assert report["suggestion_method"] == "look fit (samples)"
    assert style["matched_reached"] and style["suggestion_error"] <= 0.25, style
