#!/usr/bin/env python
"""Estimate the peak GPU memory of one Krea 2 LoRA training step per memory preset, on a CPU, without allocating.

Same set-up as scripts/bench_step.py (its CONFIGS, LoRA targets and batch): the FULL 12.9B `Krea2Transformer2DModel()`
built on the `meta` device (no bytes allocated), LoRA rank 32 (fp32) on the attention projections of all 28 blocks,
batch 1, 1024 px (4096 image tokens), text padded to 512 tokens with 128 valid. Runs in ~10 s per config, < 2 GiB RAM.

    python scripts/estimate_memory.py                      # every bench_step config, one table
    python scripts/estimate_memory.py --configs int8 --json out.json
    python scripts/estimate_memory.py --configs '' --fsdp 2,4,8   # FSDP rows only (per GPU, N processes)

What is modelled
  * Static, from the real module tree (after PEFT and the config's memory settings):
      base weights as stored: bf16 2 B/param (RMSNorm scales fp32, as diffusers keeps them); int8 / fp8 =
      memory.Int8Linear / memory.Fp8Linear as they are (1 B/param + fp32 row scale); NF4 = bitsandbytes Params4bit
      (0.5 B/param + uint8 absmax per 64 + fp32 absmax per 256 absmax + codes). Only the block Linears are
      quantised (as memory.quantize_base does). The byte formulas are checked against the real quantised layers of
      the tiny model (tests/test_estimate_memory.py).
      Block offload (`16gb`): non-block weights, LoRA and quantisation statistics stay resident; of the offloaded
      frozen block weights, BlockOffloader keeps the running block plus one prefetched neighbour: 2 blocks.
      LoRA params fp32, grads fp32 (set_to_none: they appear during backward, so they are counted inside the
      traced dynamic peak), AdamW 2 x fp32 states, or bitsandbytes AdamW8bit 2 x (1 B + fp32 absmax per 256).
  * Dynamic (activations, saved tensors, transients, grads): the real forward + backward of the meta model (real
    PEFT layers, attention processors, checkpointing hooks of memory.enable_checkpointing, fused q/k/v), counting the
    bytes of every tensor a dispatched op allocates (a TorchDispatchMode; views and in-place ops allocate nothing)
    until its storage dies, like torch.cuda.max_memory_allocated counts the caching allocator's live blocks.
    The 28 blocks are all traced (no extrapolation).
      - bf16 autocast, as bench_step's step() and the trainer (accelerate, mixed_precision bf16) run the forward:
        real torch.autocast does not act on meta tensors, so EmulatedAutocast (a TorchFunctionMode, i.e. above
        autograd like the real Autocast key) applies CUDA autocast's casts: linear / matmul / bmm / baddbmm / SDPA
        (the AUTOCAST_LOWER list) get their floating args in bf16, the AUTOCAST_FP32 ops (norms, pow, exp, losses...)
        in fp32. A cast is a differentiable .to(), so its copy is counted, saved and freed as autograd does; the bf16
        copies of the fp32 LoRA weights are cached until the autocast region exits, as autocast's weight cache is.
        `torch.autocast` / `torch.amp.autocast` on meta enter the emulated region (so checkpoint recomputation, which
        re-enters the autocast state it recorded, is cast too), and torch.is_autocast_enabled / get_autocast_dtype
        and speed._autocast_dtype answer "on, bf16" inside it: memory.share_lora_input (default on) then feeds the
        bf16 layer input to lora_A, and memory.QuantLinear dequantises straight to bf16, as on the GPU. With
        `memory.share_lora_input` off (`--no-share-lora-input`), PEFT's fp32 copy of each LoRA input is made and
        autocast's bf16 re-cast of it is what lora_A saves: allocated +0.14 GiB (bf16_ckpt, int8: only at the
        recompute peak), +1.74 GiB (48gb), +4.06 GiB (80gb). Before the emulation the trace ran without autocast
        (fp32 LoRA matmuls keeping PEFT's fp32 input copies), est. card: 80gb 58.57 -> 55.65, 48gb 40.73 -> 39.48,
        bf16_ckpt 28.31 -> 28.20 (bf16_ckpt_nofuse 28.63 -> 28.20), int8 17.19 -> 16.77, nf4_offload 6.44 -> 6.02.
        FSDP (sharding.shard_transformer since 5a4e002) gathers the stored dtypes, no bf16 param policy, and
        computes under the same autocast: its activations are the single-GPU trace's (share_lora_input included)
        and its gathered blocks/root hold fp32 LoRA and norm scales (N=2 est. card, before with the bf16 policy:
        fsdp_ckpt 19.50 -> 19.51, fsdp_48gb 30.74 -> 30.79 GiB).
        tests/test_estimate_memory.py compares the emulated trace with real CPU bf16-autocast steps of the tiny
        model (CPU autocast casts the same matmul ops; the trace asserts no op of CUDA's fp32 list met a bf16
        input there), share_lora_input on and off: the on/off difference matches to the byte.
      - Attention: on meta/CPU SDPA would take the math path and materialise L x L scores that flash attention on an
        H100 never stores. SDPA is replaced during the trace by a cost model of the CUDA kernels: the forward saves
        q, k, v, out and an fp32 logsumexp; the backward holds an fp32 dQ accumulator and (GQA) k/v-head-expanded
        dK/dV before reducing. The masked path (baseline: no trim) is costed the same way (memory-efficient kernel).
      - Text-padding trim: fed as the trimmed batch (128 text tokens, no mask) since the trim hook needs real data.
      - NF4 (bitsandbytes cannot run on meta): the block Linears are replaced by stand-ins with the same stored
        bytes and the same autograd memory pattern as bitsandbytes 0.50 on CUDA (MatMul4Bit at M=4224 on sm90:
        dequantise + F.linear): a transient bf16 weight in forward and again in backward; keeps nothing.
      - int8 / fp8 / fp8_mm: the real memory.Int8Linear / Fp8Linear code runs on meta (a transient bf16 weight per
        matmul; only the 1-byte weight and its scale saved). The int8 path used bnb's Linear8bitLt before, which
        keeps each layer's input outside save_for_backward: its stand-in here estimated 25.7 GiB for the `int8`
        row (0.32 GiB saved per block instead of 0.05, ~9 GiB in all at 1024 px); see memory.py.
      - RMSNorm runs as torch's composite on meta (CUDA has a fused kernel): same saved tensors (input + rstd), one
        extra fp32 transient (x**2) per norm in forward: a slight over-estimate.
  * Total allocated peak = resident weights + LoRA params + optimiser states + traced dynamic peak (the optimiser step
    itself, fused AdamW / AdamW8bit, needs only the grads, which the dynamic peak already covers).

What is NOT modelled (covered by the stated allowance, `--allowance` terms)
  * CUDA context + kernels (~0.5 GiB on an H100, outside torch's allocator): +0.5 GiB.
  * cuBLAS/cuBLASLt/cuDNN workspaces (tens of MiB per stream): +0.25 GiB.
  * Allocator fragmentation (reserved minus allocated; activations of varied sizes): +10% of the dynamic peak.
  * torch.compile (inductor buffers, fusions that drop intermediates, cudagraph pools): the `*_compile`, `48gb` and
    `80gb` rows are the eager estimate. Kernel-internal scratch not visible as tensors. Text encoder / VAE on the
    GPU (bench_step feeds random embeddings; the trainer caches them). One-off set-up peaks: bench_step builds the
    bf16 model on the GPU before quantising, and memory._block_linears keeps every original Linear alive until the
    quantisation loop ends.
The "est. card" column = allocated peak + allowance, and the fit verdict uses it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import sys
import time
import weakref
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from krea2_train.train import memory, speed  # noqa: E402

GiB = 2**30
CONTEXT_GIB = 0.5
WORKSPACE_GIB = 0.25
FRAGMENTATION = 0.10
OFFLOAD_RESIDENT_BLOCKS = 2  # BlockOffloader: running block + prefetched neighbour
BNB8_BLOCK = 256  # bitsandbytes 8-bit optimiser: one fp32 absmax per 256 state values
NF4_BLOCK, NF4_BLOCK2 = 64, 256

# config -> (target GiB, what the target is)
TARGETS = {
    "baseline": (None, "reference (SimpleTuner 33.3)"),
    "bf16_ckpt_nofuse": (33.0, "bf16+ckpt <= 33"),
    "bf16_ckpt": (33.0, "bf16+ckpt <= 33"),
    "bf16_ckpt_compile": (33.0, "bf16+ckpt <= 33"),
    "bf16_33gb": (33.0, "bf16+ckpt <= 33"),
    "int8": (20.0, "8-bit <= 20"),
    "fp8": (20.0, "8-bit <= 20"),
    "fp8_mm": (20.0, "8-bit <= 20"),
    "nf4_offload": (14.0, "NF4+offload <= 14"),
    "preset_48gb": (48.0, "48 GB card"),
    "preset_80gb": (80.0, "80 GB card"),
}


def _load_bench():
    spec = importlib.util.spec_from_file_location("_krea2_bench_step", ROOT / "scripts" / "bench_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bench = _load_bench()


# ------------------------------------------------------------------------------------------------ live bytes
class LiveBytes(TorchDispatchMode):
    """Counts bytes of tensors allocated by dispatched ops while their storage lives (views/in-place: no new bytes)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.cur = 0
        self.peak = 0
        self.ops = 0
        self.softmax_ops = 0
        # bytes of the LoRA .grad tensors (marked by trace_step's post-accumulate hooks): the peak without them is
        # what FSDP adds its sharded grads to
        self.grad_keys: set[int] = set()
        self.grad_cur = 0
        self.peak_without_grads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        if "softmax" in func.__name__:
            self.softmax_ops += 1
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for ret, t in zip(func._schema.returns, outs):
            if ret.alias_info is not None or not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key = id(st)
            if key in self.live:
                continue
            n = st.nbytes()
            self.live[key] = n
            self.cur += n
            self.peak = max(self.peak, self.cur)
            self.peak_without_grads = max(self.peak_without_grads, self.cur - self.grad_cur)
            weakref.finalize(st, self._free, key)
        return out

    def mark_grad(self, grad):
        key = id(grad.untyped_storage())
        if key in self.live and key not in self.grad_keys:
            self.grad_keys.add(key)
            self.grad_cur += self.live[key]

    def _free(self, key):
        n = self.live.pop(key, 0)
        self.cur -= n
        if key in self.grad_keys:
            self.grad_keys.discard(key)
            self.grad_cur -= n


# --------------------------------------------------------------------------------------------- attention model
class _FlashAttentionCost(torch.autograd.Function):
    """Memory pattern of CUDA flash / memory-efficient SDPA: saves q, k, v, out and an fp32 logsumexp; backward holds
    an fp32 dQ accumulator and, for GQA, dK/dV expanded to the query heads before the head reduction."""

    @staticmethod
    def forward(ctx, q, k, v, workspace):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.workspace = workspace
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        scratch = []
        if ctx.workspace:
            scratch.append(torch.empty(q.shape, dtype=torch.float32, device=q.device))  # dq_accum
            scratch.append(torch.empty(lse.shape, dtype=torch.float32, device=q.device))  # softmax_d
        dq = torch.empty_like(q)
        if ctx.workspace and k.shape[1] != q.shape[1]:
            scratch.append(torch.empty(q.shape, dtype=k.dtype, device=q.device))  # dk expanded
            scratch.append(torch.empty(q.shape, dtype=v.dtype, device=q.device))  # dv expanded
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        del scratch
        return dq, dk, dv, None


def _sdpa_cost(workspace):
    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if key.shape[-3] != query.shape[-3] and not enable_gqa:
            raise ValueError("k/v heads differ from q heads without enable_gqa")
        if _EMULATED is not None and _EMULATED.enabled:  # SDPA is an autocast lower-precision op
            (query, key, value), _ = _EMULATED.cast((query, key, value), {}, _EMULATED.dtype, "lower")
        return _FlashAttentionCost.apply(query, key, value, workspace)
    return sdpa


# ------------------------------------------------------------------------------------------- autocast on meta
# CUDA autocast's op lists (aten/src/ATen/autocast_mode.h of torch 2.13: AT_FORALL_LOWER_PRECISION_FP, AT_FORALL_FP32,
# AT_FORALL_FP32_SET_OPT_DTYPE; every name has an AutocastCUDA kernel in the installed torch, which
# tests/test_estimate_memory.py checks), by the Python name the op is called under (F.linear -> "linear",
# x @ w -> "__matmul__"). The recurrent cells and the promote list (ops that already promote mixed dtypes) are left out.
# Real torch.autocast does nothing to meta tensors (there is no Autocast key for the Meta backend), so the trace casts.
AUTOCAST_LOWER = frozenset({  # floating args cast to the autocast dtype (bf16)
    "linear", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "baddbmm", "addmm", "addbmm", "addmv", "addr", "mv",
    "einsum", "chain_matmul", "linalg_multi_dot", "linalg_vecdot", "conv1d", "conv2d", "conv3d", "conv_tbc",
    "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "convolution", "prelu", "scaled_dot_product_attention",
    "_scaled_dot_product_flash_attention"})
AUTOCAST_FP32 = frozenset({  # floating args cast to float32
    "acos", "asin", "cosh", "sinh", "tan", "erfinv", "exp", "expm1", "log", "log10", "log1p", "log2", "reciprocal",
    "rsqrt", "pow", "__pow__", "__rpow__", "softplus", "layer_norm", "native_layer_norm", "group_norm", "rms_norm",
    "nuclear_norm", "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "nll_loss2d",
    "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss",
    "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss",
    "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp"})
AUTOCAST_FP32_OUT = frozenset({  # dtype=float32 unless given
    "sum", "prod", "cumsum", "cumprod", "softmax", "log_softmax", "linalg_vector_norm", "linalg_matrix_norm"})


class EmulatedAutocast(TorchFunctionMode):
    """CUDA autocast for tensors on `device` (meta), as a torch-function mode, i.e. above autograd like the real
    Autocast dispatch key: a cast is a differentiable `.to()` whose copy autograd saves or frees like the real one.

    Only while an emulated `torch.autocast(device)` region is enabled (`traced_kernels` routes `torch.autocast` /
    `torch.amp.autocast` for the device here, and answers `torch.is_autocast_enabled` / `get_autocast_dtype` and
    speed._autocast_dtype from it, so checkpoint recomputation re-enters it and speed.share_lora_input and
    memory.QuantLinear see "autocast on, bf16" as on the GPU). Policies: AUTOCAST_LOWER ops get their floating
    (non-float64) args in the autocast dtype; AUTOCAST_FP32 in float32; AUTOCAST_FP32_OUT get dtype=float32. As
    cached_cast does, the lower-precision copies of float32 leaf tensors that require grad (the LoRA weights) are
    cached until the outermost region exits. `changed` counts, per policy, the calls whose dtypes it changed."""

    def __init__(self, device="meta"):
        super().__init__()
        self.device = device
        self.enabled, self.dtype, self.cache_enabled = False, torch.float16, True  # torch's CUDA defaults
        self.depth = 0
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.changed = {"lower": 0, "fp32": 0, "fp32_out": 0}

    def _eligible(self, t):
        return isinstance(t, torch.Tensor) and t.device.type == self.device and t.is_floating_point() \
            and t.dtype != torch.float64

    def _cast(self, x, dtype, hit):
        if isinstance(x, (list, tuple)):
            return type(x)(self._cast(v, dtype, hit) for v in x)
        if not self._eligible(x) or x.dtype == dtype:
            return x
        hit.append(True)
        if dtype == self.dtype and x.dtype == torch.float32 and x.requires_grad and x.is_leaf \
                and x._base is None and self.cache_enabled:
            got = self.cache.get(id(x))
            if got is None:
                got = self.cache[id(x)] = (x, x.to(dtype))
            return got[1]
        return x.to(dtype)

    def cast(self, args, kwargs, dtype, policy):
        hit = []
        args = tuple(self._cast(a, dtype, hit) for a in args)
        kwargs = {k: self._cast(v, dtype, hit) for k, v in kwargs.items()}
        self.changed[policy] += bool(hit)
        return args, kwargs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.enabled:
            name = getattr(func, "__name__", "")
            if name in AUTOCAST_LOWER:
                args, kwargs = self.cast(args, kwargs, self.dtype, "lower")
            elif name in AUTOCAST_FP32:
                args, kwargs = self.cast(args, kwargs, torch.float32, "fp32")
            elif name in AUTOCAST_FP32_OUT and kwargs.get("dtype") is None and args and self._eligible(args[0]):
                kwargs = {**kwargs, "dtype": torch.float32}
                self.changed["fp32_out"] += args[0].dtype != torch.float32
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def region(self, enabled=True, dtype=None, cache_enabled=None):
        """The emulated `torch.autocast(device, dtype, enabled, cache_enabled)`."""
        old = self.enabled, self.dtype, self.cache_enabled
        self.enabled = bool(enabled)
        self.dtype = dtype if dtype is not None else self.dtype
        self.cache_enabled = self.cache_enabled if cache_enabled is None else bool(cache_enabled)
        self.depth += 1
        try:
            # the mode is on the torch-function stack only inside regions: the backward (called outside) then runs
            # the engine with no mode popped, and checkpoint's recomputation, which re-enters the region it recorded,
            # is intercepted like the forward
            with self:
                yield self
        finally:
            self.depth -= 1
            self.enabled, self.dtype, self.cache_enabled = old
            if self.depth == 0:
                self.cache.clear()  # autocast's cache lives until the outermost region exits


_EMULATED: EmulatedAutocast | None = None


@contextlib.contextmanager
def traced_kernels(workspace=True, device="meta"):
    """SDPA -> flash cost model; fused q/k/v without the data-pointer check (meta tensors all point at 0); autocast on
    `device` emulated by an EmulatedAutocast (yielded): `torch.autocast` / `torch.amp.autocast` for the device enter
    its regions and the autocast queries (torch's, and speed._autocast_dtype) answer from it."""
    global _EMULATED
    emu = EmulatedAutocast(device)
    names = ("is_autocast_enabled", "get_autocast_dtype", "autocast")
    old_torch = {n: getattr(torch, n) for n in names}
    old_amp = torch.amp.autocast, torch.amp.is_autocast_available
    old = F.scaled_dot_product_attention, speed._fused_weight, speed._autocast_dtype
    is_enabled, get_dtype, autocast, available = (torch.is_autocast_enabled, torch.get_autocast_dtype, torch.autocast,
                                                  torch.amp.is_autocast_available)
    autocast_dtype = speed._autocast_dtype

    def ours(a, k):
        dev = a[0] if a else k.get("device_type")
        return isinstance(dev, str) and dev == device

    def amp_autocast(device_type, dtype=None, enabled=True, cache_enabled=None):
        if device_type == device:
            return emu.region(enabled, dtype, cache_enabled)
        return autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)

    F.scaled_dot_product_attention = _sdpa_cost(workspace)
    speed._fused_weight = lambda attn: getattr(attn, "_krea2_fused_weight", None)
    speed._autocast_dtype = lambda dev: (emu.dtype if emu.enabled else None) if dev == device else autocast_dtype(dev)
    torch.is_autocast_enabled = lambda *a, **k: emu.enabled if ours(a, k) else is_enabled(*a, **k)
    torch.get_autocast_dtype = lambda *a, **k: emu.dtype if ours(a, k) else get_dtype(*a, **k)
    torch.autocast = torch.amp.autocast = amp_autocast
    torch.amp.is_autocast_available = lambda dev: dev == device or available(dev)
    _EMULATED = emu
    try:
        yield emu
    finally:
        _EMULATED = None
        for n, v in old_torch.items():
            setattr(torch, n, v)
        torch.amp.autocast, torch.amp.is_autocast_available = old_amp
        F.scaled_dot_product_attention, speed._fused_weight, speed._autocast_dtype = old


# ----------------------------------------------------------------------------------------- quantised stand-ins
def nf4_bytes(n, k):
    numel = n * k
    blocks = math.ceil(numel / NF4_BLOCK)
    # packed 4-bit + uint8 absmax (double quant) + fp32 absmax of the absmax + nested code (256 fp32) + nf4 code
    # (16 fp32) + offset (fp32 scalar)
    return (numel + 1) // 2 + blocks + 4 * math.ceil(blocks / NF4_BLOCK2) + 4 * 256 + 4 * 16 + 4


class _Nf4Fn(torch.autograd.Function):
    """bitsandbytes MatMul4Bit at large M on sm90: dequantise to the compute dtype, F.linear; backward dequantises
    again for grad_x; nothing activation-sized is saved."""

    @staticmethod
    def forward(ctx, x, weight, out_features):
        k = x.shape[-1]
        absmax = torch.empty(math.ceil(out_features * k / NF4_BLOCK), dtype=torch.float32, device=x.device)
        w = torch.empty(out_features, k, dtype=x.dtype, device=x.device)
        del absmax
        out = F.linear(x, w)
        ctx.meta = (out_features, k, x.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        n, k, dtype = ctx.meta
        absmax = torch.empty(math.ceil(n * k / NF4_BLOCK), dtype=torch.float32, device=grad.device)
        w = torch.empty(n, k, dtype=grad.dtype, device=grad.device)
        del absmax
        return grad @ w, None, None


class Nf4StandIn(nn.Module):
    """A frozen NF4 Linear: bitsandbytes' stored bytes as meta tensors, its autograd memory pattern in forward.
    Packed weights are a parameter; statistics are buffers (they stay resident under BlockOffloader like bnb's
    quant_state, which is not a parameter)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        n, k = self.out_features, self.in_features
        dev = linear.weight.device
        blocks = math.ceil(n * k / NF4_BLOCK)
        self.weight = nn.Parameter(torch.empty((n * k + 1) // 2, 1, dtype=torch.uint8, device=dev),
                                   requires_grad=False)
        self.register_buffer("absmax", torch.empty(blocks, dtype=torch.uint8, device=dev))
        self.register_buffer("absmax2", torch.empty(math.ceil(blocks / NF4_BLOCK2), dtype=torch.float32, device=dev))
        self.register_buffer("code2", torch.empty(256, dtype=torch.float32, device=dev))
        self.register_buffer("code", torch.empty(16, dtype=torch.float32, device=dev))
        self.register_buffer("offset", torch.empty((), dtype=torch.float32, device=dev))
        if linear.bias is not None:
            raise ValueError("Krea 2 block Linears have no bias")

    def forward(self, x):
        return _Nf4Fn.apply(x, self.weight, self.out_features)


def quantize_standins(model, mode):
    """memory.quantize_base's layer selection with NF4 stand-ins; int8 and fp8 need none (the real Int8Linear /
    Fp8Linear run on meta when memory.apply_memory_settings calls quantize_base)."""
    if mode != "nf4":
        return
    for parent, name, linear in memory._block_linears(model):
        setattr(parent, name, Nf4StandIn(linear))
    model._krea2_quantized = mode


# ------------------------------------------------------------------------------------------------- building
def build_meta(tiny: bool, rank: int, dtype=torch.bfloat16):
    from diffusers import Krea2Transformer2DModel

    config = {}
    if tiny:
        from krea2_train.models.tiny import TINY_TRANSFORMER as config
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = Krea2Transformer2DModel(**config)
    finally:
        torch.set_default_dtype(old)
    for mod in model.modules():
        if type(mod).__name__ == "Krea2RMSNorm":
            mod.float()
    bench.add_lora(model, rank)
    return model.eval()


def prepare(model, name, fsdp=False, memory_overrides=None):
    """bench_step.bench_config's set-up on meta. Returns (effective settings, is_baseline). `fsdp`: as the trainer's
    _build_model under FSDP (q/k/v fusion and compile off). `memory_overrides`: memory settings put over the config's
    (e.g. share_lora_input=False)."""
    overrides, is_baseline = bench.CONFIGS[name]
    settings = memory.resolve_memory_settings({**overrides, **(memory_overrides or {})})
    if fsdp:
        if is_baseline or settings.quantize != "none" or settings.offload_blocks or settings.optimizer_8bit:
            raise ValueError(f"{name}: FSDP trains a bf16 base with AdamW, no offload (sharding.check_fsdp_settings)")
        settings = dataclasses.replace(settings, fuse_qkv=False, compile=False)
    if is_baseline:
        speed.set_plain_attention(model)
        memory.enable_checkpointing(model, None)
        settings = dataclasses.replace(settings, trim_text_padding=False, fuse_qkv=False, compile=False)
        return settings, True
    quantize_standins(model, settings.quantize)
    run = dataclasses.replace(settings, offload_blocks=False, compile=False)
    if settings.offload_blocks:  # what apply_memory_settings does when offloading; the offload itself is costed
        run = dataclasses.replace(run, gradient_checkpointing=True, checkpoint_blocks=None, fuse_qkv=False)
    memory.apply_memory_settings(model, run, "meta", compute_dtype=torch.bfloat16)
    return settings, False


# ------------------------------------------------------------------------------------------------ static bytes
def _nbytes(t):
    return t.numel() * t.element_size()


def static_bytes(model, offload: bool = False, optimizer_8bit: bool = False) -> dict:
    """Bytes the step keeps resident outside activations. Unique tensors (fused q/k/v views partition their buffer)."""
    blocks = list(model.transformer_blocks)
    in_block = {id(t) for b in blocks for t in list(b.parameters()) + list(b.buffers())}
    frozen_nonblock = trainable = trainable_numel = 0
    for p in model.parameters():
        if p.requires_grad:
            trainable += _nbytes(p)
            trainable_numel += p.numel()
        elif id(p) not in in_block:
            frozen_nonblock += _nbytes(p)
    frozen_nonblock += sum(_nbytes(b) for b in model.buffers() if id(b) not in in_block)
    resident_block, offloadable = 0, []
    for b in blocks:
        off = 0
        for p in b.parameters():
            if p.requires_grad:
                continue
            if offload:
                off += _nbytes(p)
            else:
                resident_block += _nbytes(p)
        resident_block += sum(_nbytes(x) for x in b.buffers())
        offloadable.append(off)
    if offload:
        weights = frozen_nonblock + resident_block + sum(sorted(offloadable)[-OFFLOAD_RESIDENT_BLOCKS:])
    else:
        weights = frozen_nonblock + resident_block + sum(offloadable)
    if optimizer_8bit:
        optim = 2 * sum(p.numel() + 4 * math.ceil(p.numel() / BNB8_BLOCK) if p.numel() >= 4096 else 4 * p.numel()
                        for p in model.parameters() if p.requires_grad)
    else:
        optim = 2 * 4 * trainable_numel
    return dict(weights=weights, weights_all_on_gpu=frozen_nonblock + resident_block + sum(offloadable),
                lora_params=trainable, lora_grads=4 * trainable_numel, optimizer=optim, trainable_numel=trainable_numel)


# ----------------------------------------------------------------------------------------------------- trace
def trace_step(model, settings, is_baseline, resolution=1024, text_tokens=512, caption_tokens=128,
               dtype=torch.bfloat16, device="meta", workspace=True, inputs=None):
    """Forward + backward of bench_step's step under LiveBytes, the forward under (emulated) autocast to `dtype` unless
    that is float32, as bench_step and the trainer run it. Returns a dict of bytes: peak, after_forward,
    after_backward, saved_per_block (forward), peak_without_grads, grads_after_backward; ops; autocast_casts (the
    EmulatedAutocast's count of calls it cast, per policy). `inputs` (tests): a real batch from
    bench_step.make_batch."""
    cfg = model.config
    trim = settings.trim_text_padding and not is_baseline
    n_text = caption_tokens if trim else text_tokens
    side = resolution // 16
    n_img = side * side
    tracker = LiveBytes()
    marks = []
    hooks = [b.register_forward_hook(lambda m, a, o: marks.append(tracker.cur)) for b in model.transformer_blocks]
    hooks += [p.register_post_accumulate_grad_hook(lambda p: tracker.mark_grad(p.grad))
              for p in model.parameters() if p.requires_grad]
    try:
        with traced_kernels(workspace, device) as emu, tracker:
            if inputs is None:
                x0 = torch.empty(1, n_img, cfg.in_channels, dtype=dtype, device=device)
                noise = torch.empty_like(x0)
                text = torch.empty(1, n_text, cfg.num_text_layers, cfg.text_hidden_dim, dtype=dtype, device=device)
                pos = torch.zeros(n_text + n_img, 3, dtype=torch.long, device=device)
                mask = None if trim else torch.ones(1, n_text, dtype=torch.bool, device=device)
            else:
                x0, noise, text, pos = (inputs[k].clone() for k in ("x0", "noise", "text", "pos"))
                mask = inputs["mask"].clone()
                if trim:
                    text, mask, pos = speed.trim_text_padding(text, mask, pos)
            sigma = torch.rand(1, device=device)
            s = sigma.to(dtype)[:, None, None]
            x_t = (1 - s) * x0 + s * noise
            with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
                out = model(hidden_states=x_t, encoder_hidden_states=text, timestep=sigma, position_ids=pos,
                            encoder_attention_mask=mask, return_dict=False)[0]
            loss = F.mse_loss(out.float(), (noise - x0).float())
            del out
            after_forward = tracker.cur
            loss.backward()
            del loss, x0, noise, text, pos, mask, x_t, s, sigma
            after = tracker.cur
    finally:
        for h in hooks:
            h.remove()
    if tracker.softmax_ops:
        raise RuntimeError("a softmax ran in the trace: some attention escaped the flash cost model")
    per_block = [b - a for a, b in zip(marks, marks[1:])][: len(model.transformer_blocks) - 1]
    return dict(peak=tracker.peak, after_backward=after, after_forward=after_forward, ops=tracker.ops,
                saved_per_block=max(per_block) if per_block else 0, peak_without_grads=tracker.peak_without_grads,
                grads_after_backward=tracker.grad_cur, autocast_casts=dict(emu.changed))


def estimate(name, tiny=False, rank=32, resolution=None, text_tokens=512, caption_tokens=128,
             memory_overrides=None) -> dict:
    resolution = resolution or (256 if tiny else 1024)
    t0 = time.perf_counter()
    model = build_meta(tiny, rank)
    settings, is_baseline = prepare(model, name, memory_overrides=memory_overrides)
    opt8 = settings.optimizer_8bit and not is_baseline
    st = static_bytes(model, offload=settings.offload_blocks, optimizer_8bit=opt8)
    tr = trace_step(model, settings, is_baseline, resolution, text_tokens, caption_tokens)
    dynamic = tr["peak"]
    alloc = st["weights"] + st["lora_params"] + st["optimizer"] + dynamic
    allowance = CONTEXT_GIB * GiB + WORKSPACE_GIB * GiB + FRAGMENTATION * dynamic
    target, what = TARGETS.get(name, (None, ""))
    card = alloc + allowance
    return dict(config=name, quantize=settings.quantize, offload=settings.offload_blocks,
                checkpoint_blocks=getattr(model, "_krea2_checkpoint_blocks", 0) if model.gradient_checkpointing else 0,
                fuse_qkv=settings.fuse_qkv and not is_baseline, compile=settings.compile, optimizer_8bit=opt8,
                text_tokens_run=caption_tokens if settings.trim_text_padding and not is_baseline else text_tokens,
                weights_gib=st["weights"] / GiB, weights_all_on_gpu_gib=st["weights_all_on_gpu"] / GiB,
                lora_grads_optim_gib=(st["lora_params"] + st["lora_grads"] + st["optimizer"]) / GiB,
                lora_params_gib=st["lora_params"] / GiB, optimizer_gib=st["optimizer"] / GiB,
                grads_gib=st["lora_grads"] / GiB, activation_peak_gib=(dynamic - st["lora_grads"]) / GiB,
                dynamic_peak_gib=dynamic / GiB, after_forward_gib=tr["after_forward"] / GiB, saved_per_block_gib=tr["saved_per_block"] / GiB,
                est_alloc_gib=alloc / GiB, allowance_gib=allowance / GiB, est_card_gib=card / GiB,
                target_gib=target, target=what, fits=None if target is None else card <= target * GiB,
                trainable_params=st["trainable_numel"], traced_ops=tr["ops"],
                seconds=time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------------- FSDP
# FSDP row -> the bench_step config whose memory settings it trains with (fuse_qkv and compile off, as the trainer's
# _build_model does under FSDP; no quantisation / offload / 8-bit optimiser: sharding.check_fsdp_settings refuses them)
FSDP_CONFIGS = {"fsdp_ckpt": "bf16_ckpt_nofuse", "fsdp_48gb": "preset_48gb"}
FSDP_GATHERED_BLOCKS = 2  # the running block's unsharded params + the prefetched next block's all-gather output
FSDP_RS_BUFFERS = 2  # fp32 reduce-scatter inputs: the block being reduced + one in flight (max_input_buffers=1)
NCCL_GIB = 0.25  # NCCL communicator buffers, outside torch's allocator
CARDS_GIB = (16, 24, 48)


def _dim0_chunks(rows: int, n: int) -> list[int]:
    """Rows of each rank's shard: FSDP2 shards dim 0 like torch.chunk (ceil(rows/n) each, the tail short or empty)."""
    c = -(-rows // n)
    return [max(0, min(c, rows - r * c)) for r in range(n)]


def fsdp_layout(model, n: int, param_dtype=None) -> dict:
    """Per-rank bytes of `sharding.shard_transformer`'s groups (one per transformer block + the root), from the real
    module tree as built (stored dtypes: bf16 base, fp32 norms, fp32 LoRA). `param_dtype`: a MixedPrecisionPolicy's
    (bf16: every parameter is all-gathered in bf16); None = the stored dtypes, which sharding.shard_transformer
    gathers (no policy since it computes under the same autocast as DDP).

    Per group: `shard` = bytes each rank's local shards hold (list over ranks, unpadded torch.chunk pieces: they add
    up to the unsharded bytes exactly), `shard_padded` = what FSDP2 allocates per rank (every rank's shard padded to
    ceil(rows/n): the sharded storage, the all-gather input view and the reduce-scatter output); `gathered` = bytes of
    the unsharded parameters after the all-gather; `ag_buffer` = the flat all-gather output (n x padded shard, in
    param_dtype); `trainable` = numel of the LoRA params (grads: unsharded in param_dtype, reduce-scatter in fp32)."""
    if any(True for _ in model.buffers()):
        raise ValueError("the model has buffers: FSDP replicates them, which fsdp_layout does not count")
    gsize = torch.empty((), dtype=param_dtype).element_size() if param_dtype is not None else None
    blocks = list(model.transformer_blocks)
    in_block = {id(p) for b in blocks for p in b.parameters()}
    groups = [(f"block{i}", list(b.parameters())) for i, b in enumerate(blocks)]
    groups.append(("root", [p for p in model.parameters() if id(p) not in in_block]))
    out = []
    for name, params in groups:
        shard = [0] * n
        padded = gathered = ag_bytes = trainable = trainable_padded = frozen = lora = 0
        for p in params:
            rows = p.shape[0] if p.ndim else 1
            rest = p.numel() // max(rows, 1)
            chunks = _dim0_chunks(rows, n)
            es = p.element_size()
            for r, c in enumerate(chunks):
                shard[r] += c * rest * es
            padded += chunks[0] * rest * es
            gathered += p.numel() * (gsize or es)
            ag_bytes += n * chunks[0] * rest * (gsize or es)
            if p.requires_grad:
                trainable += p.numel()
                trainable_padded += n * chunks[0] * rest
                lora += p.numel() * es
            else:
                frozen += p.numel() * es
        out.append(dict(name=name, numel=sum(p.numel() for p in params), bytes=frozen + lora, frozen_bytes=frozen,
                        lora_bytes=lora, shard=shard, shard_padded=padded, gathered=gathered, ag_buffer=ag_bytes,
                        trainable=trainable, trainable_padded=trainable_padded, grad_size=gsize or 4))
    return dict(n=n, groups=out, blocks=out[:-1], root=out[-1])


def fsdp_bytes(layout: dict, activations: int) -> dict:
    """Per-GPU allocated peak of one FSDP LoRA step (rank 0, which holds the largest shards), in bytes.

    sharded     base + LoRA params, padded shards (1/n)
    grads       fp32 LoRA grads, sharded (1/n; all of them counted although the traced peak is early in backward)
    optimizer   AdamW 2 x fp32 states of the local LoRA shards
    root        the root's gathered params (embedders, text fusion, final layer), kept from forward to backward
    blocks      FSDP_GATHERED_BLOCKS x the largest block's all-gather output (padded, param dtype): the running
                block's unsharded params + the next block's prefetch (at copy-out the same block's buffer and params
                are both live, while the previous block has already been resharded: still 2 blocks' worth)
    rs          the running block's unsharded LoRA grads (param dtype) + FSDP_RS_BUFFERS fp32 reduce-scatter inputs
    activations the traced dynamic peak without the LoRA grads (the gathered params are the stored ones, so the
                single-GPU trace: bf16 autocast, share_lora_input as configured)"""
    g = layout["groups"]
    big = max(layout["blocks"], key=lambda b: b["ag_buffer"])
    lora_shard = sum(x["trainable_padded"] for x in g) // layout["n"]  # numel per rank
    parts = dict(
        sharded=sum(x["shard_padded"] for x in g),
        grads=4 * lora_shard,
        optimizer=2 * 4 * lora_shard,
        root=layout["root"]["gathered"],
        blocks=FSDP_GATHERED_BLOCKS * big["ag_buffer"],
        rs=max(b["trainable"] * b["grad_size"] + FSDP_RS_BUFFERS * 4 * b["trainable_padded"]
               for b in layout["blocks"]),
        activations=activations,
    )
    parts["total"] = sum(parts.values())
    return parts


def estimate_fsdp(name, ns, tiny=False, rank=32, resolution=None, text_tokens=512, caption_tokens=128,
                  memory_overrides=None) -> list[dict]:
    """FSDP rows of FSDP_CONFIGS[name] for each process count in `ns` (one trace: activations do not depend on n)."""
    resolution = resolution or (256 if tiny else 1024)
    t0 = time.perf_counter()
    base_name = FSDP_CONFIGS[name]
    model = build_meta(tiny, rank)
    settings, is_baseline = prepare(model, base_name, fsdp=True, memory_overrides=memory_overrides)
    layouts = {n: fsdp_layout(model, n) for n in ns}
    # sharding.shard_transformer gathers the stored dtypes (bf16 base, fp32 LoRA and norm scales) and the trainer
    # computes under the same bf16 autocast as DDP: the blocks run what a single GPU runs, so that is what is traced
    tr = trace_step(model, settings, is_baseline, resolution, text_tokens, caption_tokens)
    act = tr["peak_without_grads"]
    rows = []
    for n in ns:
        b = fsdp_bytes(layouts[n], act)
        transient = b["activations"] + b["root"] + b["blocks"] + b["rs"]
        allowance = (CONTEXT_GIB + WORKSPACE_GIB + NCCL_GIB) * GiB + FRAGMENTATION * transient
        card = b["total"] + allowance
        rows.append(dict(config=name, base_config=base_name, processes=n,
                         checkpoint_blocks=getattr(model, "_krea2_checkpoint_blocks", 0)
                         if model.gradient_checkpointing else 0,
                         **{f"{k}_gib": v / GiB for k, v in b.items() if k != "total"},
                         gathered_gib=(b["root"] + b["blocks"]) / GiB,
                         est_alloc_gib=b["total"] / GiB, allowance_gib=allowance / GiB, est_card_gib=card / GiB,
                         fits={f"{c}gb": card <= c * GiB for c in CARDS_GIB},
                         seconds=time.perf_counter() - t0))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(bench.CONFIGS), help=f"comma list of {', '.join(bench.CONFIGS)}")
    ap.add_argument("--tiny", action="store_true", help="the tiny model (wiring check)")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--resolution", type=int, default=None, help="pixels (default 1024, tiny 256)")
    ap.add_argument("--text-tokens", type=int, default=512)
    ap.add_argument("--caption-tokens", type=int, default=128)
    ap.add_argument("--fsdp", default=None, help="also FSDP rows (per GPU) for these process counts, e.g. 2,4,8")
    ap.add_argument("--fsdp-configs", default=",".join(FSDP_CONFIGS),
                    help=f"comma list of {', '.join(f'{k} (= {v})' for k, v in FSDP_CONFIGS.items())}")
    ap.add_argument("--no-share-lora-input", action="store_true",
                    help="memory.share_lora_input off (PEFT's fp32 copy of each LoRA input, re-cast by autocast)")
    ap.add_argument("--json", default=None, help="also write the rows here ('-' = stdout only JSON)")
    args = ap.parse_args(argv)
    names = [n for n in args.configs.split(",") if n]  # --configs '' : FSDP rows only
    unknown = [n for n in names if n not in bench.CONFIGS]
    if unknown:
        ap.error(f"unknown configs {unknown}; known: {list(bench.CONFIGS)}")
    ns = [int(x) for x in args.fsdp.split(",")] if args.fsdp else []
    fsdp_names = [n for n in args.fsdp_configs.split(",") if n] if ns else []
    unknown = [n for n in fsdp_names if n not in FSDP_CONFIGS]
    if unknown or any(n < 1 for n in ns):
        ap.error(f"unknown FSDP configs {unknown} (known: {list(FSDP_CONFIGS)}) or a process count < 1")
    torch.set_num_threads(1)
    mem = dict(share_lora_input=False) if args.no_share_lora_input else None
    rows = [estimate(n, args.tiny, args.rank, args.resolution, args.text_tokens, args.caption_tokens, mem)
            for n in names]
    fsdp_rows = [r for n in fsdp_names
                 for r in estimate_fsdp(n, ns, args.tiny, args.rank, args.resolution, args.text_tokens,
                                        args.caption_tokens, mem)]
    header = dict(model="tiny" if args.tiny else "full 12.9B", resolution=args.resolution or (256 if args.tiny else 1024),
                  batch=1, rank=args.rank, text_tokens=args.text_tokens, caption_tokens=args.caption_tokens,
                  autocast="bf16 (CUDA op lists, emulated on meta)", share_lora_input=not args.no_share_lora_input,
                  allowance=f"{CONTEXT_GIB} GiB context + {WORKSPACE_GIB} GiB workspaces + "
                            f"{FRAGMENTATION:.0%} of dynamic peak", torch=torch.__version__)
    if fsdp_rows:
        header["fsdp_allowance"] = f"{header['allowance']} + {NCCL_GIB} GiB NCCL (fragmentation on activations + " \
                                   "gathered params + reduce-scatter buffers)"
    result = dict(header=header, rows=rows, fsdp_rows=fsdp_rows) if fsdp_rows else dict(header=header, rows=rows)
    if args.json == "-":
        print(json.dumps(result, indent=2))
        return (rows, fsdp_rows) if ns else rows
    print("# " + json.dumps(header))
    if rows:
        _print_rows(rows)
    if fsdp_rows:
        _print_fsdp_rows(fsdp_rows)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return (rows, fsdp_rows) if ns else rows


def _print_rows(rows):
    print(f"{'config':<18}{'base W':>8}{'LoRA+g+opt':>11}{'act peak':>9}{'est alloc':>10}{'est card':>9}"
          f"  {'target':<28}{'fits?':>5}")
    for r in rows:
        fits = "n/a" if r["fits"] is None else ("yes" if r["fits"] else "NO")
        print(f"{r['config']:<18}{r['weights_gib']:>8.2f}{r['lora_grads_optim_gib']:>11.2f}"
              f"{r['activation_peak_gib']:>9.2f}{r['est_alloc_gib']:>10.2f}{r['est_card_gib']:>9.2f}"
              f"  {r['target']:<28}{fits:>5}")
    print("GiB. act peak = traced dynamic peak (bf16 autocast) minus the LoRA grads; est alloc ~ "
          "torch.cuda.max_memory_allocated; est card = alloc + allowance (see docstring). "
          "compile rows: eager estimate.")


def _print_fsdp_rows(rows):
    print("\nFSDP, per GPU (bf16 base + fp32 LoRA sharded, AdamW; q/k/v fusion and compile off; batch 1 per GPU)")
    print(f"{'config':<11}{'N':>3}{'ckpt':>5}{'shards':>8}{'g+opt':>7}{'gathered':>9}{'rs':>6}{'act':>7}"
          f"{'est alloc':>10}{'est card':>9}  " + " ".join(f"{c}GB" for c in CARDS_GIB))
    for r in rows:
        fits = " ".join(f"{'yes' if r['fits'][f'{c}gb'] else 'NO':>4}" for c in CARDS_GIB)
        print(f"{r['config']:<11}{r['processes']:>3}{r['checkpoint_blocks']:>5}{r['sharded_gib']:>8.2f}"
              f"{r['grads_gib'] + r['optimizer_gib']:>7.2f}{r['gathered_gib']:>9.2f}{r['rs_gib']:>6.2f}"
              f"{r['activations_gib']:>7.2f}{r['est_alloc_gib']:>10.2f}{r['est_card_gib']:>9.2f}  {fits}")
    print("GiB. shards = this GPU's 1/N of base + LoRA; g+opt = its fp32 LoRA grads + AdamW states; gathered = root "
          f"(kept gathered) + {FSDP_GATHERED_BLOCKS} blocks, stored dtypes; rs = unsharded block LoRA grads + fp32 "
          "reduce-scatter buffers; act = traced peak (bf16 autocast) without grads; est card adds the allowance "
          f"(+{NCCL_GIB} GiB NCCL). Cards: usable GiB = nominal GB.")


if __name__ == "__main__":
    main()
