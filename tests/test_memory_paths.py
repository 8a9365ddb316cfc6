"""Memory paths on the tiny Krea 2 with a LoRA (CPU): checkpointing is exact, quantised/fp8 bases train the LoRA
with the base frozen, the int8/fp8 custom backward equals autograd through the dequantised weight and keeps no input
alive under checkpointing (bitsandbytes' Linear8bitLt does), offload is exact, and every preset trains."""

import sys
import weakref
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _speed_helpers import add_lora, assert_close_grads, assert_same_run, inputs, run, tiny_model, twin  # noqa: E402

from krea2_train.config.memory import resolve_memory_settings  # noqa: E402
from krea2_train.runtime import (
    memory,  # noqa: E402
    speed,  # noqa: E402
)


@pytest.fixture(scope="module")
def plain():
    return add_lora(tiny_model())


@pytest.mark.parametrize("n", [0, 1, 2, None])
def test_checkpointing_n_blocks_identical_grads(plain, n):
    ck = memory.enable_checkpointing(twin(plain), n)
    expected = 0 if n == 0 else (2 if n is None else n)
    assert ck.gradient_checkpointing == (expected > 0)
    batch = inputs()
    calls = []
    orig = torch.utils.checkpoint.checkpoint

    def counting(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    torch.utils.checkpoint.checkpoint = counting
    try:
        o2, g2, x2 = run(ck, batch)
    finally:
        torch.utils.checkpoint.checkpoint = orig
    assert len(calls) == expected
    o1, g1, x1 = run(plain, batch)
    assert_same_run((o2, g2, x2), (o1, g1, x1))


def _train(model, steps=3, lr=1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    assert params
    before = [p.detach().clone() for p in params]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    batch = inputs()
    for _ in range(steps):
        opt.zero_grad()
        out = model(**batch, return_dict=False)[0]
        loss = ((out.float() - 1.0) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(not torch.equal(b, p.detach()) for b, p in zip(before, params)), "every LoRA tensor moves"
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(frozen[n], p.detach()), f"frozen {n} changed"
    assert losses[-1] < losses[0]
    return losses


QUANT_TYPES = {"int8": "Int8Linear", "nf4": "Linear4bit", "fp8": "Fp8Linear"}


@pytest.mark.parametrize("mode,order", [("int8", "quantize_then_lora"), ("nf4", "quantize_then_lora"),
                                        ("fp8", "quantize_then_lora"), ("int8", "lora_then_quantize"),
                                        ("nf4", "lora_then_quantize"), ("fp8", "lora_then_quantize")])
def test_quantized_base_trains_lora(mode, order):
    if order == "quantize_then_lora":
        model = add_lora(memory.quantize_base(tiny_model(), mode, device="cpu"))
    else:
        model = memory.quantize_base(add_lora(tiny_model()), mode, device="cpu")
    blk = model.transformer_blocks[0]
    for layer in (blk.attn.to_q, blk.attn.to_out[0], blk.ff.down):
        assert hasattr(layer, "lora_A"), "PEFT LoRA attached"
        assert type(layer.base_layer).__name__ == QUANT_TYPES[mode]
        assert not layer.base_layer.weight.requires_grad
        assert layer.base_layer.weight.dtype in (torch.int8, torch.uint8)
    # outside the blocks nothing is quantised
    assert type(model.img_in) is torch.nn.Linear
    _train(model)


def test_quantized_output_close_to_plain(plain):
    """Quantisation error on the tiny model: relative L2 error of the output (loose, per format)."""
    batch = inputs()
    with torch.no_grad():
        ref = plain(**batch, return_dict=False)[0]
        for mode, tol in (("int8", 0.01), ("fp8", 0.02), ("nf4", 0.05)):
            q = memory.quantize_base(twin(plain), mode, device="cpu")
            out = q(**batch, return_dict=False)[0]
            assert ((out - ref).norm() / ref.norm()).item() < tol, mode


def test_fp8_matmul_trains_and_stays_close_to_dequantized_path(plain):
    """fp8_matmul: forward through torch._scaled_mm (activations quantised per token). Output within 1% (relative
    L2) of the dequantise-then-matmul fp8 path; LoRA trains, base frozen."""
    batch = inputs()
    deq = memory.quantize_base(twin(plain), "fp8", device="cpu")
    mm = memory.quantize_base(twin(plain), "fp8", device="cpu", fp8_matmul=True)
    assert mm.transformer_blocks[0].ff.up.base_layer.fp8_matmul
    with torch.no_grad():
        o1 = deq(**batch, return_dict=False)[0]
        o2 = mm(**batch, return_dict=False)[0]
    assert ((o2 - o1).norm() / o1.norm()).item() < 0.01
    _train(mm)


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_quantized_backward_equals_autograd_on_dequantized_weights(plain, mode):
    """The custom int8/fp8 autograd function (saves 1-byte weights only) gives the gradients autograd gives with the
    dequantised weights as ordinary frozen Linear weights."""
    q = memory.quantize_base(twin(plain), mode, device="cpu")
    ref = twin(plain)
    ref_layers = dict(ref.named_modules())
    n = 0
    with torch.no_grad():
        for name, mod in q.named_modules():
            if isinstance(mod, memory.QuantLinear):
                ref_layers[name].weight.copy_(mod.dequantized_weight(torch.float32))
                n += 1
    assert n == 2 * 8  # 2 blocks x (q, k, v, gate, out, ff gate/up/down)
    batch = inputs()
    o1, g1, x1 = run(ref, batch)
    o2, g2, x2 = run(q, batch)
    torch.testing.assert_close(o2, o1, atol=1e-5, rtol=1e-5)
    assert_close_grads(g2, g1, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(x2, x1, atol=1e-6, rtol=1e-4)


def test_block_offload_is_exact_and_leaves_lora_resident(plain):
    off = twin(plain)
    settings = resolve_memory_settings(dict(offload_blocks=True, gradient_checkpointing=False))
    memory.apply_memory_settings(off, settings, "cpu")
    assert off.gradient_checkpointing and off._krea2_checkpoint_blocks == len(off.transformer_blocks)
    offloader = off._krea2_offloader
    assert offloader.tensors[0] and all(not p.requires_grad for p, _ in offloader.tensors[0])
    onloads = []
    orig = offloader._onload
    offloader._onload = lambda i: (onloads.append(i), orig(i))[1]
    batch = inputs()
    o1, g1, x1 = run(plain, batch)
    o2, g2, x2 = run(off, batch)
    # forward 0,1 then recompute in backward 1,0
    assert onloads == [0, 1, 1, 0]
    torch.testing.assert_close(o2, o1, atol=1e-5, rtol=1e-5)
    assert_close_grads(g2, g1, atol=1e-6, rtol=1e-4)


def test_nf4_with_offload_gives_the_same_output_every_call(plain):
    """bitsandbytes repacks an NF4 weight for its CPU kernel on first use in eval mode; the offloader must keep the repacked
    tensor, not restore the one it saved (that gave every call after the first scrambled weights, ~0.2 off)."""
    nf4 = twin(plain)
    memory.apply_memory_settings(nf4, resolve_memory_settings(dict(preset="16gb", compile=False)), "cpu")
    resident = twin(plain)
    memory.apply_memory_settings(resident, resolve_memory_settings(dict(quantize="nf4", compile=False)), "cpu")
    nf4.eval(), resident.eval()  # bitsandbytes repacks only in eval mode, for inputs without grad (previews)
    batch = inputs()
    with torch.no_grad():
        first, second = (nf4(**batch, return_dict=False)[0] for _ in range(2))
        reference = resident(**batch, return_dict=False)[0]
    torch.testing.assert_close(second, first, atol=1e-6, rtol=0)
    torch.testing.assert_close(first, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("early_stop", [True, False])
@pytest.mark.parametrize("mode", ["none", "int8", "fp8", "nf4"])
def test_block_offload_never_computes_with_an_offloaded_weight(plain, mode, early_stop):
    """Offloaded weights are swapped for NaN (poison mode): outputs and gradients must still equal the resident
    model's, which proves every forward and every backward (checkpoint recompute, with and without torch's early
    stop of the recompute) ran with onloaded weights; and at most one block is on the device at a time (CPU, no
    prefetch), so backward does not pile up onloaded blocks either."""
    ref = memory.quantize_base(twin(plain), mode, device="cpu")
    off = memory.enable_checkpointing(twin(ref), None)
    memory.offload_blocks(off, "cpu", poison=True)
    offloader = off._krea2_offloader
    assert offloader.on_device == set()
    most = []
    onload = offloader._onload
    offloader._onload = lambda i: (onload(i), most.append(len(offloader.on_device)))[0]
    batch = inputs()
    o1, g1, x1 = run(ref, batch)
    with torch.utils.checkpoint.set_checkpoint_early_stop(early_stop):
        for _ in range(2):  # second step: starts from the state the first backward left
            o2, g2, x2 = run(off, batch)
            torch.testing.assert_close(o2, o1, atol=1e-5, rtol=1e-5)
            assert_close_grads(g2, g1, atol=1e-6, rtol=1e-4)
            torch.testing.assert_close(x2, x1, atol=1e-6, rtol=1e-4)
    assert most and max(most) == 1


def test_presets_resolve_and_overrides_win():
    for name in ("16gb", "24gb", "48gb", "80gb"):
        s = resolve_memory_settings(dict(preset=name))
        assert s.preset == name
    assert resolve_memory_settings(dict(preset="16gb")).quantize == "nf4"
    assert resolve_memory_settings(dict(preset="16gb")).offload_blocks
    assert resolve_memory_settings(dict(preset="24gb")).quantize == "int8"
    s = resolve_memory_settings(dict(preset="24gb", quantize="fp8", compile=None, checkpoint_blocks=None))
    assert s.quantize == "fp8" and s.compile is False and s.gradient_checkpointing
    plain = resolve_memory_settings(None)
    assert plain.quantize == "none" and plain.gradient_checkpointing and not plain.offload_blocks
    with pytest.raises(ValueError):
        resolve_memory_settings(dict(preset="12gb"))
    with pytest.raises(ValueError):
        resolve_memory_settings(dict(quantize="int4"))
    with pytest.raises(ValueError):
        resolve_memory_settings(dict(bogus=1))


@pytest.mark.parametrize("preset", ["16gb", "24gb", "48gb", "80gb"])
def test_every_preset_trains_tiny(preset):
    torch._dynamo.reset()
    model = add_lora(tiny_model())
    settings = resolve_memory_settings(dict(preset=preset))
    # aot_eager: the compile wiring without inductor's C++ build time on the CI's 2 cores
    memory.apply_memory_settings(model, settings, "cpu", compile_kwargs=dict(backend="aot_eager"))
    assert isinstance(model.transformer_blocks[0].attn.processor, speed.Krea2FastAttnProcessor)
    _train(model, steps=2)
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["none", "fp8", "int8", "nf4"])
def test_paths_under_bf16_autocast(mode):
    """The trainer runs under accelerate's bf16 autocast: every base format (with the fused path for bf16) gives
    finite outputs and LoRA gradients close to the plain model under the same autocast."""
    batch = inputs()
    ref = add_lora(tiny_model())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o1, g1, _ = run(ref, batch)
    model = add_lora(tiny_model())
    memory.apply_memory_settings(model, resolve_memory_settings(dict(quantize=mode, fuse_qkv=True)), "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o2, g2, _ = run(model, batch)
    assert o2.dtype == torch.bfloat16 and all(torch.isfinite(g).all() for g in g2.values())
    tol = {"none": 1e-2, "fp8": 2e-2, "int8": 2e-2, "nf4": 5e-2}[mode]  # bf16 rounding + quantisation error
    assert ((o2.float() - o1.float()).norm() / o1.float().norm()).item() < tol


# ------------------------------------------------------------------------------------------- the int8 layer alone
def _linear(n=48, k=96, bias=True, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(k, n, bias=bias)


@pytest.mark.parametrize("bias", [True, False])
def test_int8_layer_matches_linear_on_dequantized_and_original_weight(bias):
    """Int8Linear: int8 storage, fp32 per-row scale, row max stored as +-127 exactly; forward and input gradient equal
    a plain Linear on the dequantised weight (tight) and on the original weight within int8 rounding."""
    lin = _linear(bias=bias)
    q = memory.Int8Linear(lin)
    assert q.weight.dtype == torch.int8 and not q.weight.requires_grad
    assert q.weight_scale.dtype == torch.float32 and q.weight_scale.shape == (lin.out_features,)
    assert (q.weight.abs().amax(dim=1) == 127).all()
    w = q.dequantized_weight()
    # symmetric round-to-nearest: every weight within half a step of its row's scale
    assert ((w - lin.weight).abs() <= 0.5 * q.weight_scale[:, None] * (1 + 1e-5)).all()
    x = torch.randn(3, 5, lin.in_features)
    for weight, atol, rtol in ((w, 1e-6, 1e-5), (lin.weight, 2e-2, 2e-2)):
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y1 = q(x1)
        y2 = torch.nn.functional.linear(x2, weight.detach(), lin.bias.detach() if bias else None)
        g = torch.randn_like(y1)
        y1.backward(g)
        y2.backward(g)
        torch.testing.assert_close(y1, y2, atol=atol, rtol=rtol)
        torch.testing.assert_close(x1.grad, x2.grad, atol=atol, rtol=rtol)
    assert q.weight.grad is None and (not bias or q.bias.grad is None)
    # moving the model to another float dtype leaves the int8 storage alone
    assert q.to(torch.bfloat16).weight.dtype == torch.int8


def test_int8_layer_under_peft_lora_and_autocast():
    """PEFT wraps Int8Linear as `base_layer` (LoRA stays fp32); the LoRA gets gradients, the base none; the adapter
    state holds only LoRA tensors; under bf16 autocast the matmul runs in bf16."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    model = torch.nn.Sequential()
    model.add_module("proj", memory.Int8Linear(_linear(bias=False)))
    model = inject_adapter_in_model(LoraConfig(r=4, target_modules=["proj"], init_lora_weights="gaussian"), model)
    layer = model.proj
    assert type(layer.base_layer) is memory.Int8Linear
    assert layer.lora_A["default"].weight.dtype == torch.float32
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(4, 96, requires_grad=True)
    model(x).square().mean().backward()
    assert layer.lora_A["default"].weight.grad.abs().sum() > 0 and layer.lora_B["default"].weight.grad.abs().sum() > 0
    assert layer.base_layer.weight.grad is None and x.grad is not None
    assert set(get_peft_model_state_dict(model)) == {"proj.lora_A.weight", "proj.lora_B.weight"}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.base_layer(x).dtype == torch.bfloat16


def _input_alive_after_checkpointed_forward(layer) -> bool:
    """Run `layer` on a fresh intermediate inside a non-reentrant checkpoint and report whether that intermediate is
    still alive once the forward returns (checkpointing should have dropped everything the layer saved)."""
    alive = []

    def fn(x):
        h = x * 2  # the layer's input: an activation only the layer could keep alive
        alive.append(weakref.ref(h.untyped_storage()))
        return layer(h)

    x = torch.randn(64, layer.in_features, requires_grad=True)
    y = torch.utils.checkpoint.checkpoint(fn, x, use_reentrant=False)
    kept = alive[0]() is not None
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    return kept


def test_int8_layer_keeps_no_input_under_checkpointing_unlike_bitsandbytes():
    """Why the int8 base is hand-written: bitsandbytes' MatMul8bitLt stores its input on the autograd ctx (not via
    save_for_backward), so checkpointing cannot drop it (~9 GiB at 1024 px for the 12.9B model). Int8Linear saves
    only its int8 weight and scale: under checkpointing the input dies with the forward, and without checkpointing
    the tensors it saves for backward are exactly those two."""
    lin = _linear(bias=False)
    q = memory.Int8Linear(lin)
    assert not _input_alive_after_checkpointed_forward(q)
    assert not _input_alive_after_checkpointed_forward(torch.nn.Linear(96, 48).requires_grad_(False))  # control
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(64, 96, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        q(x * 2).sum().backward()
    assert {(t.dtype, tuple(t.shape)) for t in saved} == {(torch.int8, (48, 96)), (torch.float32, (48,))}

    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear8bitLt(96, 48, bias=False, has_fp16_weights=False, threshold=6.0, device="meta")
    layer.weight = bnb.nn.Int8Params(lin.weight.detach(), requires_grad=False, has_fp16_weights=False)._quantize("cpu")
    assert _input_alive_after_checkpointed_forward(layer), "bitsandbytes changed: its int8 matmul frees its input"


def test_memory_settings_wire_the_shared_lora_input():
    """memory.share_lora_input (default on) reaches every LoRA layer; under bf16 autocast the result is the same as
    with it off, bit for bit (speed tests cover the path itself)."""
    shared = add_lora(tiny_model(torch.bfloat16))
    for p in shared.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # the trainer's fp32 LoRA on a bf16 base
    plain = twin(shared)
    on = resolve_memory_settings(dict(gradient_checkpointing=False))
    off = resolve_memory_settings(dict(gradient_checkpointing=False, share_lora_input=False))
    assert on.share_lora_input and not off.share_lora_input
    memory.apply_memory_settings(shared, on, "cpu")
    memory.apply_memory_settings(plain, off, "cpu")
    for model, flag in ((shared, True), (plain, False)):
        layers = [m for m in model.modules() if hasattr(m, "lora_A")]
        assert layers and all(getattr(m, "_krea2_shared_input", False) is flag for m in layers)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = run(plain, inputs(dtype=torch.bfloat16))
        b = run(shared, inputs(dtype=torch.bfloat16))
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    assert_close_grads(a[1], b[1], rtol=0, atol=0)
