"""Transfer report memory: one transformer resident at a time, same numbers whichever way Raw is reached; the
export CLI's --formats/--out; the shared number helper."""

from __future__ import annotations

import gc

import pytest
import torch
from test_export_helpers import trained_adapter

from krea2_train.lora.writers import write_lora_file

PROMPTS, SIGMAS, SIZE, SEED = ["x", "y"], (0.8, 0.3), 32, 0


@pytest.fixture(scope="module")
def lora_file(tiny_dir, tmp_path_factory):
    adapter = trained_adapter(tiny_dir, r=4, alpha=6)
    return write_lora_file(adapter, tmp_path_factory.mktemp("lora") / "l.safetensors", "comfyui", dtype="float32")


def _load(path):
    from krea2_train.models.loading import load_transformer

    return load_transformer(path, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def expected(tiny_dir, lora_file):
    """The report's numbers computed directly: Raw and Turbo loaded separately, side by side (as the old code did)."""
    from krea2_train import facts
    from krea2_train.export.transfer import STRENGTH_RANGE, _cos, _deltas, _fit, _noisy_inputs

    raw, turbo = _load(tiny_dir / "transformer_raw.safetensors"), _load(tiny_dir / "transformer_turbo.safetensors")
    cfg = turbo.config
    embeds = torch.randn(len(PROMPTS), 8, cfg.num_text_layers, cfg.text_hidden_dim,
                         generator=torch.Generator().manual_seed(SEED + 1))
    grid = (SIZE // facts.PIXEL_MULTIPLE, SIZE // facts.PIXEL_MULTIPLE)
    x0 = torch.randn(len(PROMPTS), grid[0] * grid[1], cfg.in_channels, generator=torch.Generator().manual_seed(SEED))
    inputs = _noisy_inputs(x0, SIGMAS, SEED + 2)
    d_turbo = _deltas(turbo, str(lora_file), [1.0], inputs, embeds, None, grid)[1.0]
    d_raw = _deltas(raw, str(lora_file), [1.0], inputs, embeds, None, grid)[1.0]
    s1 = min(max(_fit(d_turbo, d_raw), STRENGTH_RANGE[0]), STRENGTH_RANGE[1])
    d_s1 = _deltas(turbo, str(lora_file), [s1], inputs, embeds, None, grid)[s1]
    s2 = min(max(s1 * _fit(d_s1, d_raw), STRENGTH_RANGE[0]), STRENGTH_RANGE[1])
    flat = (lambda ds: torch.cat([d.flatten() for d in ds]))
    return {"ratio": flat(d_turbo).norm().item() / flat(d_raw).norm().item(),
            "cosine": _cos(flat(d_turbo), flat(d_raw)),
            "first_fit_strength": round(s1, 3), "suggested_turbo_strength": round(s2, 3),
            "per_sigma": [{"raw_delta_norm": r.norm().item(), "turbo_delta_norm": t.norm().item(),
                           "cosine": _cos(t, r), "cosine_at_suggested": _cos(d, r)}
                          for r, t, d in zip(d_raw, d_turbo, d_s1)]}


class _Watch:
    """Counts live Krea2Transformer2DModel instances at every transformer call and every load."""

    def __init__(self, monkeypatch):
        import krea2_train.inference as inference
        import krea2_train.models.loading as loading

        self.loads, self.peak = 0, 0
        gc.collect()
        self.baseline = self.alive()
        real_predict, real_load = inference.predict_velocity, loading.load_transformer

        def predict(*a, **kw):
            self.peak = max(self.peak, self.alive() - self.baseline)
            return real_predict(*a, **kw)

        def load(*a, **kw):
            self.loads += 1
            self.peak = max(self.peak, self.alive() - self.baseline)
            model = real_load(*a, **kw)
            self.peak = max(self.peak, self.alive() - self.baseline)
            return model

        monkeypatch.setattr(inference, "predict_velocity", predict)
        monkeypatch.setattr(loading, "load_transformer", load)

    @staticmethod
    def alive() -> int:
        from diffusers import Krea2Transformer2DModel

        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, Krea2Transformer2DModel))


def _check(report, expected):
    for key in ("ratio", "cosine"):
        assert report[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
    for key in ("first_fit_strength", "suggested_turbo_strength"):
        assert report[key] == expected[key], key
    for row, exp in zip(report["per_sigma"], expected["per_sigma"], strict=True):
        for key, v in exp.items():
            assert row[key] == pytest.approx(v, rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("mode", ["paths", "loaded_turbo_with_path", "loaded_turbo_only", "quantised_paths",
                                  "quantised_loaded_turbo"])
def test_transfer_report_one_transformer_at_a_time_same_numbers(mode, tiny_dir, lora_file, expected, tmp_path,
                                                                monkeypatch):
    """Every way of reaching Raw gives the directly computed numbers; Turbo's weights come back exactly; and with
    Turbo's checkpoint known, one transformer only ever exists (its base weights are swapped to Raw and back)."""
    import krea2_train.runtime.swap as swap
    from krea2_train.export.transfer import transfer_report

    raw_path, turbo_path = tiny_dir / "transformer_raw.safetensors", tiny_dir / "transformer_turbo.safetensors"
    loaded = mode in ("loaded_turbo_with_path", "loaded_turbo_only", "quantised_loaded_turbo")
    turbo = _load(turbo_path) if loaded else turbo_path
    before = {k: v.clone() for k, v in turbo.state_dict().items()} if loaded else None
    if mode.startswith("quantised"):
        def refuse(*a, **kw):
            raise TypeError("the base weights are quantised; they cannot be swapped in place")

        monkeypatch.setattr(swap, "copy_base_weights", refuse)
    watch = _Watch(monkeypatch)
    report = transfer_report(lora_file, raw_path, turbo, tmp_path, turbo_path=turbo_path if mode != "loaded_turbo_only"
                             else None, prompts=PROMPTS, sigmas=SIGMAS, height=SIZE, width=SIZE, seed=SEED,
                             dtype="float32", device="cpu")
    _check(report, expected)
    assert report["reading"].endswith(f"suggested Turbo strength {report['suggested_turbo_strength']:.2f}")
    if mode == "paths":  # Turbo loaded once, Raw reached by swapping weights: never a second model
        assert watch.loads == 1 and watch.peak == 1
    elif mode == "loaded_turbo_with_path":
        assert watch.loads == 0 and watch.peak == 0
    elif mode == "quantised_paths":  # Turbo dropped before Raw is loaded, reloaded after
        assert watch.loads == 3 and watch.peak == 1
    else:  # a Turbo the caller holds, not swappable: Raw loaded beside it, Turbo waits on the CPU meanwhile
        assert watch.loads == 1 and watch.peak == 1
    if before is not None:
        after = {k.replace(".base_layer.", "."): v for k, v in turbo.state_dict().items()}  # PEFT wrappers stay
        assert all(torch.equal(after[k], v) for k, v in before.items())
        assert not getattr(turbo, "peft_config", {})


def test_raw_target_is_the_guided_delta(tiny_dir, lora_file, tmp_path):
    """With a text encoder the report fits Turbo to the delta a user sees from Raw under CFG,
    d_cond + g (d_cond - d_empty prompt), computed here by hand from velocities with and without the LoRA."""
    from krea2_train import facts
    from krea2_train.export.transfer import _noisy_inputs, transfer_report
    from krea2_train.inference import SampleSettings, apply_lora, predict_velocity, sample_latents
    from krea2_train.models.text_encoder import TextEncoder
    from krea2_train.schedule import pack_latents

    te = TextEncoder.from_path(tiny_dir / "text_encoder", dtype="float32")
    report = transfer_report(lora_file, tiny_dir / "transformer_raw.safetensors",
                             tiny_dir / "transformer_turbo.safetensors", tmp_path, text_encoder=te, prompts=PROMPTS,
                             sigmas=SIGMAS, height=SIZE, width=SIZE, seed=SEED, dtype="float32", device="cpu",
                             render=False)
    g = facts.RAW_GUIDANCE
    assert report["raw_target"] == f"guided delta, CFG {g:g}"
    raw, turbo = _load(tiny_dir / "transformer_raw.safetensors"), _load(tiny_dir / "transformer_turbo.safetensors")
    embeds, mask = te.encode(PROMPTS)
    empty, empty_mask = te.encode([""] * len(PROMPTS))
    grid = (SIZE // facts.PIXEL_MULTIPLE, SIZE // facts.PIXEL_MULTIPLE)
    x0 = pack_latents(sample_latents(turbo, embeds, mask, SampleSettings.turbo(height=SIZE, width=SIZE, seed=SEED)))
    inputs = _noisy_inputs(x0, SIGMAS, SEED + 2)
    with torch.no_grad():
        plain = [(predict_velocity(raw, x, s, embeds, mask, grid), predict_velocity(raw, x, s, empty, empty_mask, grid))
                 for x, s in inputs]
        apply_lora(raw, str(lora_file), strength=1.0)
        lora = [(predict_velocity(raw, x, s, embeds, mask, grid), predict_velocity(raw, x, s, empty, empty_mask, grid))
                for x, s in inputs]
    for row, (c0, u0), (c1, u1) in zip(report["per_sigma"], plain, lora, strict=True):
        dc, du = c1 - c0, u1 - u0
        guided = dc + g * (dc - du)
        assert row["raw_delta_norm"] == pytest.approx(guided.norm().item(), rel=1e-4)
        assert abs(row["raw_delta_norm"] - dc.norm().item()) > 1e-3 * dc.norm().item()  # not the conditional one


def test_loaded_turbo_is_offloaded_while_raw_runs(tiny_dir, monkeypatch):
    """Without Turbo's checkpoint, the passed-in Turbo leaves the accelerator before Raw is loaded and comes back."""
    import krea2_train.export.transfer as transfer

    turbo = _load(tiny_dir / "transformer_turbo.safetensors")
    moves, seen = [], {}

    def to(device):  # record only: this box may have no accelerator, so Turbo pretends to live on one
        moves.append(str(device))
        return turbo

    monkeypatch.setattr(turbo, "to", to)
    monkeypatch.setattr(transfer, "next", lambda it: torch.empty(0, device="meta"), raising=False)

    def measure(model):
        seen["moves_before_raw"] = list(moves)
        return ["d"]

    raw = tiny_dir / "transformer_raw.safetensors"
    model, d = transfer._raw_deltas([turbo], raw, None, False, measure, "float32", "cpu")
    assert model is turbo and d == ["d"]
    assert seen["moves_before_raw"] == ["cpu"] and moves == ["cpu", "meta"]


def test_export_cli_formats_and_default_out(tiny_dir, tmp_path):
    from krea2_train.cli import main
    from krea2_train.cli.export import default_export_dir

    adapter = trained_adapter(tiny_dir, r=2, alpha=2)
    src = write_lora_file(adapter, tmp_path / "style.safetensors", "comfyui", dtype="float32")
    # the README's form: space-separated formats, no --out (export/ beside the file); commas still work, mixed too
    assert main(["export", str(src), "--formats", "diffusers", "comfyui,original", "--name", "s"]) == 0
    out = tmp_path / "export"
    assert (out / "s_diffusers" / "pytorch_lora_weights.safetensors").exists()
    assert (out / "s_comfyui.safetensors").exists() and (out / "s_original.safetensors").exists()
    assert not (out / "s.safetensors").exists()  # civitai not asked for
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    assert default_export_dir(run) == run / "export" == default_export_dir(run / "adapter")
    assert default_export_dir(run / "adapter" / "adapter_model.safetensors") == run / "export"
    assert main(["export", str(src), "--out", str(tmp_path / "o"), "--formats", "civitai"]) == 0
    assert (tmp_path / "o" / "style.safetensors").exists()


def test_one_number_helper():
    from krea2_train.lora import formats, tools

    assert tools._num is formats._num
    assert formats._num(16.0) == 16 and isinstance(formats._num(16.0), int)
    assert formats._num(1 / 3) == 1 / 3  # exact for configs (the adapter's scale must not drift)
    assert formats._num(1 / 3, 6) == 0.333333  # rounded for display (inspect)
    assert not hasattr(formats.TrainedAdapter, "lora_config")
