"""Estimate the peak GPU memory of one LoRA training step on a CPU, without allocating: the core of
`krea2-train estimate CONFIG` and of scripts/estimate_memory.py (whose docstring details what is modelled and how it
is checked against real steps; BENCHMARKS.md "Estimated peak memory" has the full-size figures).

The transformer is built on the `meta` device (no bytes, no model files read), the LoRA injected and the memory
settings applied as training does; then
  * static bytes (`static_bytes`): resident base weights as stored (quantised layers, block offload), LoRA params,
    optimiser states (AdamW, bitsandbytes AdamW8bit, Prodigy), counted from the real module tree;
  * dynamic bytes (`trace_step`): one forward + backward traced under `LiveBytes` (a TorchDispatchMode counting every
    allocated storage until it dies), bf16 autocast emulated as CUDA applies it (`EmulatedAutocast`), SDPA replaced
    by a flash-attention cost model (`traced_kernels`), NF4 layers by stand-ins with bitsandbytes' bytes;
  * `totals`: allocated peak + allowance (CUDA context, workspaces, fragmentation) = "est. card";
  * FSDP (`fsdp_layout`, `fsdp_bytes`, `fsdp_totals`): per-GPU shards, gathered blocks, reduce-scatter buffers.
`estimate_config` runs this for every stage of a run config (`estimate_command` is the CLI).
Not modelled: torch.compile's own buffers (compile settings are estimated eager), kernel-internal scratch, one-off
set-up peaks, the optimiser step's own temporaries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from krea2_train.runtime import memory

from krea2_train.runtime import speed
from krea2_train.train.step import flow_matching_loss

GiB = 2**30
CONTEXT_GIB = 0.5
WORKSPACE_GIB = 0.25
FRAGMENTATION = 0.10
OFFLOAD_RESIDENT_BLOCKS = 2  # BlockOffloader: running block + prefetched neighbour
BNB8_BLOCK = 256  # bitsandbytes 8-bit optimiser: one fp32 absmax per 256 state values
NF4_BLOCK, NF4_BLOCK2 = 64, 256


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




# ------------------------------------------------------------------------------------------------ static bytes
def _nbytes(t):
    return t.numel() * t.element_size()


def optimizer_state_bytes(model, optimizer: str = "adamw") -> int:
    """Bytes of the optimiser states of the trainable parameters, as each optimiser allocates them at its first step.
    adamw: exp_avg + exp_avg_sq, fp32. adamw8bit (bitsandbytes): two 1-byte states + one fp32 absmax per 256 values
    for tensors of >= 4096 values, else two fp32 states. prodigy (prodigyopt, slice_p=1): exp_avg, exp_avg_sq, s and
    p0 (a copy of the initial parameter; a 0-dim tensor when the parameter starts at zero, as LoRA B does)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if optimizer == "adamw":
        return sum(2 * 4 * p.numel() for _, p in params)
    if optimizer == "adamw8bit":
        return 2 * sum(p.numel() + 4 * math.ceil(p.numel() / BNB8_BLOCK) if p.numel() >= 4096 else 4 * p.numel()
                       for _, p in params)
    if optimizer == "prodigy":
        return sum(3 * _nbytes(p) + (p.element_size() if _starts_at_zero(n) else _nbytes(p)) for n, p in params)
    raise ValueError(f"unknown optimizer {optimizer!r}: adamw, adamw8bit or prodigy")


def _starts_at_zero(name: str) -> bool:
    """PEFT initialises LoRA B (and LoKr's w1 factor, or its w1_a) to zero: Prodigy then keeps a 0-dim p0 for it."""
    return any(k in name for k in (".lora_B.", ".lokr_w1.", ".lokr_w1_a."))


def static_bytes(model, offload: bool = False, optimizer_8bit: bool = False, optimizer: str | None = None) -> dict:
    """Bytes the step keeps resident outside activations. Unique tensors (fused q/k/v views partition their buffer).
    `optimizer`: adamw | adamw8bit | prodigy (default: adamw8bit if `optimizer_8bit` else adamw)."""
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
    optim = optimizer_state_bytes(model, optimizer or ("adamw8bit" if optimizer_8bit else "adamw"))
    return dict(weights=weights, weights_all_on_gpu=frozen_nonblock + resident_block + sum(offloadable),
                lora_params=trainable, lora_grads=4 * trainable_numel, optimizer=optim, trainable_numel=trainable_numel)


# ----------------------------------------------------------------------------------------------------- trace
_SAME = object()


def trace_step(model, settings, is_baseline, resolution=1024, text_tokens=512, caption_tokens=128,
               dtype=torch.bfloat16, device="meta", workspace=True, inputs=None, batch=1, autocast_dtype=_SAME):
    """Forward + backward of bench_step's step under LiveBytes, the forward under (emulated) autocast to `dtype` unless
    that is float32, as bench_step and the trainer run it. `dtype`: the inputs' dtype (the trainer casts them to the
    stored base dtype); `autocast_dtype`: the autocast dtype if other than that (None: no autocast, as with
    train.mixed_precision=no). `batch` images of `resolution` px square, each with `caption_tokens` valid text tokens
    of `text_tokens` (the trim keeps the valid ones). Returns a dict of bytes: peak, after_forward,
    after_backward, saved_per_block (forward), peak_without_grads, grads_after_backward; ops; autocast_casts (the
    EmulatedAutocast's count of calls it cast, per policy). `inputs` (tests): a real batch from
    bench_step.make_batch."""
    cfg = model.config
    trim = settings.trim_text_padding and not is_baseline
    n_text = caption_tokens if trim else text_tokens
    side = resolution // 16
    n_img = side * side
    cast = (dtype if dtype != torch.float32 else None) if autocast_dtype is _SAME else autocast_dtype
    tracker = LiveBytes()
    marks = []
    hooks = [b.register_forward_hook(lambda m, a, o: marks.append(tracker.cur)) for b in model.transformer_blocks]
    hooks += [p.register_post_accumulate_grad_hook(lambda p: tracker.mark_grad(p.grad))
              for p in model.parameters() if p.requires_grad]
    try:
        with traced_kernels(workspace, device) as emu, tracker:
            if inputs is None:
                x0 = torch.empty(batch, n_img, cfg.in_channels, dtype=dtype, device=device)
                noise = torch.empty_like(x0)
                text = torch.empty(batch, n_text, cfg.num_text_layers, cfg.text_hidden_dim, dtype=dtype, device=device)
                pos = torch.zeros(n_text + n_img, 3, dtype=torch.long, device=device)
                mask = None if trim else torch.ones(batch, n_text, dtype=torch.bool, device=device)
            else:
                x0, noise, text, pos = (inputs[k].clone() for k in ("x0", "noise", "text", "pos"))
                mask = inputs["mask"].clone()
                if trim:
                    text, mask, pos = speed.trim_text_padding(text, mask, pos)
            sigma = torch.rand(x0.shape[0], device=device)
            loss = flow_matching_loss(model, x0, noise, sigma, text, pos, mask, dtype=dtype,
                                      autocast=torch.autocast(device, dtype=cast or dtype, enabled=cast is not None))
            loss = loss.mean()
            after_forward = tracker.cur
            loss.backward()
            del loss, x0, noise, text, pos, mask, sigma
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




# ------------------------------------------------------------------------------------------------------- FSDP
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


def fsdp_bytes(layout: dict, activations: int, optimizer_per_numel: int = 2 * 4) -> dict:
    """Per-GPU allocated peak of one FSDP LoRA step (rank 0, which holds the largest shards), in bytes.

    sharded     base + LoRA params, padded shards (1/n)
    grads       fp32 LoRA grads, sharded (1/n; all of them counted although the traced peak is early in backward)
    optimizer   `optimizer_per_numel` bytes per local LoRA value (AdamW: 2 x fp32 states)
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
        optimizer=optimizer_per_numel * lora_shard,
        root=layout["root"]["gathered"],
        blocks=FSDP_GATHERED_BLOCKS * big["ag_buffer"],
        rs=max(b["trainable"] * b["grad_size"] + FSDP_RS_BUFFERS * 4 * b["trainable_padded"]
               for b in layout["blocks"]),
        activations=activations,
    )
    parts["total"] = sum(parts.values())
    return parts



def fsdp_totals(layout: dict, activations: int, optimizer_per_numel: float = 2 * 4) -> dict:
    """fsdp_bytes plus the allowance: context + workspaces + NCCL, and fragmentation on what comes and goes
    (activations, gathered params, reduce-scatter buffers). Bytes: `parts` (fsdp_bytes), alloc, allowance, card."""
    b = fsdp_bytes(layout, activations, optimizer_per_numel)
    transient = b["activations"] + b["root"] + b["blocks"] + b["rs"]
    allowance = (CONTEXT_GIB + WORKSPACE_GIB + NCCL_GIB) * GiB + FRAGMENTATION * transient
    return dict(parts=b, alloc=b["total"], allowance=allowance, card=b["total"] + allowance)


# ------------------------------------------------------------------------------------------------- building
def build_meta_model(config: dict | None = None, dtype=torch.bfloat16):
    """`Krea2Transformer2DModel(**config)` on the meta device, stored in `dtype` (RMSNorm scales fp32, as diffusers
    keeps them), without LoRA. `config` {}: diffusers' defaults, the full 12.9B model."""
    from diffusers import Krea2Transformer2DModel

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = Krea2Transformer2DModel(**(config or {}))
    finally:
        torch.set_default_dtype(old)
    for mod in model.modules():
        if type(mod).__name__ == "Krea2RMSNorm":
            mod.float()
    return model


def apply_settings(model, settings, is_baseline: bool = False, fsdp: bool = False,
                   compute_dtype: torch.dtype | None = torch.bfloat16, what: str = "config"):
    """memory.apply_memory_settings on the meta model (after the LoRA), as the trainer's _build_model calls it: NF4
    as stand-ins, offload and compile costed rather than run. `fsdp`: q/k/v fusion and compile off (as under FSDP).
    `is_baseline`: bench_step's plain-attention baseline. Returns (effective settings, is_baseline)."""
    if fsdp:
        if is_baseline or settings.quantize != "none" or settings.offload_blocks or settings.optimizer_8bit:
            raise ValueError(f"{what}: FSDP trains a bf16 base with AdamW, no offload (sharding.check_fsdp_settings)")
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
    memory.apply_memory_settings(model, run, "meta", compute_dtype=compute_dtype)
    return settings, False


def totals(st: dict, dynamic: int) -> dict:
    """Allocated peak (resident weights + LoRA params + optimiser states + traced dynamic peak) and the allowance
    (CUDA context, workspaces, fragmentation on the dynamic peak): est. card = alloc + allowance. Bytes."""
    alloc = st["weights"] + st["lora_params"] + st["optimizer"] + dynamic
    allowance = CONTEXT_GIB * GiB + WORKSPACE_GIB * GiB + FRAGMENTATION * dynamic
    return dict(alloc=alloc, allowance=allowance, card=alloc + allowance)


def estimate_model(model, settings, is_baseline, resolution, text_tokens=512, caption_tokens=128, batch=1,
                   optimizer=None, dtype=torch.bfloat16, autocast_dtype=_SAME, static=None) -> dict:
    """One training step of the prepared meta `model` (apply_settings done): static bytes + traced step, in GiB.
    `optimizer`: adamw | adamw8bit | prodigy (default: the settings' 8-bit hint, else adamw). `static`: a
    static_bytes result to reuse (it does not depend on the resolution)."""
    if optimizer is None:
        optimizer = "adamw8bit" if settings.optimizer_8bit and not is_baseline else "adamw"
    st = static or static_bytes(model, offload=settings.offload_blocks, optimizer=optimizer)
    tr = trace_step(model, settings, is_baseline, resolution, text_tokens, caption_tokens, dtype=dtype, batch=batch,
                    autocast_dtype=autocast_dtype)
    dynamic = tr["peak"]
    t = totals(st, dynamic)
    return dict(quantize=settings.quantize, offload=settings.offload_blocks,
                checkpoint_blocks=getattr(model, "_krea2_checkpoint_blocks", 0) if model.gradient_checkpointing else 0,
                fuse_qkv=settings.fuse_qkv and not is_baseline, compile=settings.compile,
                optimizer_8bit=optimizer == "adamw8bit",
                text_tokens_run=caption_tokens if settings.trim_text_padding and not is_baseline else text_tokens,
                weights_gib=st["weights"] / GiB, weights_all_on_gpu_gib=st["weights_all_on_gpu"] / GiB,
                lora_grads_optim_gib=(st["lora_params"] + st["lora_grads"] + st["optimizer"]) / GiB,
                lora_params_gib=st["lora_params"] / GiB, optimizer_gib=st["optimizer"] / GiB,
                grads_gib=st["lora_grads"] / GiB, activation_peak_gib=(dynamic - st["lora_grads"]) / GiB,
                dynamic_peak_gib=dynamic / GiB, after_forward_gib=tr["after_forward"] / GiB,
                saved_per_block_gib=tr["saved_per_block"] / GiB,
                est_alloc_gib=t["alloc"] / GiB, allowance_gib=t["allowance"] / GiB, est_card_gib=t["card"] / GiB,
                trainable_params=st["trainable_numel"], traced_ops=tr["ops"])


# --------------------------------------------------------------------------------------- a run config's stages
PRESET_GB = {"80gb": 80, "48gb": 48, "24gb": 24, "16gb": 16}  # largest first
DEFAULT_CARD_GB = 24
CAVEATS = ("an estimate on the meta device, not a measurement: allowance for CUDA context, workspaces and "
           "fragmentation included; torch.compile buffers, previews/validation and the optimiser step's own "
           "temporaries not modelled")


def _compute_dtype(mixed_precision: str):
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)


def estimate_config(cfg, memory_settings=None, *, gpus: int = 1, fsdp: bool | None = None, tiny: bool = False,
                    text_tokens: int | None = None, caption_tokens: int = 128, on_stage=None) -> dict:
    """Estimate every stage of `train.stages` with the config's own model dtype, mixed precision, LoRA, optimiser
    and memory settings (`memory_settings`: a MemorySettings to use instead of the config's `memory:`). `fsdp`
    (default train.fsdp): per-GPU FSDP figures over `gpus` processes. `tiny`: the tiny architecture whatever
    model.architecture says. `on_stage(i, stage)` is called before each stage's trace (progress).
    Returns dict(settings, optimizer, fsdp, gpus, architecture, stages=[row per stage])."""
    from krea2_train.errors import UserError
    from krea2_train.facts import MAX_PROMPT_TOKENS
    from krea2_train.train import lora as lora_mod
    from krea2_train.runtime.sharding import check_fsdp_settings

    text_tokens = text_tokens or MAX_PROMPT_TOKENS
    if not 1 <= caption_tokens <= text_tokens:
        raise UserError(f"--caption-tokens={caption_tokens} must be between 1 and the text length {text_tokens}")
    if memory_settings is None:
        try:
            memory_settings = memory.resolve_memory_settings(dataclasses.asdict(cfg.memory))
        except ValueError as exc:
            raise UserError(str(exc)) from exc
    settings = memory_settings
    fsdp = cfg.train.fsdp if fsdp is None else fsdp
    if gpus < 1:
        raise UserError(f"--gpus={gpus} must be at least 1")
    if fsdp:
        check_fsdp_settings(cfg, settings)
    optimizer = cfg.optimizer.name
    if settings.optimizer_8bit and optimizer == "adamw":  # what the trainer does with a preset's 8-bit hint
        optimizer = "adamw8bit"
    architecture = "tiny" if tiny else cfg.model.architecture
    if architecture == "tiny":
        from krea2_train.models.tiny import TINY_TRANSFORMER as arch
    else:  # krea2, or auto (no file is read): the full 12.9B model, diffusers' defaults
        arch = {}
    dtype = getattr(torch, cfg.model.dtype)
    compute = _compute_dtype(cfg.train.mixed_precision)
    model = build_meta_model(arch, dtype)
    lora_mod.add_lora(model, cfg.lora, seed=cfg.seed)  # the trainer's targets, PEFT config and fp32 adapter
    model.train()
    settings, _ = apply_settings(model, settings, fsdp=fsdp, compute_dtype=compute)
    st = static_bytes(model, offload=settings.offload_blocks, optimizer=optimizer)
    layout = fsdp_layout(model, gpus) if fsdp else None
    rows = []
    for i, stage in enumerate(cfg.train.stages):
        if on_stage:
            on_stage(i, stage)
        t0 = time.perf_counter()
        row = dict(stage=i, resolution=stage.resolution, batch=stage.batch_size,
                   image_tokens=(stage.resolution // 16) ** 2)
        if fsdp:
            tr = trace_step(model, settings, False, stage.resolution, text_tokens, caption_tokens, dtype=dtype,
                            batch=stage.batch_size, autocast_dtype=compute)
            t = fsdp_totals(layout, tr["peak_without_grads"], st["optimizer"] / max(st["trainable_numel"], 1))
            row.update(est_alloc_gib=t["alloc"] / GiB, est_card_gib=t["card"] / GiB,
                       parts_gib={k: v / GiB for k, v in t["parts"].items()})
        else:
            row.update(estimate_model(model, settings, False, stage.resolution, text_tokens, caption_tokens,
                                      batch=stage.batch_size, optimizer=optimizer, dtype=dtype,
                                      autocast_dtype=compute, static=st))
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
    return dict(settings=settings, optimizer=optimizer, fsdp=bool(fsdp), gpus=gpus, architecture=architecture,
                text_tokens=text_tokens, caption_tokens=caption_tokens, stages=rows)


def _explicit_memory_keys(cfg) -> list[str]:
    """memory.* keys the user set besides the preset (they would win over a suggested preset)."""
    from krea2_train.config.memory import MemorySettings

    default = MemorySettings()
    return [f.name for f in dataclasses.fields(MemorySettings)
            if f.name != "preset" and getattr(cfg.memory, f.name) != getattr(default, f.name)]


def smaller_presets(current: str | None, card_gb: float) -> list[str]:
    """Presets to try, largest first: those smaller than the current preset, or (none set) those for at most the
    card's size."""
    if current in PRESET_GB:
        return [p for p, gb in PRESET_GB.items() if gb < PRESET_GB[current]]
    return [p for p, gb in PRESET_GB.items() if gb <= card_gb]


def _a(gb: float) -> str:
    return f"an {gb:g}" if str(f"{gb:g}").startswith(("8", "11", "18")) else f"a {gb:g}"


def verdict(cfg, result: dict, card_gb: float, estimate_preset=None, estimate_all_checkpointed=None) -> list[str]:
    """Lines saying whether the largest stage fits `card_gb` (usable GiB taken = nominal GB, as BENCHMARKS.md does),
    and if not what would, found by re-estimating: first checkpointing every block (`estimate_all_checkpointed()`,
    when some are not), then the next smaller preset (`estimate_preset(name)` -> result)."""
    worst = max(result["stages"], key=lambda r: r["est_card_gib"])
    need = worst["est_card_gib"]
    where = "per GPU " if result["fsdp"] else ""
    if need <= card_gb:
        return [f"fits {_a(card_gb)} GB card {where}with {card_gb - need:.1f} GiB to spare "
                f"(largest: stage {worst['stage']}, {worst['resolution']} px x {worst['batch']})"]
    line = (f"needs ~{need:.1f} GiB {where}(stage {worst['stage']}, {worst['resolution']} px x {worst['batch']}): "
            f"more than {_a(card_gb)} GB card")
    s = result["settings"]
    if estimate_all_checkpointed is not None and not s.offload_blocks and (
            not s.gradient_checkpointing or s.checkpoint_blocks is not None):
        other = estimate_all_checkpointed()
        est = max(r["est_card_gib"] for r in other["stages"]) if other else None
        if est is not None and est <= card_gb:  # cheapest fix: recompute more, same precision
            return [line, f"try memory.gradient_checkpointing: true with memory.checkpoint_blocks: null (every "
                          f"block; est. {est:.1f} GiB {where}- slower per step)"]
    tried = []
    for preset in smaller_presets(result["settings"].preset, card_gb) if estimate_preset else []:
        other = estimate_preset(preset)
        if other is None:  # not possible with these settings (e.g. FSDP and a quantised preset)
            continue
        est = max(r["est_card_gib"] for r in other["stages"])
        tried.append(f"memory.preset: {preset} (est. {est:.1f} GiB)")
        if est <= card_gb:
            break
    if not tried:
        return [line + ("; lower the stage's resolution or batch_size" if not result["fsdp"]
                        else "; lower the resolution or batch_size, or shard over more GPUs (--gpus)")]
    extra = _explicit_memory_keys(cfg)
    note = f" (without the explicit memory keys {', '.join(extra)})" if extra else ""
    if est <= card_gb:
        return [line, f"try {tried[-1]}{note}"]
    return [line, f"smaller presets estimated: {', '.join(tried)}{note}; none fits: lower the stage's resolution "
                  "or batch_size"]


def _fmt_table(result: dict, card_gb: float) -> list[str]:
    worst = max(range(len(result["stages"])), key=lambda i: result["stages"][i]["est_card_gib"])
    head = f"{'stage':>5}  {'resolution':>10}  {'batch':>5}  {'img tokens':>10}  {'est. peak GiB':>13}  " \
           f"{'est. card GiB':>13}"
    out = [head, "-" * len(head)]
    for i, r in enumerate(result["stages"]):
        mark = "  <- largest" if i == worst and len(result["stages"]) > 1 else ""
        fits = "" if r["est_card_gib"] <= card_gb else "  (over)"
        out.append(f"{r['stage']:>5}  {str(r['resolution']) + ' px':>10}  {r['batch']:>5}  "
                   f"{r['batch'] * r['image_tokens']:>10}  {r['est_alloc_gib']:>13.2f}  {r['est_card_gib']:>13.2f}"
                   f"{mark}{fits}")
    return out


def estimate_command(args) -> int:
    """`krea2-train estimate CONFIG [key=value ...] [--gpus N] [--card GB] [--fsdp] [--caption-tokens N]`."""
    from rich.console import Console

    from krea2_train.config import load_config
    from krea2_train.errors import UserError

    cfg = load_config(args.config, args.overrides, warn_paths=False)
    torch.set_num_threads(1)
    console = Console(stderr=True)
    fsdp = True if args.fsdp else None
    settings = memory.resolve_memory_settings(dataclasses.asdict(cfg.memory))
    card_gb = args.card if args.card is not None else PRESET_GB.get(settings.preset, DEFAULT_CARD_GB)
    if card_gb <= 0:
        raise UserError(f"--card={card_gb} must be a positive number of GB")
    if (args.fsdp or cfg.train.fsdp) and args.gpus < 2:
        raise UserError("FSDP shards over several GPUs: pass --gpus N (N >= 2) to estimate the per-GPU figure")
    common = dict(gpus=args.gpus, fsdp=fsdp, tiny=args.tiny, caption_tokens=args.caption_tokens)
    # the re-estimates for suggestions build quantised layers; their INFO lines are not news to the user
    logging.getLogger("krea2_train.runtime.memory").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    with console.status("estimating ...") as status:
        def progress(what):
            return lambda i, st: status.update(f"{what}stage {i} ({st.resolution} px, batch {st.batch_size}): "
                                               "tracing forward + backward on the meta device ...")

        result = estimate_config(cfg, on_stage=progress(""), **common)

        def estimate_preset(preset):
            try:
                return estimate_config(cfg, memory.resolve_memory_settings(dict(preset=preset)),
                                       on_stage=progress(f"memory.preset: {preset}, "), **common)
            except UserError:  # e.g. FSDP refuses a quantised preset
                return None

        def estimate_all_checkpointed():
            every = dataclasses.replace(settings, gradient_checkpointing=True, checkpoint_blocks=None)
            try:
                return estimate_config(cfg, every, on_stage=progress("every block checkpointed, "), **common)
            except UserError:
                return None

        lines = verdict(cfg, result, card_gb, estimate_preset, estimate_all_checkpointed)
    s = result["settings"]
    arch = "tiny test model" if result["architecture"] == "tiny" else "full-size model"
    mem = f"memory.preset: {s.preset}" if s.preset else "memory: no preset"
    knobs = [f"quantize {s.quantize}", "offload" if s.offload_blocks else None,
             (f"checkpointing {'all' if s.checkpoint_blocks is None else s.checkpoint_blocks} blocks"
              if s.gradient_checkpointing or s.offload_blocks else "no checkpointing"),
             "fused q/k/v" if s.fuse_qkv and not result["fsdp"] and s.quantize == "none" and not s.offload_blocks
             else None]
    kind = {"lora": "LoRA", "dora": "DoRA", "lokr": "LoKr"}[cfg.lora.type]
    print(f"{args.config}: {arch} ({cfg.model.dtype}, mixed precision {cfg.train.mixed_precision}), {kind} rank "
          f"{cfg.lora.rank} on {cfg.lora.targets}, {result['optimizer']}, {mem} ({', '.join(k for k in knobs if k)})")
    if result["fsdp"]:
        print(f"FSDP over {result['gpus']} GPU(s): figures are per GPU (batch_size per GPU)")
    elif args.gpus > 1:
        print(f"DDP over {args.gpus} GPUs: every GPU needs the figures below (set train.fsdp or --fsdp to shard)")
    print(f"text: {result['caption_tokens']} valid caption tokens of {result['text_tokens']} (--caption-tokens); "
          "image tokens = (resolution/16)^2 per image; non-square buckets of the same area have the same count")
    print("\n".join(_fmt_table(result, card_gb)))
    for line in lines:
        print(line)
    print(f"note: {CAVEATS}. ({time.perf_counter() - t0:.0f} s)")
    return 0
