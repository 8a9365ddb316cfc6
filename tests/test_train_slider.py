"""Concept sliders (train.mode: slider, train/slider.py): the loss is the stated objective, computed independently
with the adapter disabled and negated by hand; the trainer trains, resumes and previews a slider; config mistakes
name their key; an exported slider keeps its sign in ComfyUI's reading."""

import json

import pytest
import torch
from safetensors.torch import load_file

from krea2_train.config import load_config
from krea2_train.config.choices import ConfigError
from krea2_train.train.slider import adapter_scale, slider_step
from krea2_train.train.trainer import Trainer

SLIDER = ("{target: 'a photo of a cat', positive: 'a very detailed photo of a cat', "
          "negative: 'a blurry photo of a cat', anchors: ['a photo of a dog', 'a photo of a tree'], guidance: 1.5, "
          "anchor_weight: 0.7}")


def slider_cfg(tiny_dir, out, *overrides):
    base = [
        f"model.transformer={tiny_dir}/transformer_raw.safetensors", f"model.text_encoder={tiny_dir}/text_encoder",
        f"model.vae={tiny_dir}/vae", "model.dtype=float32", "train.mixed_precision=no", "train.mode=slider",
        f"train.sliders=[{SLIDER}]", "train.stages=[{resolution: 64, steps: 4, batch_size: 2}]", "optimizer.lr=2e-3",
        f"output_dir={out}", "run_name=run", "checkpoint.every_steps=2", "logging.progress=none",
        "logging.tensorboard=false", "lora.rank=4", "memory.gradient_checkpointing=false",
        f"cache_dir={out}/cache", "export.formats=[]",
    ]
    return load_config(None, base + list(overrides))


# ------------------------------------------------------------------------------------------- the objective itself
def _tiny_with_lora(tiny_dir):
    from krea2_train.config.sections import LoraSection
    from krea2_train.models.loading import load_transformer
    from krea2_train.train.lora import add_lora

    torch.manual_seed(0)
    model = load_transformer(f"{tiny_dir}/transformer_raw.safetensors", dtype="float32")
    add_lora(model, LoraSection(rank=4, init="gaussian", targets="attention_mlp"), seed=3)
    with torch.no_grad():  # PEFT's gaussian init leaves B at zero: give the LoRA a real effect at both signs
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def _call(model, xt, sigmas, text):
    from krea2_train.schedule import position_ids

    pos = position_ids(text.shape[1], 4, 4)
    return model(hidden_states=xt, encoder_hidden_states=text, timestep=sigmas, position_ids=pos,
                 return_dict=False)[0].float()


def _independent(model, xt, sigmas, batch, weights):
    """The module docstring's objective, with the adapter switched off by PEFT's own switch and -1 made by negating
    every lora_B by hand (nothing of train/slider.py is used)."""
    g, wa = batch["guidance"], batch["anchor_weight"]
    mse = lambda a, b: ((a - b) ** 2).mean(dim=(1, 2))  # noqa: E731
    with torch.no_grad():
        model.disable_adapters()
        v_t, v_p, v_n = (_call(model, xt, sigmas, batch[k]) for k in ("target", "positive", "negative"))
        v_a = _call(model, xt, sigmas, batch["anchor"]) if batch["anchor"] is not None else None
        model.enable_adapters()
        out = {}
        for sign in (1.0, -1.0):
            bs = [p for n, p in model.named_parameters() if "lora_B" in n]
            if sign < 0:
                for p in bs:
                    p.neg_()
            per = mse(_call(model, xt, sigmas, batch["target"]), v_t + sign * g * (v_p - v_n))
            if v_a is not None:
                per = per + wa * mse(_call(model, xt, sigmas, batch["anchor"]), v_a)
            out[sign] = float((per * weights).mean())
            if sign < 0:
                for p in bs:
                    p.neg_()
    return out


@pytest.mark.parametrize("with_anchor", [True, False])
def test_slider_loss_equals_the_objective_computed_independently(tiny_dir, with_anchor):
    model = _tiny_with_lora(tiny_dir)
    gen = torch.Generator().manual_seed(1)
    b, d = 2, model.config.text_hidden_dim
    text = lambda n: torch.randn(b, n, 12, d, generator=gen)  # noqa: E731
    batch = {"target": text(5), "positive": text(7), "negative": text(6), "anchor": text(4) if with_anchor else None,
             "guidance": 1.5, "anchor_weight": 0.7}
    xt = torch.randn(b, 16, 64, generator=gen)
    sigmas = torch.tensor([0.3, 0.8])
    weights = torch.tensor([1.0, 0.5])
    parts = []

    def run_part(fn, context):
        with context:
            loss = fn()
            loss.backward()  # the gradient must reach the LoRA at both signs
        parts.append(float(loss.detach()))
        return loss.detach()

    total = slider_step(lambda t, grad: _call(model, xt, sigmas, t), model, batch, weights, run_part)
    want = _independent(model, xt, sigmas, batch, weights)
    assert parts == pytest.approx([want[1.0], want[-1.0]], rel=1e-5, abs=1e-9)
    assert float(total) == pytest.approx(want[1.0] + want[-1.0], rel=1e-5)
    assert want[1.0] != pytest.approx(want[-1.0], rel=1e-3)  # the two signs are different problems
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert all(g_ is not None for g_ in grads) and sum(float(g_.abs().sum()) for g_ in grads) > 0
    # the scales are back: the model at scale 1 is the trained adapter again
    scales = {m.scaling["default"] for m in model.modules() if isinstance(getattr(m, "scaling", None), dict)
              and "default" in m.scaling}
    assert scales == {1.0}


def _scaled_outputs(model, seed: int, sigma: float):
    """(base with adapters disabled, adapter scale 0, scale 1, scale -1, scale 1 with every lora_B negated by hand)
    outputs of `model` for one seeded input; the last one leaves lora_B negated."""
    gen = torch.Generator().manual_seed(seed)
    xt, text, sig = (torch.randn(1, 16, 64, generator=gen), torch.randn(1, 5, 12, 32, generator=gen),
                     torch.tensor([sigma]))
    with torch.no_grad():
        model.disable_adapters()
        base = _call(model, xt, sig, text)
        model.enable_adapters()
        with adapter_scale(model, 0.0):
            zero = _call(model, xt, sig, text)
        plus = _call(model, xt, sig, text)
        with adapter_scale(model, -1.0):
            minus = _call(model, xt, sig, text)
        for n, p in model.named_parameters():  # -1 by hand: every lora_B negated
            if "lora_B" in n:
                p.neg_()
        by_hand = _call(model, xt, sig, text)
    return base, zero, plus, minus, by_hand


def test_adapter_scale_zero_is_the_base_and_minus_one_flips_the_delta(tiny_dir):
    base, zero, plus, minus, by_hand = _scaled_outputs(_tiny_with_lora(tiny_dir), seed=2, sigma=0.5)
    assert torch.equal(zero, base)
    assert float((plus - base).norm()) > 1e-3
    assert torch.allclose(minus, by_hand, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(minus, plus, atol=1e-4)


@pytest.mark.parametrize("preset", ["80gb", "48gb", "24gb", "16gb"])
def test_adapter_scale_under_every_memory_preset(tiny_dir, preset):
    """Fused q/k/v, int8 / NF4 bases, checkpointing and offload read the LoRA scale at each call: scale 0 is the base
    exactly and -1 is every lora_B negated, in every memory preset (what a slider step relies on)."""
    from krea2_train.config import resolve_memory_settings
    from krea2_train.runtime import memory

    model = _tiny_with_lora(tiny_dir)
    memory.apply_memory_settings(model, resolve_memory_settings(dict(preset=preset, compile=False)), "cpu")
    model.eval()  # checkpointing and offload hooks stay in place; eval only skips dropout (there is none)
    base, zero, plus, minus, by_hand = _scaled_outputs(model, seed=4, sigma=0.4)
    assert torch.allclose(zero, base, atol=1e-6, rtol=0)
    assert float((plus - base).norm()) > 1e-3
    assert torch.allclose(minus, by_hand, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------- the trainer
def test_slider_run_with_anchors_and_images_trains_and_resumes_like_straight(tiny_dir, tmp_path, one_torch_thread):
    from PIL import Image

    images = tmp_path / "start"
    images.mkdir()
    for i, colour in enumerate(("red", "blue")):
        Image.new("RGB", (80, 64), colour).save(images / f"{i}.png")
    with_images = (f"train.sliders=[{SLIDER}, {{target: 'a house', positive: 'a big house', negative: "
                   f"'a small house', images: {images}}}]")
    straight = Trainer(slider_cfg(tiny_dir, tmp_path / "a", with_images))
    res = straight.run()
    assert res.step == 4 and len(res.history) == 4 and all(v > 0 for _, v in res.history)
    want = load_file(str(res.adapter_dir / "adapter_model.safetensors"))
    assert any(float(v.abs().sum()) > 0 for k, v in want.items() if "lora_B" in k)  # it learnt something

    cfg = slider_cfg(tiny_dir, tmp_path / "b", with_images)
    first = Trainer(cfg)
    first.on_step = lambda t, step: t.request_stop() if step == 2 else None
    assert first.run().interrupted
    got = Trainer(cfg).run()
    assert got.step == 4
    resumed = load_file(str(got.adapter_dir / "adapter_model.safetensors"))
    for k in want:
        assert torch.equal(resumed[k], want[k]), k

    # the slider prompts went through the text cache: a second run encodes nothing (no text encoder needed)
    cached = sorted((tmp_path / "a" / "cache" / "text").rglob("*.safetensors"))
    assert len(cached) == 8  # 2 targets x 3 prompts + 2 anchors


def test_slider_previews_sweep_strengths_on_turbo_and_raw(tiny_dir, tmp_path, one_torch_thread):
    cfg = slider_cfg(tiny_dir, tmp_path, "train.stages=[{resolution: 64, steps: 1, batch_size: 1}]",
                     f"model.turbo={tiny_dir}/transformer_turbo.safetensors", "preview.prompts=['a photo of a cat']",
                     "preview.resolution=64", "preview.raw_steps=2", "preview.turbo_steps=2")
    Trainer(cfg).run()
    from PIL import Image

    png = cfg.run_dir / "previews" / "step-000001.png"
    with Image.open(png) as im:
        w, h = im.size
    with Image.open(cfg.run_dir / "previews" / "over_steps.png"):
        pass
    assert w >= 5 * 64 and h >= 2 * 64  # five strengths across, a Turbo row and a Raw row


# ------------------------------------------------------------------------------------------------ the config
PATHS = ("model.transformer=r.safetensors", "model.text_encoder=te", "model.vae=vae")


@pytest.mark.parametrize("overrides, key", [
    (["train.mode=slider", "train.sliders=[]"], "train.sliders"),
    (["train.sliders=[{target: a, positive: b, negative: c}]"], "train.sliders"),
    (["train.mode=slider", "train.sliders=[{target: a, positive: b, negative: b}]"], "train.sliders[0].negative"),
    (["train.mode=slider", "train.sliders=[{target: a, positive: b, negative: ''}]"], "train.sliders[0].negative"),
    (["train.mode=slider", "train.sliders=[{target: a, positive: b, negative: c, guidance: 0}]"],
     "train.sliders[0].guidance"),
    (["train.mode=slider", "train.sliders=[{target: a, positive: b, negative: c, images: /no/such/dir}]"],
     "train.sliders[0].images"),
    (["train.mode=slider", "train.sliders=[{target: a, positive: b, negative: c}]", "lora.type=dora",
      "export.formats=[]"], "lora.type"),
    (["train.mode=slide"], "train.mode"),
])
def test_slider_config_mistakes_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [*PATHS, *overrides], warn_paths=False)
    assert f"`{key}`" in str(err.value)


def test_unknown_slider_key_names_the_closest():
    with pytest.raises(ConfigError) as err:
        load_config(None, [*PATHS, "train.mode=slider", "train.sliders=[{target: a, positive: b, negative: c, guidence: 2}]"],
                    warn_paths=False)
    assert "guidance" in str(err.value)


# ------------------------------------------------------------------------------------------------- the export
def test_exported_slider_keeps_its_sign_in_comfyui(tiny_dir, tmp_path):
    """ComfyUI applies strength * up @ down * alpha / rank with nothing clamped: the exported factors must give the
    trained delta, so -1 in ComfyUI is exactly minus the trained delta."""
    from krea2_train.export.export import export_lora
    from krea2_train.lora.consumers import comfyui_reading, comfyui_verdict
    from krea2_train.lora.formats import TrainedAdapter

    gen = torch.Generator().manual_seed(0)
    modules = ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.ff.down"]
    down = {m: torch.randn(4, 32, generator=gen) for m in modules}
    up = {m: -torch.rand(32, 4, generator=gen) for m in modules}  # negative factors too: nothing may take abs()
    trained = TrainedAdapter(down, up, {m: 8.0 for m in modules}, use_rslora=False)
    paths = export_lora(trained, tmp_path, ["comfyui", "diffusers", "civitai"], {}, "slider", dtype="float32")
    for fmt, path in paths.items():
        state = load_file(str(path))
        ok, line = comfyui_verdict(state, trained)
        assert ok, (fmt, line)
        reading = comfyui_reading(state).adapter
        for m in modules:
            # ComfyUI's patch at strength -1 (comfy/lora: weight += strength * alpha / rank * up @ down)
            got = -1.0 * reading.delta(m, torch.float64)
            want = -1.0 * trained.delta(m, torch.float64)
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-7), (fmt, m)
    meta = json.loads((tmp_path / "export.json").read_text())
    assert set(meta["files"]) == {"comfyui", "diffusers", "civitai"}

    # on the tiny Turbo, each file read by krea2-train, diffusers and ComfyUI's rules acts as the trained adapter at -1
    from krea2_train.export.verify import verify_lora_file
    from krea2_train.lora.workflow import workflow_graph
    from krea2_train.models.loading import load_transformer

    turbo = load_transformer(f"{tiny_dir}/transformer_turbo.safetensors", dtype="float32")
    tiny_modules = ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.to_v"]
    width = {m: dict(turbo.named_modules())[m] for m in tiny_modules}
    small = TrainedAdapter({m: torch.randn(4, width[m].in_features, generator=gen) for m in tiny_modules},
                           {m: 0.1 * torch.randn(width[m].out_features, 4, generator=gen) for m in tiny_modules},
                           {m: 2.0 for m in tiny_modules})
    for fmt, path in export_lora(small, tmp_path / "tiny", ["comfyui", "diffusers"], {}, "s", dtype="float32").items():
        report = verify_lora_file(path, adapter=small, transformer=turbo, strength=-1.0, raise_on_failure=False)
        assert report.ok and "comfyui" in report.valid_for, (fmt, report.summary())
    node = workflow_graph("s.safetensors", strength=-1.5)["prompt"]
    assert [n["inputs"]["strength_model"] for n in node.values() if n["class_type"] == "LoraLoaderModelOnly"] == [-1.5]


def test_slider_yaml_runs_end_to_end_on_the_tiny_model(tiny_dir, tmp_path, one_torch_thread):
    """configs/slider.yaml with only the model paths, sizes and steps overridden: train, preview, export, verify and
    the transfer report with its slider section."""
    from pathlib import Path

    from krea2_train.pipeline import run_all

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "slider.yaml", [
        f"model.transformer={tiny_dir}/transformer_raw.safetensors", f"model.turbo={tiny_dir}/transformer_turbo.safetensors",
        f"model.text_encoder={tiny_dir}/text_encoder", f"model.vae={tiny_dir}/vae", "model.dtype=float32",
        "model.architecture=auto", "train.mixed_precision=no", "memory.preset=null", "memory.gradient_checkpointing=false",
        "train.stages=[{resolution: 64, steps: 2, batch_size: 1}]", "optimizer.warmup_steps=0",
        "preview.every_steps=0", "preview.resolution=64", "preview.raw_steps=2", "preview.turbo_steps=2",
        f"output_dir={tmp_path}", f"cache_dir={tmp_path}/cache", "logging.progress=none", "logging.tensorboard=false"])
    assert run_all(cfg) == 0
    export = cfg.run_dir / "export"
    report = json.loads((export / "transfer_report.json").read_text())
    assert [s["target"] for s in report["slider"]] == [s.target for s in cfg.train.sliders]
    for s in report["slider"]:
        assert {"monotonic", "symmetric", "ratio", "suggested_turbo_range", "turbo_effect", "raw_effect"} <= set(s)
    verify = json.loads((export / "verify.json").read_text())
    assert set(verify) == {"diffusers", "comfyui", "civitai"} and all(r["ok"] for r in verify.values())
    assert (cfg.run_dir / "previews" / "step-000002.png").exists()
    assert report["slider_grid"] == "slider_grid.png" and (export / "slider_grid.png").stat().st_size > 1000
