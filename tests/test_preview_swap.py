"""Turbo previews swap the training transformer's base weights to Turbo and back, in place: the result equals Turbo
loaded separately with the same LoRA, and Raw comes back bit for bit."""

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_export_helpers import trained_transformer

from krea2_train.models.loading import ModelLoadError, load_transformer
from krea2_train.runtime.swap import copy_base_weights
from krea2_train.train import preview


def lora_model(tiny_dir):
    return trained_transformer(tiny_dir).eval()  # Raw with a random (as if trained) LoRA


def base_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}


def cfg_for(tiny_dir):
    return SimpleNamespace(
        model=SimpleNamespace(transformer=str(tiny_dir / "transformer_raw.safetensors"),
                              turbo=str(tiny_dir / "transformer_turbo.safetensors"), dtype="float32",
                              architecture="tiny"),
        preview=SimpleNamespace(turbo_steps=3, prompts=["a red circle"]))


@pytest.mark.parametrize("fused", [False, True])
def test_swap_equals_separate_turbo_and_restores_raw(tiny_dir, fused):
    from krea2_train.runtime.speed import fuse_qkv

    model = lora_model(tiny_dir)
    if fused:
        fuse_qkv(model)
    before = base_state(model)
    emb, mask = torch.randn(1, 5, 12, 32), torch.ones(1, 5, dtype=torch.bool)
    size = dict(height=64, width=64, seed=1)
    preview._TURBO_ALONE.clear()
    swapped_base, swapped = preview._turbo_latents_swapped(cfg_for(tiny_dir), model, emb, mask, size)
    preview._TURBO_ALONE.clear()  # the separate copy samples Turbo without the LoRA itself
    separate_base, separate = preview._turbo_latents(cfg_for(tiny_dir), model, emb, mask, size, "cpu", None, None)
    torch.testing.assert_close(swapped, separate, rtol=0, atol=1e-6)
    # the "Turbo" column is Turbo without the LoRA: a plain Turbo checkpoint's own sample
    from krea2_train.inference import SampleSettings, sample_latents

    plain = load_transformer(tiny_dir / "transformer_turbo.safetensors", dtype="float32")
    reference = sample_latents(plain, emb, mask, SampleSettings.turbo(steps=3, **size))
    torch.testing.assert_close(swapped_base, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(separate_base, reference, rtol=0, atol=1e-6)
    assert (swapped - swapped_base).abs().max() > 1e-3  # the LoRA column differs from it
    after = base_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # Raw is back, bit for bit
    if fused:  # still views of the fused tensor: the fast path is intact
        attn = model.transformer_blocks[0].attn
        assert attn.to_q.base_layer.weight.data_ptr() == attn._krea2_fused_weight.data_ptr()


def test_swap_copies_every_base_tensor(tiny_dir):
    model = lora_model(tiny_dir)
    n = copy_base_weights(model, tiny_dir / "transformer_turbo.safetensors")
    turbo = load_transformer(tiny_dir / "transformer_turbo.safetensors", dtype="float32").state_dict()
    assert n == len(turbo)
    state = {k.replace(".base_layer", ""): v for k, v in base_state(model).items()}
    assert state.keys() == turbo.keys()
    assert all(torch.equal(state[k], turbo[k]) for k in turbo)


def test_swap_rejects_other_architecture(tiny_dir, tmp_path):
    state = load_file(tiny_dir / "transformer_turbo.safetensors")
    state["blocks.0.mlp.up.weight"] = state["blocks.0.mlp.up.weight"][:-16].contiguous()
    save_file(state, tmp_path / "other.safetensors")
    model = lora_model(tiny_dir)
    with pytest.raises(ModelLoadError, match="transformer_blocks.0.ff.up.weight has shape"):
        copy_base_weights(model, tmp_path / "other.safetensors")


def test_quantised_base_is_refused_before_any_copy(tiny_dir):
    model = lora_model(tiny_dir)
    block = model.transformer_blocks[0].ff.down.base_layer  # the frozen Linear under the LoRA wrapper
    block.weight = torch.nn.Parameter(block.weight.data.to(torch.uint8), requires_grad=False)  # like fp8 storage
    before = base_state(model)
    with pytest.raises(TypeError, match="quantised"):
        copy_base_weights(model, tiny_dir / "transformer_turbo.safetensors")
    assert all(torch.equal(before[k], v) for k, v in base_state(model).items())


@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_previews_and_the_transfer_grid_sample_a_prompt_alike(tiny_dir, guidance):
    """The same prompt and seed give the same latents in a preview (prompt by prompt) and in the transfer grid (the
    prompts batched per seed), for every row, Turbo-like (no CFG) and Raw-like (CFG); plain batched noise would not."""
    from dataclasses import replace

    from krea2_train.export.transfer import sample_seeds
    from krea2_train.inference import SampleSettings, sample_latents

    model = lora_model(tiny_dir)
    gen = torch.Generator().manual_seed(3)
    emb, neg = torch.randn(2, 2, 5, 12, 32, generator=gen)
    mask = torch.ones(2, 5, dtype=torch.bool)
    settings = SampleSettings.raw(steps=2, guidance=guidance, height=32, width=32, seed=5)
    negative = (neg, mask) if guidance else None
    grid = sample_seeds(model, emb, mask, settings, [5, 6], negative)
    for k, seed in enumerate((5, 6)):
        alone = preview.sample_each(model, emb, mask, replace(settings, seed=seed), *(negative or (None, None)))
        torch.testing.assert_close(grid[2 * k:2 * k + 2], alone, rtol=0, atol=1e-5)
    batched = sample_latents(model, emb, mask, settings, *(negative or (None, None)))  # one noise draw for both rows
    assert (batched[1] - grid[1]).abs().max() > 1e-2
    # the look fit's draws (alike=False) stay the batch's own
    torch.testing.assert_close(sample_seeds(model, emb, mask, settings, [5], negative, alike=False), batched,
                               rtol=0, atol=1e-5)
