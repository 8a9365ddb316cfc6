"""One base for Turbo: a Turbo LoRA (Turbo minus Raw) stacked on Raw under the training LoRA, for previews and
`sample`; what a Turbo source file is, told by content; ComfyUI's beta scheduler."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from test_export_helpers import trained_transformer

from krea2_train.inference import SampleSettings, sample_latents, stacked_lora
from krea2_train.lora.formats import TrainedAdapter
from krea2_train.lora.tools import extract_lora
from krea2_train.lora.turbo import TurboSourceError, preview_turbo_source, transformer_file_kind
from krea2_train.lora.writers import write_lora_file
from krea2_train.models.loading import load_transformer
from krea2_train.schedule import beta_sigmas, comfy_model_sigmas, sampling_sigmas, simple_sigmas
from krea2_train.train import preview


# ------------------------------------------------------------------------------------------------ beta scheduler
def _reference_beta(steps, mu, alpha=0.6, beta=0.6):
    """comfy/samplers.py `beta_scheduler` line by line over comfy/model_sampling.py's table (its torch expression
    as written there: torch's scalar / tensor is a reciprocal times the scalar, so numpy's true division differs by
    an ulp), with mpmath for scipy.stats.beta.ppf (scipy is not installed here)."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 30

    def flux_time_shift(mu: float, sigma: float, t):
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)

    sigmas = flux_time_shift(mu, 1.0, torch.arange(1, 10000 + 1, 1) / 10000)

    def ppf(p):
        if p <= 0 or p >= 1:
            return float(p >= 1)
        return float(mpmath.findroot(lambda x: mpmath.betainc(alpha, beta, 0, x, regularized=True) - p,
                                     (mpmath.mpf("1e-30"), 1 - mpmath.mpf("1e-30")), solver="anderson"))

    total = len(sigmas) - 1
    ts = 1 - np.linspace(0, 1, steps, endpoint=False)
    ts = np.rint(np.array([ppf(float(x)) for x in ts]) * total)
    sigs, last_t = [], -1
    for tt in ts:
        if tt != last_t:
            sigs += [float(sigmas[int(tt)])]
        last_t = tt
    return sigs + [0.0]


@pytest.mark.parametrize("mu", [1.15, 0.5, 0.91])
def test_beta_sigmas_equal_comfyui_reference(mu):
    for steps in (1, 2, 3, 8, 12, 20, 28, 50):
        ours = beta_sigmas(steps, mu)
        assert ours.dtype == torch.float32 and ours[0] == 1.0 and ours[-1] == 0.0
        assert ours.tolist() == _reference_beta(steps, mu), steps  # the same table entries, exactly


def test_model_sigmas_and_simple_match_the_flow_schedule():
    table = comfy_model_sigmas(1.15)
    assert table.shape == (10000,) and table.dtype == torch.float32 and float(table[-1]) == 1.0
    # ComfyUI's `simple` = the sampler's own schedule where the step count divides the 10000-entry table, else
    # within one table entry (it truncates the index)
    one_entry = 1e-4 * math.exp(1.15)  # the steepest slope of the shift (at sigma -> 0) times one entry
    for steps, atol in ((4, 1e-6), (8, 1e-6), (12, one_entry), (28, one_entry)):
        torch.testing.assert_close(simple_sigmas(steps, 1.15)[:-1], sampling_sigmas(steps, 1.15), atol=atol, rtol=0)


def test_beta_sampler_is_euler_over_beta_sigmas(tiny_dir):
    model = load_transformer(tiny_dir / "transformer_raw.safetensors", dtype="float32")
    emb, mask = torch.randn(1, 5, 12, 32), torch.ones(1, 5, dtype=torch.bool)
    settings = SampleSettings.turbo(height=64, width=64, seed=2, steps=5, scheduler="beta")
    got = sample_latents(model, emb, mask, settings)
    from krea2_train.inference import initial_noise, predict_velocity
    from krea2_train.schedule import unpack_latents

    x = initial_noise(1, 64, 64, 2)
    sig = beta_sigmas(5, 1.15)
    for a, b in zip(sig[:-1], sig[1:]):
        x = x + (b - a) * predict_velocity(model, x, a.reshape(1), emb, mask, (4, 4)).float()
    torch.testing.assert_close(got, unpack_latents(x, 8, 8), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="unknown scheduler"):
        sample_latents(model, emb, mask, SampleSettings.turbo(height=64, width=64, scheduler="karras"))


# ---------------------------------------------------------------------------------------------- file detection
@pytest.fixture(scope="module")
def turbo_lora_file(tiny_dir, tmp_path_factory):
    adapter, _ = extract_lora(tiny_dir / "transformer_raw.safetensors", tiny_dir / "transformer_turbo.safetensors",
                              rank=8)
    path = tmp_path_factory.mktemp("turbo_lora") / "turbo_lora.safetensors"
    write_lora_file(adapter, path, "comfyui", dtype="float32")  # Comfy-Org's layout: lora_down/lora_up + .alpha
    return path


def test_file_kind_by_content(tiny_dir, turbo_lora_file, tmp_path):
    assert transformer_file_kind(tiny_dir / "transformer_turbo.safetensors") == "checkpoint"
    assert transformer_file_kind(turbo_lora_file) == "lora"
    renamed = tmp_path / "krea2_turbo_bf16.safetensors"  # the name says checkpoint, the tensors say LoRA
    renamed.write_bytes(turbo_lora_file.read_bytes())
    assert transformer_file_kind(renamed) == "lora"
    vae = next((tiny_dir / "vae").glob("*.safetensors"))
    with pytest.raises(TurboSourceError, match=r"neither a Krea 2 transformer.*nor a LoRA") as err:
        transformer_file_kind(vae, "preview.turbo")
    assert str(vae) in str(err.value) and "preview.turbo" in str(err.value) and "krea2-train extract" in str(err.value)
    both = {**load_file(tiny_dir / "transformer_turbo.safetensors"), **load_file(turbo_lora_file)}
    save_file(both, tmp_path / "both.safetensors")
    with pytest.raises(TurboSourceError, match="both.safetensors: it holds both a Krea 2 transformer"):
        transformer_file_kind(tmp_path / "both.safetensors")
    with pytest.raises(TurboSourceError, match="not found"):
        transformer_file_kind(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(TurboSourceError, match="junk.safetensors"):
        transformer_file_kind(tmp_path / "junk.safetensors")


def test_preview_turbo_config_key_takes_a_path(turbo_lora_file, tiny_dir):
    from krea2_train.config.load import load_config

    cfg = load_config(None, [f"model.models={tiny_dir}", f"preview.turbo={turbo_lora_file}",
                             "preview.turbo_lora_strength=0.8"], warn_paths=False)
    assert preview_turbo_source(cfg) == ("lora", str(turbo_lora_file))
    cfg.preview.turbo = True
    assert preview_turbo_source(cfg) == ("checkpoint", str(tiny_dir / "transformer_turbo.safetensors"))
    cfg.preview.turbo = False
    assert preview_turbo_source(cfg) is None
    from krea2_train.models.paths import model_path_problems

    cfg.model.turbo = str(turbo_lora_file)  # the LoRA given where the checkpoint goes: the message says where
    (problem,) = model_path_problems(cfg, ["model.turbo"])
    assert "is a LoRA, not a Krea 2 transformer" in problem and "`preview.turbo`" in problem


# ---------------------------------------------------------------------------------------------------- previews
def _merged(tiny_dir, adapters):
    """Raw with each (adapter, strength) added into its weights by hand."""
    model = load_transformer(tiny_dir / "transformer_raw.safetensors", dtype="float32")
    with torch.no_grad():
        for adapter, strength in adapters:
            for m in adapter.modules:
                model.get_submodule(m).weight += strength * adapter.delta(m)
    return model


def _cfg(tiny_dir, lora_path, strength):
    from types import SimpleNamespace

    return SimpleNamespace(
        model=SimpleNamespace(transformer=str(tiny_dir / "transformer_raw.safetensors"), turbo=None, dtype="float32",
                              architecture="tiny"),
        preview=SimpleNamespace(turbo=str(lora_path), turbo_steps=3, turbo_lora_strength=strength,
                                prompts=["a red circle"]))


@pytest.mark.parametrize("memory", ["plain", "offload", "fused"])
def test_preview_with_turbo_lora_equals_both_adapters_by_hand(tiny_dir, turbo_lora_file, memory):
    from krea2_train.lora.formats import read_lora_file
    from krea2_train.runtime.memory import offload_blocks
    from krea2_train.runtime.speed import fuse_qkv

    model = trained_transformer(tiny_dir).eval()
    training = TrainedAdapter.from_model(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    offload = memory == "offload"
    if memory == "fused":  # one q/k/v/gate base matmul, each adapter's LoRA added per projection
        fuse_qkv(model)
    if offload:  # frozen block weights on the CPU copy between uses; NaN there would show any stale use
        offload_blocks(model, "cpu", poison=True)
    emb, mask = torch.randn(1, 5, 12, 32), torch.ones(1, 5, dtype=torch.bool)
    size = dict(height=64, width=64, seed=1)
    preview._TURBO_ALONE.clear()
    alone, with_lora = preview._turbo_lora_latents(_cfg(tiny_dir, turbo_lora_file, 0.7), model, emb, mask, size,
                                                   str(turbo_lora_file), "cpu")
    turbo = read_lora_file(turbo_lora_file).adapter
    settings = SampleSettings.turbo(steps=3, **size)
    want_alone = sample_latents(_merged(tiny_dir, [(turbo, 0.7)]), emb, mask, settings)
    want_with = sample_latents(_merged(tiny_dir, [(turbo, 0.7), (training, 1.0)]), emb, mask, settings)
    torch.testing.assert_close(alone, want_alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(with_lora, want_with, rtol=0, atol=1e-5)
    assert (with_lora - alone).abs().max() > 1e-3
    # the Turbo LoRA is gone: the training model is as it was (adapter, scales, trainability, active adapter)
    if offload:
        model._krea2_offloader.remove()
    assert "turbo_lora" not in model.peft_config and not any("turbo_lora" in n for n, _ in model.named_parameters())
    after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items()}
    assert all(torch.equal(before[k.replace(".base_layer", "")], v) for k, v in model.state_dict().items()
               if k.replace(".base_layer", "") in before) and len(after) == len(before)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    torch.testing.assert_close(sample_latents(model, emb, mask, settings),
                               sample_latents(_merged(tiny_dir, [(training, 1.0)]), emb, mask, settings),
                               rtol=0, atol=1e-5)


def test_stacked_lora_checks_the_scale_and_refuses_lokr(tiny_dir, turbo_lora_file):
    from peft import LoKrConfig

    from krea2_train.errors import UserError

    model = load_transformer(tiny_dir / "transformer_raw.safetensors", dtype="float32")
    with stacked_lora(model, turbo_lora_file, 0.6, "t") as name:
        layer = model.transformer_blocks[0].attn.to_q
        assert name == "t" and layer.active_adapters == ["t"]
        assert layer.scaling["t"] == pytest.approx(0.6)  # extract writes alpha = rank: scale 1 x strength
    assert not hasattr(model.transformer_blocks[0].attn.to_q, "lora_A") or not model.transformer_blocks[0].attn.to_q.lora_A
    lokr = load_transformer(tiny_dir / "transformer_raw.safetensors", dtype="float32")
    lokr.add_adapter(LoKrConfig(r=2, target_modules=["to_q"]))
    with pytest.raises(UserError, match="LoKr"):
        with stacked_lora(lokr, turbo_lora_file, 1.0):
            pass


# ------------------------------------------------------------------------------------------------------ sample
def test_sample_turbo_lora_recipe_end_to_end(tiny_dir, turbo_lora_file, tmp_path, capsys, one_torch_thread):
    from krea2_train.cli import main
    from krea2_train.lora.tools import merge_into_checkpoint

    common = ["--prompt", "a red circle", "--height", "64", "--width", "64", "--seed", "4", "--dtype", "float32",
              "--steps", "4", "--scheduler", "beta"]
    code = main(["sample", "--models", str(tiny_dir), "--turbo-lora", str(turbo_lora_file), "--turbo-lora-strength",
                 "0.6", "--out", str(tmp_path / "a"), *common])
    assert code == 0
    (png,) = (tmp_path / "a").glob("*.png")
    assert png.name == "a-red-circle_seed4_turbolora@0.6_beta.png"
    # the same picture as a checkpoint with 0.6 x the Turbo LoRA merged in, sampled on Turbo's schedule
    merged = merge_into_checkpoint([(turbo_lora_file, 0.6)], tiny_dir / "transformer_raw.safetensors",
                                   tmp_path / "merged.safetensors", dtype="float32")
    assert main(["sample", "--transformer", str(merged), "--text-encoder", str(tiny_dir / "text_encoder"), "--vae",
                 str(tiny_dir / "vae"), "--variant", "turbo", "--out", str(tmp_path / "b"), *common]) == 0
    (ref,) = (tmp_path / "b").glob("*.png")
    a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (png, ref))
    assert np.abs(a - b).max() <= 1
    capsys.readouterr()
    assert main(["sample", "--models", str(tiny_dir), "--turbo-lora", str(tiny_dir / "transformer_turbo.safetensors"),
                 "--prompt", "x", "--out", str(tmp_path / "c")]) == 2
    assert "is a transformer checkpoint, not a LoRA" in capsys.readouterr().err
    assert main(["sample", "--models", str(tiny_dir), "--turbo-lora", str(turbo_lora_file), "--variant", "turbo",
                 "--prompt", "x", "--out", str(tmp_path / "c")]) == 2
    assert "--turbo-lora goes on Raw" in capsys.readouterr().err


FSDP_SCRIPT = '''
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[3])
from test_export_helpers import trained_transformer
from test_turbo_lora import _cfg, _merged
from pathlib import Path
from krea2_train.inference import SampleSettings, sample_latents
from krea2_train.lora.formats import TrainedAdapter, read_lora_file
from krea2_train.runtime.sharding import is_sharded, make_mesh, shard_transformer
from krea2_train.train import preview

tiny, lora_file = Path(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo")
torch.manual_seed(0)
model = trained_transformer(tiny)
training = TrainedAdapter.from_model(model)
shard_transformer(model, make_mesh(torch.device("cpu")))
assert any(is_sharded(p) for p in model.parameters())
emb, mask = torch.randn(1, 5, 12, 32, generator=torch.Generator().manual_seed(3)), torch.ones(1, 5, dtype=torch.bool)
size = dict(height=64, width=64, seed=1)
model.eval()
alone, with_lora = preview._turbo_lora_latents(_cfg(tiny, lora_file, 0.7), model, emb, mask, size, lora_file, "cpu")
assert alone is None  # sharded runs show Turbo with the LoRA only (no adapter toggling under FSDP)
turbo = read_lora_file(lora_file).adapter
want = sample_latents(_merged(tiny, [(turbo, 0.7), (training, 1.0)]), emb, mask, SampleSettings.turbo(steps=3, **size))
torch.testing.assert_close(with_lora, want, rtol=0, atol=1e-5)
assert "turbo_lora" not in model.peft_config
model.train()  # training goes on: every LoRA shard still gets its gradient
from _speed_helpers import inputs
out = model(**inputs(batch=1, lengths=(10,)), return_dict=False)[0]
out.square().mean().backward()
lora = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
assert lora and all(p.requires_grad and p.grad is not None for _, p in lora), [n for n, p in lora if p.grad is None]
dist.barrier()
print(f"OK rank {dist.get_rank()}")
'''


def test_turbo_lora_preview_under_fsdp(tiny_dir, turbo_lora_file, tmp_path):
    """Two CPU processes (gloo), the tiny Raw + LoRA sharded with fully_shard: the Turbo LoRA preview equals both
    adapters merged by hand, and the training LoRA still trains after it."""
    import os
    import subprocess
    import sys

    script = tmp_path / "fsdp_turbo_lora.py"
    script.write_text(FSDP_SCRIPT)
    tests = str(Path(__file__).resolve().parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(tests).parent), tests, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29531", str(script), str(tiny_dir), str(turbo_lora_file), tests],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "OK rank 0" in proc.stdout and "OK rank 1" in proc.stdout



def test_training_with_turbo_lora_previews_and_block_offload(tiny_dir, turbo_lora_file, tmp_path, one_torch_thread):
    """A run whose previews stack the Turbo LoRA (block offload on) writes the grid and ends with the same adapter
    as the same run without previews; a preview.turbo file that is neither a LoRA nor a checkpoint stops the run
    before any step, naming the file."""
    from test_train_loop import adapter, tiny_cfg

    from krea2_train.train.batches import SyntheticData
    from krea2_train.train.checkpoint import list_checkpoints
    from krea2_train.train.trainer import train

    common = ["memory.offload_blocks=true", "checkpoint.every_steps=0", "train.stages=[{resolution: 64, steps: 4, "
              "batch_size: 1}]"]
    previews = ["preview.every_steps=2", "preview.prompts=[a red circle]", "preview.resolution=64",
                "preview.raw_steps=2", "preview.turbo_steps=2", f"preview.turbo={turbo_lora_file}"]
    plain = tiny_cfg(tiny_dir, tmp_path / "plain", *common)
    train(plain, source=SyntheticData())
    cfg = tiny_cfg(tiny_dir, tmp_path / "turbo", *common, *previews)
    preview._TURBO_ALONE.clear()
    train(cfg, source=SyntheticData())
    assert (cfg.run_dir / "previews" / "step-000002.png").exists()
    with_previews, without = adapter(cfg.run_dir), adapter(plain.run_dir)
    assert with_previews.keys() == without.keys()
    assert all(torch.equal(with_previews[k], without[k]) for k in without)  # previews leave training untouched
    bad = tiny_cfg(tiny_dir, tmp_path / "bad", *common, *previews[:-1],
                   f"preview.turbo={next((tiny_dir / 'vae').glob('*.safetensors'))}")
    with pytest.raises(TurboSourceError, match="preview.turbo.*diffusion_pytorch_model.safetensors.*neither"):
        train(bad, source=SyntheticData())
    assert not list_checkpoints(bad.run_dir)
