"""The GPU-only halves of the speed/memory paths (skipped without CUDA): bitsandbytes' NF4 CUDA kernels, the int8/fp8
layers on CUDA (and their checkpointed memory), offload with a side stream and prefetch, flash/cuDNN attention with
GQA, inductor compile. Same comparisons as the CPU tests, bf16 tolerances (bf16 has ~3 significant digits; errors
are relative to O(1) values)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _speed_helpers import add_lora, assert_close_grads, inputs, run, tiny_model, twin  # noqa: E402

from krea2_train.config.memory import resolve_memory_settings  # noqa: E402
from krea2_train.runtime import (
    memory,  # noqa: E402
    speed,  # noqa: E402
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEV = "cuda"


def _cuda(batch, dtype=torch.bfloat16):
    return {k: (v.to(DEV, dtype) if v.is_floating_point() else v.to(DEV)) for k, v in batch.items()}


@pytest.fixture(scope="module")
def plain():
    return add_lora(tiny_model()).to(DEV, torch.bfloat16)


@pytest.mark.parametrize("backend", ["auto", "flash", "cudnn", "efficient"])
def test_fast_attention_cuda(plain, backend):
    fast = speed.enable_text_padding_trim(speed.set_fast_attention(twin(plain), backend))
    batch = _cuda(inputs(batch=2, lengths=(6, 4)))
    o1, g1, _ = run(plain, batch)
    o2, g2, _ = run(fast, batch)
    torch.testing.assert_close(o2.float(), o1.float(), atol=3e-2, rtol=3e-2)
    assert_close_grads({k: v.float() for k, v in g2.items()}, {k: v.float() for k, v in g1.items()},
                       atol=3e-2, rtol=5e-2)


@pytest.mark.parametrize("mode", ["int8", "nf4", "fp8", "fp8_mm"])
def test_quantized_trains_on_cuda(mode):
    if mode == "fp8_mm" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 tensor cores need sm_89+")
    model = add_lora(tiny_model().to(torch.bfloat16))
    settings = dict(quantize="fp8", fp8_matmul=True) if mode == "fp8_mm" else dict(quantize=mode)
    memory.apply_memory_settings(model, resolve_memory_settings(settings), DEV, compute_dtype=torch.bfloat16)
    expected = {"int8": "Int8Linear", "nf4": "Linear4bit", "fp8": "Fp8Linear", "fp8_mm": "Fp8Linear"}[mode]
    assert type(model.transformer_blocks[0].attn.to_q.base_layer).__name__ == expected
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    batch = _cuda(inputs())
    for _ in range(3):
        opt.zero_grad()
        out = model(**batch, return_dict=False)[0]
        loss = ((out.float() - 1) ** 2).mean()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(b, p) for b, p in zip(before, params))


@pytest.mark.parametrize("mode", ["none", "int8", "nf4"])
def test_offload_with_stream_matches_resident(plain, mode):
    ref = memory.enable_checkpointing(memory.quantize_base(twin(plain), mode, device=DEV), None)
    off = twin(ref)
    memory.offload_blocks(off, DEV)
    assert off._krea2_offloader.stream is not None
    blk = off.transformer_blocks[1]
    frozen = [p for p in blk.parameters() if not p.requires_grad]
    assert frozen and all(p.device.type == "cpu" for p in frozen)
    batch = _cuda(inputs())
    o1, g1, _ = run(ref, batch)
    for _ in range(2):
        o2, g2, _ = run(off, batch)
        torch.testing.assert_close(o2, o1, atol=0, rtol=0)
        assert_close_grads(g2, g1, atol=0, rtol=0)


def test_int8_checkpointed_forward_keeps_what_bf16_keeps():
    """Int8Linear saves only its 1-byte weight, so after a checkpointed forward the int8 model holds no more
    activation memory than the bf16 one (bitsandbytes' Linear8bitLt kept every layer input: ~9 GiB at full size)."""
    batch = _cuda(inputs(batch=1, lengths=(8,), hw=(32, 32)))
    after = {}
    for mode in ("none", "int8"):
        model = add_lora(tiny_model().to(torch.bfloat16))
        memory.apply_memory_settings(model, dict(quantize=mode), DEV, compute_dtype=torch.bfloat16)
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        out = model(**batch, return_dict=False)[0]
        torch.cuda.synchronize()
        after[mode] = torch.cuda.memory_allocated() - start
        out.float().square().mean().backward()
        del model, out
    assert after["int8"] <= 1.05 * after["none"], after


def test_inductor_compile_matches_plain(plain):
    torch._dynamo.reset()
    fast = memory.apply_memory_settings(twin(plain), dict(gradient_checkpointing=False, fuse_qkv=True, compile=True),
                                        "cuda")
    batch = _cuda(inputs(batch=1, lengths=(8,)))
    o1, g1, _ = run(plain, batch)
    o2, g2, _ = run(fast, batch)
    torch.testing.assert_close(o2.float(), o1.float(), atol=3e-2, rtol=3e-2)
    torch._dynamo.reset()
