"""The dynamic half of the memory estimate: one training step (train/step.py's loss) traced on the `meta` device.

`LiveBytes` counts every storage a dispatched op allocates until it dies; `traced_kernels` swaps SDPA for a cost model
of the CUDA flash kernels and emulates CUDA's bf16 autocast (`EmulatedAutocast`); NF4 layers become stand-ins with
bitsandbytes' bytes. Hand-written because torch's own tools do not fit this job: `torch.distributed._tools`'
MemTracker counts real (or fake-tensor) allocations of the kernels the CPU would run, i.e. the math SDPA with its
L x L scores and no CUDA autocast, and FlopCounterMode counts FLOPs, not bytes. tests/test_estimate_memory.py checks
the trace against profiled real CPU steps of the tiny model.
"""

from __future__ import annotations

import contextlib
import math
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from krea2_train.runtime import memory, speed
from krea2_train.train.step import flow_matching_loss

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
    `torch.amp.autocast` for the device here, and answers `torch.is_autocast_enabled` / `get_autocast_dtype`, so
    checkpoint recomputation re-enters it and speed.share_lora_input and
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
    """SDPA -> flash cost model; autocast on `device` emulated by an EmulatedAutocast (yielded): `torch.autocast` /
    `torch.amp.autocast` for the device enter its regions and torch's autocast queries answer from it (so
    runtime/speed.py's share_lora_input sees the emulated dtype through them, with no hook of its own)."""
    global _EMULATED
    emu = EmulatedAutocast(device)
    names = ("is_autocast_enabled", "get_autocast_dtype", "autocast")
    old_torch = {n: getattr(torch, n) for n in names}
    old_amp = torch.amp.autocast, torch.amp.is_autocast_available
    old_sdpa = F.scaled_dot_product_attention
    is_enabled, get_dtype, autocast, available = (torch.is_autocast_enabled, torch.get_autocast_dtype, torch.autocast,
                                                  torch.amp.is_autocast_available)

    def ours(a, k):
        dev = a[0] if a else k.get("device_type")
        return isinstance(dev, str) and dev == device

    def amp_autocast(device_type, dtype=None, enabled=True, cache_enabled=None):
        if device_type == device:
            return emu.region(enabled, dtype, cache_enabled)
        return autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)

    F.scaled_dot_product_attention = _sdpa_cost(workspace)
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
        F.scaled_dot_product_attention = old_sdpa


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




# ----------------------------------------------------------------------------------------------------- trace
SAME_AS_DTYPE = object()


def trace_step(model, settings, is_baseline, resolution=1024, text_tokens=512, caption_tokens=128,
               dtype=torch.bfloat16, device="meta", workspace=True, inputs=None, batch=1, autocast_dtype=SAME_AS_DTYPE):
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
    cast = (dtype if dtype != torch.float32 else None) if autocast_dtype is SAME_AS_DTYPE else autocast_dtype
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




