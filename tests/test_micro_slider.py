"""A slider trained on the micro model (configs/demo_slider.yaml: background white vs black, on Raw) moves the
measured attribute monotonically over strengths -2..2 on micro Turbo; the same check fails for an untrained LoRA.

The measure reads only pictures: the mean brightness of a 6 px frame around the image (the background, as
evaluate/prompt_following reads it), over fixed seeds. The micro weights get rebuilt, so the test asserts relative
effects (ordering and a clear move each way), never figures of one model.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from krea2_train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
STRENGTHS = (-2.0, -1.0, 0.0, 1.0, 2.0)
SEEDS = 6
TOLERANCE = 2.0  # brightness units (of 255): seed noise allowed where both ends are already saturated
MIN_MOVE = 5.0  # each direction must move the background at least this much from strength 0


def border_brightness(image, frame: int = 6) -> float:
    a = np.asarray(image.convert("L"), dtype=np.float32)
    return float(np.concatenate([a[:frame].ravel(), a[-frame:].ravel(), a[:, :frame].ravel(),
                                 a[:, -frame:].ravel()]).mean())


def sweep(lora_file, prompt, strengths=STRENGTHS) -> list[float]:
    """Mean background brightness of micro Turbo samples of `prompt` with the LoRA at each strength."""
    from krea2_train.evaluate.prompt_following import sample_images
    from krea2_train.inference import SampleSettings, apply_lora
    from krea2_train.models.micro import load_micro

    turbo, text_encoder, vae = load_micro("turbo")
    name = apply_lora(turbo, str(lora_file), 1.0, "slider")
    out = []
    for s in strengths:
        turbo.set_adapters([name], weights=[float(s)])  # diffusers/PEFT: a negative weight is the other direction
        images = sample_images(turbo, text_encoder, vae, [prompt] * SEEDS, SampleSettings.turbo(height=128, width=128),
                               list(range(SEEDS)))
        out.append(float(np.mean([border_brightness(im) for im in images])))
    return out


def moves_monotonically(values, strengths=STRENGTHS) -> bool:
    """Rises over the strengths (within TOLERANCE) and moves at least MIN_MOVE each way from strength 0."""
    zero = values[strengths.index(0.0)]
    rising = all(b > a - TOLERANCE for a, b in zip(values, values[1:]))
    return rising and values[-1] > zero + MIN_MOVE and values[0] < zero - MIN_MOVE and \
        values[strengths.index(1.0)] > zero and values[strengths.index(-1.0)] < zero


def test_the_check_is_not_vacuous():
    assert moves_monotonically([30, 60, 90, 110, 115])
    assert not moves_monotonically([90, 90, 90, 90, 90])  # an untrained LoRA: B = 0, nothing moves
    assert not moves_monotonically([115, 110, 90, 60, 30])  # the sign flipped
    assert not moves_monotonically([30, 60, 90, 110, 80])  # overshoots and turns back at +2


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_torch_thread):
    import time

    from krea2_train.train.trainer import Trainer

    out = tmp_path_factory.mktemp("slider")
    cfg = load_config(ROOT / "configs" / "demo_slider.yaml", [
        f"output_dir={out}", f"cache_dir={out}/cache", "preview.prompts=[]", "export.formats=[]",
        "logging.progress=none", "checkpoint.every_steps=0"])
    t0 = time.perf_counter()
    result = Trainer(cfg).run()
    return cfg, result.adapter_dir / "adapter_model.safetensors", time.perf_counter() - t0


def test_micro_slider_moves_turbo_monotonically_and_untrained_does_not(trained, tmp_path):
    cfg, lora, seconds = trained
    prompt = cfg.train.sliders[0].target
    values = sweep(lora, prompt)
    print(f"slider trained in {seconds:.1f} s; Turbo background brightness at {STRENGTHS}: "
          f"{[round(v, 1) for v in values]}")
    assert moves_monotonically(values), values

    untrained = {k: (torch.zeros_like(v) if "lora_B" in k else v) for k, v in load_file(str(lora)).items()}
    path = tmp_path / "adapter_model.safetensors"
    save_file(untrained, str(path))
    flat = sweep(path, prompt)
    assert not moves_monotonically(flat), flat
    assert max(flat) - min(flat) < 1e-3  # B = 0: every strength is Turbo itself


def test_micro_slider_transfer_report_reads_the_direction(trained, tmp_path):
    """The transfer report's slider section: Raw moves along the trained direction with the sign of the strength,
    Turbo follows it, and a range is suggested."""
    from krea2_train.export.transfer import transfer_report
    from krea2_train.models.text_encoder import TextEncoder

    cfg, lora, _ = trained
    report = transfer_report(lora, raw_path=cfg.model.transformer, turbo_path=cfg.model.turbo, out_dir=tmp_path,
                             text_encoder=TextEncoder.from_path(cfg.model.text_encoder, dtype="float32"),
                             prompts=[cfg.train.sliders[0].target], height=128, width=128, dtype="float32",
                             slider=cfg.train.sliders)
    (section,) = report["slider"]
    raw, turbo = section["raw_effect"], section["turbo_effect"]
    assert raw["+1"] > 0 > raw["-1"] and raw["+2"] > raw["+1"] and raw["-2"] < raw["-1"]
    assert turbo["+1"] > 0 > turbo["-1"]
    assert section["ratio"] is not None and section["ratio"] > 0
    assert section["suggested_turbo_range"] is not None
    assert "slider 0" in report["reading"]
