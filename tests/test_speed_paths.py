"""Each speed path against diffusers' plain path on the tiny Krea 2 with a LoRA (fp32, CPU).

Tolerances: paths that run the very same kernels on the same shapes must match exactly (atol 0 where stated);
paths that change a matmul's shape (fused q/k/v/gate) or the attention length (trimmed padding) change the float
summation order, so outputs match to atol 1e-5 and gradients to atol 1e-6 / rtol 1e-4 (fp32; values are O(1)).
share_lora_input is tested as the trainer runs: bf16 base, fp32 LoRA, CPU bf16 autocast. Unfused it is bit-identical;
with fuse_qkv (or compiled) the bf16 gradient contributions are summed in another order: BF16 = torch's bf16 rtol
(1.6e-2) and atol 3e-5, two bf16 ulps at the largest LoRA gradient (~4e-3); the measured differences are one ulp
(1.5e-5), which on a small element of a cancelling sum exceeds any rtol.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _speed_helpers import (  # noqa: E402
    add_lora,
    assert_close_grads,
    assert_same_run,
    autocast_run,
    bf16_inputs,
    inputs,
    run,
    saved_for_backward,
    tiny_model,
    trainer_like,
    twin,
)

from krea2_train.runtime import speed
from krea2_train.runtime.memory import apply_memory_settings  # noqa: E402

OUT = dict(atol=1e-5, rtol=1e-5)
GRAD = dict(atol=1e-6, rtol=1e-4)
BF16 = dict(atol=3e-5, rtol=1.6e-2)


@pytest.fixture(scope="module")
def plain():
    return add_lora(tiny_model())


def test_fast_attention_masked_batch_is_identical(plain):
    fast = speed.set_fast_attention(twin(plain), "auto")
    batch = inputs(batch=2, lengths=(10, 6))
    o1, g1, x1 = run(plain, batch)
    o2, g2, x2 = run(fast, batch)
    assert_same_run((o2, g2, x2), (o1, g1, x1))


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


# ------------------------------------------------------------------------------------------- shared LoRA input
@pytest.fixture(scope="module")
def bf16_plain():
    """The trainer's set-up: bf16 base, fp32 LoRA (lora.add_lora), fast attention."""
    return speed.set_fast_attention(trainer_like(add_lora(tiny_model(torch.bfloat16))))


def _lora_config_model(**lora_kwargs):
    from _speed_helpers import TARGETS
    from peft import LoraConfig

    model = tiny_model(torch.bfloat16).requires_grad_(False)
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="gaussian",
                                 **lora_kwargs))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen).to(p.dtype))
    return speed.set_fast_attention(trainer_like(model))


def _shares_block_input(owners, model):
    """Per block attention: does every q/k/v/gate lora_A save the attention's own input (one storage)?"""
    result = []
    for i in range(len(model.transformer_blocks)):
        (inp,) = owners[f"transformer_blocks.{i}.attn"]
        result.append(all(inp in owners[f"transformer_blocks.{i}.attn.{n}.lora_A.default"]
                          for n in speed.FUSED_PROJECTIONS))
    return result


@pytest.mark.parametrize("fused", [False, True])
def test_share_lora_input_same_outputs_and_grads_under_bf16_autocast(bf16_plain, fused):
    ref = speed.fuse_qkv(twin(bf16_plain)) if fused else bf16_plain
    shared = speed.share_lora_input(speed.fuse_qkv(twin(bf16_plain)) if fused else twin(bf16_plain))
    batch = bf16_inputs(batch=2, lengths=(10, 6))
    o1, g1, x1 = autocast_run(ref, batch)
    o2, g2, x2 = autocast_run(shared, batch)
    assert o2.dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in g2.values())
    tol = BF16 if fused else dict(atol=0, rtol=0)
    torch.testing.assert_close(o2, o1, **tol)
    assert_close_grads(g2, g1, **tol)
    torch.testing.assert_close(x2, x1, **tol)
    if fused:  # and against the stock unfused PEFT path
        o0, g0, x0 = autocast_run(bf16_plain, batch)
        torch.testing.assert_close(o2, o0, **BF16)
        assert_close_grads(g2, g0, **BF16)
        torch.testing.assert_close(x2, x0, **BF16)


@pytest.mark.parametrize("fused", [False, True])
def test_share_lora_input_saves_no_copy_per_projection(bf16_plain, fused):
    """PEFT + autocast saves, per LoRA layer, a bf16 re-cast of its fp32 copy of the input; shared, the q/k/v/gate
    LoRAs save the attention input itself (and the MLP gate/up LoRAs their common input): 4 copies fewer per block."""
    ref = speed.fuse_qkv(twin(bf16_plain)) if fused else bf16_plain
    shared = speed.share_lora_input(speed.fuse_qkv(twin(bf16_plain)) if fused else twin(bf16_plain))
    batch = bf16_inputs(batch=1, lengths=(10,))
    bytes_ref, owners_ref = saved_for_backward(ref, batch)
    bytes_shared, owners_shared = saved_for_backward(shared, batch)
    assert not any(_shares_block_input(owners_ref, ref))
    assert all(_shares_block_input(owners_shared, shared))
    tokens = 16 + 10
    copy = tokens * shared.config.num_attention_heads * shared.config.attention_head_dim * 2  # bf16 hidden state
    assert bytes_ref - bytes_shared == len(shared.transformer_blocks) * 4 * copy


@pytest.mark.parametrize("model_dtype,autocast", [(torch.float32, False), (torch.float32, True),
                                                  (torch.bfloat16, False)])
def test_share_lora_input_inert_without_bf16_autocast(model_dtype, autocast):
    """fp32 model (mixed_precision "no", or autocast with fp32 inputs): nothing to cast. bf16 model without autocast:
    the LoRA really runs in fp32 on the fp32 copy, which must stay. Same results bit for bit, same saved bytes."""
    plain = speed.set_fast_attention(trainer_like(add_lora(tiny_model(model_dtype))))
    shared = speed.share_lora_input(twin(plain))
    batch = inputs() if model_dtype == torch.float32 else bf16_inputs()
    o1, g1, x1 = autocast_run(plain, batch, enabled=autocast)
    o2, g2, x2 = autocast_run(shared, batch, enabled=autocast)
    assert_same_run((o2, g2, x2), (o1, g1, x1))
    assert saved_for_backward(shared, batch, autocast)[0] == saved_for_backward(plain, batch, autocast)[0]


@pytest.mark.parametrize("lora_kwargs,active", [(dict(use_rslora=True), True), (dict(use_dora=True), False),
                                                (dict(lora_dropout=0.3), False)])
def test_share_lora_input_rslora_dora_dropout(lora_kwargs, active):
    """rsLoRA only changes the scale: shared, bit-identical. DoRA computes its weight norm in the input's dtype and
    dropout in bf16 would round its scale, so for both the path stays off: PEFT's cast, bit-identical results."""
    plain = _lora_config_model(**lora_kwargs)
    shared = speed.share_lora_input(twin(plain))
    batch = bf16_inputs(batch=1, lengths=(10,))
    torch.manual_seed(3)
    o1, g1, x1 = autocast_run(plain, batch)
    torch.manual_seed(3)
    o2, g2, x2 = autocast_run(shared, batch)
    assert_same_run((o2, g2, x2), (o1, g1, x1))
    bytes_plain, _ = saved_for_backward(plain, batch)
    bytes_shared, owners = saved_for_backward(shared, batch)
    assert all(_shares_block_input(owners, shared)) == active
    assert (bytes_shared < bytes_plain) == active
    if lora_kwargs.get("lora_dropout"):  # in eval there is no dropout: shared again
        shared.eval()
        assert all(_shares_block_input(saved_for_backward(shared, batch)[1], shared))


def test_fused_qkv_casts_the_lora_input_once_without_autocast(bf16_plain):
    """bf16 base without autocast (LoRA in fp32): the fused path makes one fp32 copy for the four projections instead
    of PEFT's four (same values; the fp32 gradients of the four are summed before the cast back to bf16)."""
    fused = speed.fuse_qkv(twin(bf16_plain))
    batch = bf16_inputs(batch=1, lengths=(10,))
    o1, g1, x1 = autocast_run(bf16_plain, batch, enabled=False)
    o2, g2, x2 = autocast_run(fused, batch, enabled=False)
    torch.testing.assert_close(o2, o1, **BF16)
    assert_close_grads(g2, g1, **BF16)
    torch.testing.assert_close(x2, x1, **BF16)
    copy = (16 + 10) * fused.config.num_attention_heads * fused.config.attention_head_dim * 4  # fp32 hidden state
    assert (saved_for_backward(bf16_plain, batch, False)[0] - saved_for_backward(fused, batch, False)[0]
            == len(fused.transformer_blocks) * 3 * copy)


def test_share_lora_input_with_checkpointing_deepcopy_and_undo(bf16_plain):
    """Checkpoint recomputation runs under the same autocast, so it shares too (non-reentrant checkpointing checks
    the recomputed tensors match); a deep copy keeps the path bound to its own layers; unshare_lora_input undoes it."""
    from krea2_train.runtime.memory import enable_checkpointing

    shared = speed.share_lora_input(twin(bf16_plain))
    copy = twin(shared)
    layer = copy.transformer_blocks[0].attn.to_q
    assert layer._cast_input_dtype.__self__ is layer
    enable_checkpointing(copy, None)
    copy.train()
    batch = bf16_inputs(batch=2, lengths=(10, 6))
    o1, g1, x1 = autocast_run(bf16_plain, batch)
    o2, g2, x2 = autocast_run(copy, batch)
    assert_same_run((o2, g2, x2), (o1, g1, x1))
    speed.unshare_lora_input(shared)
    assert saved_for_backward(shared, batch)[0] == saved_for_backward(bf16_plain, batch)[0]


def test_share_lora_input_compiled_matches_plain(bf16_plain):
    """The per-call autocast check traces under torch.compile (aot_eager on CPU)."""
    torch._dynamo.reset()
    fast = speed.compile_blocks(speed.share_lora_input(speed.fuse_qkv(twin(bf16_plain))), backend="aot_eager")
    batch = bf16_inputs(batch=1, lengths=(8,))
    o1, g1, x1 = autocast_run(bf16_plain, batch)
    o2, g2, x2 = autocast_run(fast, batch)
    torch.testing.assert_close(o2, o1, **BF16)
    assert_close_grads(g2, g1, **BF16)
    torch.testing.assert_close(x2, x1, **BF16)
    torch._dynamo.reset()
