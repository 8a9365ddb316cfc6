"""Each speed path against diffusers' plain path on the tiny Krea 2 with a LoRA (fp32, CPU).

Tolerances: paths that run the very same kernels on the same shapes must match exactly (atol 0 where stated);
paths that change a matmul's shape (fused q/k/v/gate) or the attention length (trimmed padding) change the float
summation order, so outputs match to atol 1e-5 and gradients to atol 1e-6 / rtol 1e-4 (fp32; values are O(1)).
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _speed_helpers import add_lora, assert_close_grads, inputs, run, tiny_model, twin  # noqa: E402

from krea2_train.train import speed
from krea2_train.train.memory import apply_memory_settings  # noqa: E402

OUT = dict(atol=1e-5, rtol=1e-5)
GRAD = dict(atol=1e-6, rtol=1e-4)


@pytest.fixture(scope="module")
def plain():
    return add_lora(tiny_model())


def test_fast_attention_masked_batch_is_identical(plain):
    fast = speed.set_fast_attention(twin(plain), "auto")
    batch = inputs(batch=2, lengths=(10, 6))
    o1, g1, x1 = run(plain, batch)
    o2, g2, x2 = run(fast, batch)
    torch.testing.assert_close(o2, o1, atol=0, rtol=0)
    assert_close_grads(g2, g1, atol=0, rtol=0)
    torch.testing.assert_close(x2, x1, atol=0, rtol=0)


def test_fast_attention_gqa_without_mask_equals_plain_with_full_mask(plain):
    """Batch 1 / no padding: the fast path runs SDPA with enable_gqa and no mask; diffusers repeats k/v and masks."""
    fast = speed.set_fast_attention(twin(plain), "auto")
    batch = inputs(batch=1, lengths=(10,))
    assert batch["encoder_attention_mask"].all()
    o1, g1, x1 = run(plain, batch)
    o2, g2, x2 = run(fast, dict(batch, encoder_attention_mask=None))
    torch.testing.assert_close(o2, o1, **OUT)
    assert_close_grads(g2, g1, **GRAD)
    torch.testing.assert_close(x2, x1, **GRAD)


@pytest.mark.parametrize("backend", ["math", "diffusers:native", None])
def test_attention_backends_agree(plain, backend):
    fast = speed.set_fast_attention(twin(plain), backend)
    batch = inputs(batch=1, lengths=(10,))
    o1, g1, _ = run(plain, batch)
    o2, g2, _ = run(fast, dict(batch, encoder_attention_mask=None))
    torch.testing.assert_close(o2, o1, **OUT)
    assert_close_grads(g2, g1, **GRAD)


def test_trim_text_padding_function():
    batch = inputs(batch=2, text_len=10, lengths=(6, 4))
    ehs, mask, pos = speed.trim_text_padding(batch["encoder_hidden_states"], batch["encoder_attention_mask"],
                                             batch["position_ids"])
    assert ehs.shape[1] == 6 and mask.shape == (2, 6) and pos.shape[0] == 6 + 16
    assert mask[0].all() and mask[1].sum() == 4
    torch.testing.assert_close(ehs, batch["encoder_hidden_states"][:, :6], atol=0, rtol=0)
    one = inputs(batch=1, text_len=10, lengths=(7,))
    ehs, mask, pos = speed.trim_text_padding(one["encoder_hidden_states"], one["encoder_attention_mask"],
                                             one["position_ids"])
    assert mask is None and ehs.shape[1] == 7 and pos.shape[0] == 7 + 16


@pytest.mark.parametrize("batch_size,lengths", [(1, (7,)), (2, (6, 4)), (2, (10, 3))])
def test_trimmed_padding_same_outputs_and_grads(plain, batch_size, lengths):
    fast = speed.enable_text_padding_trim(speed.set_fast_attention(twin(plain)))
    batch = inputs(batch=batch_size, lengths=lengths)
    o1, g1, x1 = run(plain, batch)
    o2, g2, x2 = run(fast, batch)
    torch.testing.assert_close(o2, o1, **OUT)
    assert_close_grads(g2, g1, **GRAD)
    torch.testing.assert_close(x2, x1, **GRAD)


def test_fused_qkv_same_outputs_grads_and_state_dict(plain):
    fused = speed.fuse_qkv(speed.set_fast_attention(twin(plain)))
    attns = speed.attention_modules(fused)
    assert all(a._krea2_fused_weight is not None for a in attns)
    batch = inputs(batch=2, lengths=(10, 6))
    o1, g1, x1 = run(plain, batch)
    o2, g2, x2 = run(fused, batch)
    # the fused matmul really ran (a broken view layout would have reset the attribute and fallen back)
    assert all(speed._fused_weight(a) is not None for a in attns)
    torch.testing.assert_close(o2, o1, **OUT)
    assert_close_grads(g2, g1, **GRAD)
    torch.testing.assert_close(x2, x1, **GRAD)
    # exports stay unfused: same keys, same values, LoRA per projection
    sd1, sd2 = plain.state_dict(), fused.state_dict()
    assert sd1.keys() == sd2.keys()
    assert any("attn.to_k.lora_A" in k for k in sd2) and not any("qkv" in k for k in sd2)
    for k in sd1:
        torch.testing.assert_close(sd2[k], sd1[k], atol=0, rtol=0)
    # views of one buffer: no second copy of the weights
    attn = attns[-1]
    w = attn._krea2_fused_weight
    assert speed.base_linear(attn.to_v).weight.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()


def test_fused_qkv_falls_back_when_weights_move(plain):
    fused = speed.fuse_qkv(speed.set_fast_attention(twin(plain))).to(torch.float64)
    ref = twin(plain).to(torch.float64)
    batch = {k: (v.double() if v.is_floating_point() else v) for k, v in inputs().items()}
    o1, g1, _ = run(ref, batch)
    o2, g2, _ = run(fused, batch)
    assert all(a._krea2_fused_weight is None for a in speed.attention_modules(fused))
    torch.testing.assert_close(o2, o1, atol=1e-12, rtol=1e-12)
    speed.unfuse_qkv(fused)


def test_fused_qkv_with_lora_disabled_matches_base(plain):
    fused = speed.fuse_qkv(speed.set_fast_attention(twin(plain)))
    ref = twin(plain)
    fused.disable_adapters()
    ref.disable_adapters()
    batch = inputs()
    with torch.no_grad():
        o1 = ref(**batch, return_dict=False)[0]
        o2 = fused(**batch, return_dict=False)[0]
    torch.testing.assert_close(o2, o1, **OUT)


def test_regional_compile_matches_plain(plain):
    """Wiring of compile_repeated_blocks on the tiny model; aot_eager keeps it fast on 2 CPU cores (inductor's
    kernels are exercised by the GPU benchmark)."""
    torch._dynamo.reset()
    # through the trainer's own entry point, so the production order is what is tested
    settings = dict(gradient_checkpointing=False, attention_backend="auto", trim_text_padding=True, fuse_qkv=True,
                    compile=True)
    fast = apply_memory_settings(twin(plain), settings, "cpu", compile_kwargs=dict(backend="aot_eager"))
    assert all(b._compiled_call_impl is not None for b in fast.transformer_blocks)
    batch = inputs(batch=1, lengths=(8,))
    o1, g1, x1 = run(plain, batch)
    o2, g2, x2 = run(fast, batch)
    torch.testing.assert_close(o2, o1, **OUT)
    assert_close_grads(g2, g1, **GRAD)
    torch._dynamo.reset()
