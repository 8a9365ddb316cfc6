"""Memory options for Krea 2 LoRA training: quantised frozen base, partial checkpointing, block offload, presets.

Entry point for the trainer (`memory:` config section):

    settings = resolve_memory_settings(cfg.memory)          # preset merged with explicit fields
    transformer = <load>; <inject LoRA with PEFT>            # LoRA first: see the note on order below
    # Load on the CPU when settings.quantize != "none" or settings.offload_blocks: quantize_base moves one layer at
    # a time to the device, so the 26 GB bf16 model never has to fit there (16/24 GB cards).
    transformer = apply_memory_settings(transformer, settings, device)
    optimizer = AdamW8bit(...) if settings.optimizer_8bit else AdamW(...)   # the preset's hint

`apply_memory_settings` applies, in this order:
    1. quantize_base(transformer, settings.quantize, device)   none | int8 | nf4 | fp8
    2. place on device: everything, or (offload) everything except the frozen block weights
    3. set_fast_attention(..., settings.attention_backend) + enable_text_padding_trim   (speed.py)
    4. fuse_qkv (speed.py) when settings.fuse_qkv and the base is not quantised
    5. enable_checkpointing(transformer, settings.checkpoint_blocks)  when gradient_checkpointing (forced by offload)
    6. offload_blocks(transformer, device)                      when offload_blocks
    7. compile_blocks (speed.py)                                when compile; always last

Order w.r.t. PEFT: call it after LoRA injection. Quantisation replaces the frozen Linear under a PEFT wrapper
(`to_q.base_layer`) as well as a bare one, so it works either side of PEFT, but offloading must see which parameters
are trainable (LoRA stays resident on the GPU) and compile must trace the final modules. `quantize_base` may also be
called alone before PEFT (e.g. to quantise while loading); the later `apply_memory_settings` then skips it.

Quantised layers (frozen, only inside `transformer_blocks`; text fusion, embedders and final layer stay bf16):
    int8  `Int8Linear`: int8 storage with a per-output-row absmax scale (symmetric, round to nearest).
    fp8   `Fp8Linear`: float8_e4m3fn storage with a per-row scale.
          Both are `QuantLinear`s: pure torch (runs anywhere), dequantised per matmul (forward and backward) to the
          activation dtype by one autograd function that saves only the 1-byte weight and its scale (not the input:
          the base is frozen), so checkpointing keeps nothing extra. Save memory, not time. Not bitsandbytes'
          Linear8bitLt: it keeps its input outside save_for_backward, ~9 GiB at 1024 px (see `_DequantLinearFn`).
          With `fp8_matmul: true` the fp8 forward matmul runs in fp8 instead (`torch._scaled_mm`, per-token
          activation scales; no torchao needed), backward stays in the activation dtype: for fp8 tensor-core GPUs,
          opt-in until scripts/bench_step.py (`fp8_mm`) shows the win.
    nf4   bitsandbytes `Linear4bit` (QLoRA NF4, double-quantised statistics, compute in the training dtype).
PEFT wraps all three with its generic `lora.Linear` (they subclass nn.Linear and their weight dtype is an integer
type, so PEFT does not cast the LoRA weights to it); LoRA trains in its own dtype.

Offload: diffusers' group offloading (`apply_group_offloading`) is not used for training because its hooks move every
parameter of a block, LoRA included (diffusers 0.42.1 hooks/group_offloading.py, `_offload_to_memory`): without
streams the LoRA weights go to the CPU between uses (the optimizer then sees mixed devices); with streams they are
reset from the pinned copy taken when offloading was applied (updates lost), or missing from it if LoRA came later.
`offload_blocks` does the same job for frozen weights only: pinned CPU copies, onload in a forward pre-hook on a side
CUDA stream with the next block prefetched (direction-aware, so recompute in backward prefetches the previous block);
released right after the block in forward, and in backward at the next block's pre-hook (see `BlockOffloader`).
It needs checkpointing of every block (otherwise autograd keeps each block's GPU weights for backward and nothing is
saved), so `apply_memory_settings` turns that on. Quantised weights (int8, fp8, NF4's packed bytes) are offloaded
like bf16 ones; scales and NF4's quant_state stay resident.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from krea2_train.config.memory import QUANT_MODES, MemorySettings, resolve_memory_settings
from krea2_train.models.quantized import rotate_groups
from krea2_train.runtime.speed import unwrap_transformer

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------- quantisation
# int8 is hand-written (QuantLinear below) rather than bitsandbytes' Linear8bitLt: bnb's MatMul8bitLt keeps its input
# as a ctx attribute (`ctx.tensors = (CAt, subA, A)`), outside save_for_backward, so gradient checkpointing cannot
# drop it. At 1024 px, batch 1, that is 0.32 GiB kept per block instead of 0.05 (~9 GiB over 28 blocks): the 24gb
# preset estimated 25.7 GiB with bnb int8 against its 20 GiB target (scripts/estimate_memory.py).
class _DequantLinearFn(torch.autograd.Function):
    """y = x @ deq(q).T with only q (1 byte/weight) and its row scale saved for backward: a plain F.linear on the
    dequantised weight would keep a compute-dtype copy of every layer alive until backward, undoing the saving, and
    the input is not needed (the base is frozen: no weight gradient, grad_x = grad_out @ deq(q))."""

    @staticmethod
    def _setup(ctx, x, qweight, scale, storage) -> torch.dtype:
        """Save only the 1-byte weights for backward; return the matmul dtype (the autocast dtype under autocast, so
        the weight is dequantised straight to it, no fp32 copy)."""
        dev = x.device.type
        ctx.save_for_backward(qweight, scale)
        ctx.x_dtype, ctx.storage = x.dtype, storage
        return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype

    @staticmethod
    def forward(ctx, x, qweight, scale, bias, storage, rotation=0):
        # ConvRot (`rotation` = group size): the stored weight is W @ Hb^T (Hb block-diagonal Hadamard, symmetric
        # and its own inverse), so x @ W^T = (x @ Hb) @ stored^T; backward: grad_x = (grad_out @ stored) @ Hb.
        dtype = _DequantLinearFn._setup(ctx, x, qweight, scale, storage)
        ctx.rotation = rotation
        with torch.autocast(x.device.type, enabled=False):
            bias = bias.to(dtype) if bias is not None else None
            x = x.to(dtype)
            if rotation:
                x = rotate_groups(x, rotation)
            return F.linear(x, _dequant(qweight, scale, dtype, storage), bias)

    @staticmethod
    def backward(ctx, grad_out):
        qweight, scale = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ _dequant(qweight, scale, grad_out.dtype, ctx.storage)
            if ctx.rotation:
                grad_x = rotate_groups(grad_x, ctx.rotation)
            grad_x = grad_x.to(ctx.x_dtype)
        return grad_x, None, None, None, None, None


class _Fp8MatmulFn(_DequantLinearFn):
    """Forward as a real fp8 matmul (`torch._scaled_mm`, per-token activation scales x per-row weight scales, output
    in the activation dtype); backward like `_DequantLinearFn` (input gradient through the dequantised weight in the
    gradient's dtype, so gradients keep bf16 precision). Opt-in (`fp8_matmul`): a win only where fp8 tensor cores
    exist (H100/H200/Ada) and the matmuls dominate; scripts/bench_step.py `fp8_mm` measures it."""

    @staticmethod
    def forward(ctx, x, qweight, scale, bias, storage, rotation=0):
        dtype = _DequantLinearFn._setup(ctx, x, qweight, scale, storage)
        ctx.rotation = 0  # fp8 layers are never rotated
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1])
            x_scale = (x2.abs().amax(dim=1, keepdim=True).float() / torch.finfo(torch.float8_e4m3fn).max).clamp(
                min=1e-12)
            xq = (x2.float() / x_scale).to(torch.float8_e4m3fn)
            w = qweight.view(torch.float8_e4m3fn)
            out = torch._scaled_mm(xq, w.t(), scale_a=x_scale, scale_b=scale.float().unsqueeze(0), out_dtype=dtype)
            if bias is not None:
                out = out + bias.to(dtype)
            return out.reshape(*x.shape[:-1], -1)
    # backward: inherited (input gradient through the dequantised weight)


def _dequant(qweight, scale, dtype, storage):
    """(N, K) weight in `dtype` from 1-byte storage (`qweight` reinterpreted as `storage`) times the per-row scale;
    scaled in place, so one `dtype` copy of the weight is the only transient."""
    return qweight.view(storage).to(dtype).mul_(scale.to(dtype).unsqueeze(1))


class QuantLinear(nn.Linear):
    """Frozen Linear stored with 1 byte per weight and a per-output-row fp32 absmax scale (symmetric), dequantised to
    the activation (or autocast) dtype for each matmul, forward and backward, by `_DequantLinearFn`; pure torch, so it
    runs anywhere (CPU, CUDA, meta). Subclasses pick the storage format: `Int8Linear` (int8, round to nearest, range
    +-127) and `Fp8Linear` (float8_e4m3fn, range +-448, kept as uint8 bits so PEFT and `.to(dtype)` leave it alone:
    both treat a non-floating weight as not theirs to cast)."""

    storage: torch.dtype
    qmax: float
    rotation: int = 0  # ConvRot group size of a weight read from a ComfyUI int8_convrot file (0: not rotated)

    def __init__(self, linear: nn.Linear, device=None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            w = linear.weight.detach().to(device=device or linear.weight.device, dtype=torch.float32)
            scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / self.qmax
            q = self._quantize(w / scale)
        self.weight = nn.Parameter(q, requires_grad=False)
        self.register_buffer("weight_scale", scale.squeeze(1).contiguous())
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().to(w.device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_stored(cls, linear: nn.Module, qweight: torch.Tensor, row_scale: torch.Tensor, rotation: int = 0):
        """A layer over weights already quantised in a file (ComfyUI fp8 / int8), used as stored: `qweight` (N, K)
        in `cls.storage`, `row_scale` (N,) float32, `rotation` the ConvRot group size. `linear` gives the bias."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.out_features, self.in_features = qweight.shape
        if qweight.dtype != cls.storage:
            raise TypeError(f"{cls.__name__} stores {cls.storage}, got {qweight.dtype}")
        if cls.storage != torch.int8:
            qweight = qweight.view(torch.uint8)  # fp8 bits kept as uint8 (see the class docstring)
        self.weight = nn.Parameter(qweight, requires_grad=False)
        self.register_buffer("weight_scale", row_scale.float().reshape(-1).contiguous())
        bias = getattr(linear, "bias", None)
        if bias is not None and bias.device.type != "meta":
            self.bias = nn.Parameter(bias.detach(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.rotation = int(rotation)
        return self

    def _quantize(self, w: torch.Tensor) -> torch.Tensor:  # w already divided by the row scale: |w| <= qmax
        raise NotImplementedError

    def forward(self, x):
        return _DequantLinearFn.apply(x, self.weight, self.weight_scale, self.bias, self.storage, self.rotation)

    def dequantized_weight(self, dtype=torch.float32):
        w = _dequant(self.weight, self.weight_scale, torch.float32, self.storage)
        return (rotate_groups(w, self.rotation) if self.rotation else w).to(dtype)


class Int8Linear(QuantLinear):
    storage, qmax = torch.int8, 127.0

    def _quantize(self, w):
        return w.round().clamp_(-self.qmax, self.qmax).to(torch.int8)


class Fp8Linear(QuantLinear):
    """`fp8_matmul=True`: forward as an fp8 tensor-core matmul (`_Fp8MatmulFn`) instead of dequantise + matmul."""

    storage, qmax = torch.float8_e4m3fn, torch.finfo(torch.float8_e4m3fn).max

    def __init__(self, linear: nn.Linear, device=None, fp8_matmul: bool = False):
        super().__init__(linear, device)
        self.fp8_matmul = fp8_matmul

    def _quantize(self, w):
        return w.to(torch.float8_e4m3fn).view(torch.uint8)

    fp8_matmul = False

    def forward(self, x):
        fn = _Fp8MatmulFn if self.fp8_matmul else _DequantLinearFn
        return fn.apply(x, self.weight, self.weight_scale, self.bias, self.storage)


def install_quantized(model: nn.Module, stored: dict) -> int:
    """Replace the Linear layers named by `stored` ({diffusers weight key: models.quantized.QuantWeight}) with
    QuantLinears over the file's own 1-byte weights (fp8 -> Fp8Linear, int8 -> Int8Linear with its ConvRot group
    size): nothing is requantised, so the layer computes exactly with the weight ComfyUI's file defines."""
    for key, q in stored.items():
        qweight, row_scale, rotation = q.one_byte()
        parent_name, _, attr = key[: -len(".weight")].rpartition(".")
        parent = model.get_submodule(parent_name)
        cls = Int8Linear if qweight.dtype == torch.int8 else Fp8Linear
        setattr(parent, attr, cls.from_stored(getattr(parent, attr), qweight, row_scale, rotation))
    if stored:
        model._krea2_file_quantized = sorted({q.format + ("_convrot" if q.groupsize else "") for q in stored.values()})
        log.info("kept %d block Linear layers 1-byte as stored (%s)", len(stored), model._krea2_file_quantized)
    return len(stored)


def _nf4_linear(linear: nn.Linear, device, compute_dtype):
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(linear.weight.detach(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer.to(device)


def _block_linears(model: nn.Module):
    """(parent, attribute, Linear) for every plain frozen-able Linear inside the transformer blocks, looking through
    PEFT wrappers (the frozen layer is `wrapper.base_layer`)."""
    out = []
    for block in model.transformer_blocks:
        for parent in block.modules():
            for name, child in parent.named_children():
                if type(child) is nn.Linear and not _is_lora_part(parent, name):
                    out.append((parent, name, child))
    return out


def _is_lora_part(parent, name):
    # PEFT keeps its own Linear layers in ModuleDicts called lora_A / lora_B (and friends): never quantise those.
    return isinstance(parent, nn.ModuleDict) or name.startswith("lora_")


def quantize_base(transformer: nn.Module, mode: str, device=None, compute_dtype: torch.dtype | None = None,
                  fp8_matmul: bool = False) -> nn.Module:
    """Replace the frozen Linear layers of the transformer blocks with int8 / nf4 / fp8 layers, one at a time
    (peak memory: one bf16 layer on `device`). `mode="none"` does nothing. `compute_dtype` (nf4 only): the matmul
    dtype (int8/fp8 follow the activations). `fp8_matmul` (fp8 only): forward as an fp8 tensor-core matmul instead
    of dequantise + bf16 matmul."""
    if mode in (None, "none"):
        return transformer
    if mode not in QUANT_MODES:
        raise ValueError(f"quantize={mode!r}: use one of {QUANT_MODES}")
    model = unwrap_transformer(transformer)
    if getattr(model, "_krea2_quantized", None):
        if model._krea2_quantized != mode:
            raise ValueError(f"transformer already quantised as {model._krea2_quantized}, cannot requantise as {mode}")
        return transformer
    count = 0
    for parent, name, linear in _block_linears(model):
        if linear.weight.requires_grad:
            linear.weight.requires_grad_(False)
        dev = torch.device(device) if device is not None else linear.weight.device
        cdtype = compute_dtype or (linear.weight.dtype if linear.weight.dtype != torch.float32 else torch.float32)
        if mode == "int8":
            new = Int8Linear(linear, device=dev)
        elif mode == "nf4":
            new = _nf4_linear(linear, dev, cdtype)
        else:
            new = Fp8Linear(linear, device=dev, fp8_matmul=fp8_matmul)
        setattr(parent, name, new)
        count += 1
    model._krea2_quantized = mode
    log.info("quantised %d block Linear layers as %s", count, mode)
    return transformer


# ----------------------------------------------------------------------------------------------- checkpointing
def enable_checkpointing(transformer: nn.Module, num_blocks: int | None = None) -> nn.Module:
    """Activation checkpointing of the first `num_blocks` transformer blocks (None = all, 0 = off).

    Uses the model's own hook (`enable_gradient_checkpointing(func)`): the forward loop hands every block to `func`,
    which checkpoints the chosen ones and runs the rest normally. Same gradients either way; memory vs recompute.
    """
    model = unwrap_transformer(transformer)
    blocks = list(model.transformer_blocks)
    n = len(blocks) if num_blocks is None else max(0, min(int(num_blocks), len(blocks)))
    if n == 0:
        if model.gradient_checkpointing:
            model.disable_gradient_checkpointing()
        return transformer
    chosen = {id(b) for b in blocks[:n]}

    def checkpoint_some(module, *args):
        if id(module) in chosen:
            return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)
        return module(*args)

    model.enable_gradient_checkpointing(checkpoint_some)
    model._krea2_checkpoint_blocks = n
    return transformer


# ---------------------------------------------------------------------------------------------------- offload
class BlockOffloader:
    """Keeps each transformer block's frozen weights in pinned CPU memory and brings one block (plus a prefetched
    neighbour) to the device while it runs. Trainable parameters are never touched.

    When a block's weights may go: in the checkpointed forward nothing keeps them (checkpoint saves no tensors), so
    right after the block. In backward the recomputed block's autograd graph holds the *parameter tensors themselves*
    (checkpoint's recompute hook only detaches tensors that require grad), so swapping `p.data` then would hand
    backward the CPU copy; there they are released at the next block's pre-hook, once this block's backward is done.
    `poison=True` (tests) swaps in NaN tensors instead of the CPU copy, so any use of an offloaded weight shows.
    """

    def __init__(self, blocks, device, use_stream: bool | None = None, poison: bool = False):
        self.blocks = list(blocks)
        self.device = torch.device(device)
        self.poison = poison
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if (cuda and use_stream is not False) else None
        self.events: dict[int, Any] = {}
        self.on_device: set[int] = set()
        self.onloaded: dict[int, list[int]] = {}  # block -> data_ptr of each weight as onloaded
        self.last = -1
        self.tensors = []
        for block in self.blocks:
            entries = []
            for p in block.parameters():
                if p.requires_grad:
                    p.data = p.data.to(self.device)
                    continue
                cpu = p.data.to("cpu")
                if cuda:
                    cpu = cpu.pin_memory()
                entries.append((p, cpu))
            for b in block.buffers():
                b.data = b.data.to(self.device)  # small (scales); keep resident
            self.tensors.append(entries)
        for i in range(len(self.blocks)):
            self._offload(i)
        self.handles = []
        for i, block in enumerate(self.blocks):
            self.handles.append(block.register_forward_pre_hook(self._pre(i)))
            self.handles.append(block.register_forward_hook(self._post(i)))

    def _onload(self, i):
        if i in self.on_device or not 0 <= i < len(self.blocks):
            return
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                for p, cpu in self.tensors[i]:
                    p.data = cpu.to(self.device, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
            self.events[i] = event
        else:
            for p, cpu in self.tensors[i]:
                p.data = cpu.clone() if self.poison else cpu.to(self.device)
        self.onloaded[i] = [p.data.data_ptr() for p, _ in self.tensors[i]]
        self.on_device.add(i)

    def _home(self, tensor):
        cpu = tensor.to("cpu")
        return cpu.pin_memory() if self.device.type == "cuda" else cpu

    def _offload(self, i):
        ptrs = self.onloaded.pop(i, None)
        if ptrs is not None and not self.poison:
            # a library may replace a frozen weight while it runs (bitsandbytes repacks an NF4 weight for its CPU
            # kernel on first use and flags its quant_state): keep what it left, or the old layout comes back under
            # the new flag and every later call computes with scrambled weights
            self.tensors[i] = [(p, self._home(p.data) if p.data.data_ptr() != ptr else cpu)
                               for (p, cpu), ptr in zip(self.tensors[i], ptrs)]
        for p, cpu in self.tensors[i]:
            if self.poison:  # NaN for floats; 0x7F for byte storage (NaN in float8_e4m3fn, the row max in int8,
                # garbage in NF4)
                p.data = torch.full_like(cpu, float("nan") if cpu.is_floating_point() else 127)
            else:
                p.data = cpu
        self.on_device.discard(i)
        self.events.pop(i, None)

    def _pre(self, i):
        @torch.compiler.disable()
        def hook(module, args):
            direction = 1 if i >= self.last else -1  # backward recompute walks the blocks in reverse
            self.last = i
            keep = {i, i + direction} if self.stream is not None else {i}
            for j in list(self.on_device - keep):
                self._offload(j)  # blocks whose backward finished (or stale prefetches)
            self._onload(i)
            event = self.events.get(i)
            if event is not None:
                main = torch.cuda.current_stream(self.device)
                main.wait_event(event)
                for p, _ in self.tensors[i]:
                    p.data.record_stream(main)  # allocated on the side stream, used on the main one
            if self.stream is not None:
                self._onload(i + direction)
        return hook

    def _post(self, i):
        @torch.compiler.disable()
        def hook(module, args, output):
            in_backward = torch._C._current_graph_task_id() != -1
            if not in_backward:
                self._offload(i)
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()
        for i in range(len(self.blocks)):
            for p, cpu in self.tensors[i]:
                p.data = cpu.to(self.device)
        self.on_device = set(range(len(self.blocks)))


def offload_blocks(transformer: nn.Module, device, use_stream: bool | None = None, poison: bool = False) -> nn.Module:
    """Put the frozen weights of every transformer block on the CPU, streamed to `device` block by block.
    For training it needs checkpointing of every block (`apply_memory_settings` turns it on): without it autograd
    keeps each block's device weights for backward and nothing is saved."""
    model = unwrap_transformer(transformer)
    if getattr(model, "_krea2_offloader", None) is not None:
        return transformer
    if not model.gradient_checkpointing or getattr(model, "_krea2_checkpoint_blocks", 0) < len(model.transformer_blocks):
        log.warning("offload_blocks without checkpointing every block: fine for inference, no saving in training")
    offloader = BlockOffloader(model.transformer_blocks, device, use_stream, poison=poison)
    object.__setattr__(model, "_krea2_offloader", offloader)
    return transformer


def _place(transformer: nn.Module, device, keep_blocks_off: bool):
    model = unwrap_transformer(transformer)
    if not keep_blocks_off:
        transformer.to(device)
        return
    for name, child in model.named_children():
        if name != "transformer_blocks":
            child.to(device)
    for p in model.parameters(recurse=False):
        p.data = p.data.to(device)


# ------------------------------------------------------------------------------------------------------ apply
def apply_memory_settings(transformer: nn.Module, settings: MemorySettings | dict | Any, device,
                          compute_dtype: torch.dtype | None = None, compile_kwargs: dict | None = None) -> nn.Module:
    """Apply a `memory:` config (see module docstring for the order). Call after PEFT LoRA injection.
    `compute_dtype`: NF4 matmul dtype (default: the layer's dtype). `compile_kwargs`: passed to torch.compile."""
    from krea2_train.runtime import speed

    if not isinstance(settings, MemorySettings):
        settings = resolve_memory_settings(settings)
    device = torch.device(device)
    model = unwrap_transformer(transformer)
    if not any(p.requires_grad for p in model.parameters()):
        log.warning("apply_memory_settings: no trainable parameters yet; inject LoRA first so offload and compile "
                    "see the final modules")

    quantize_base(transformer, settings.quantize, device=device, compute_dtype=compute_dtype,
                  fp8_matmul=settings.fp8_matmul)
    _place(transformer, device, keep_blocks_off=settings.offload_blocks)
    speed.set_fast_attention(transformer, settings.attention_backend)
    if settings.trim_text_padding:
        speed.enable_text_padding_trim(transformer)
    if settings.fuse_qkv:
        if settings.quantize != "none":
            log.info("fuse_qkv skipped: the base is quantised (%s)", settings.quantize)
        elif settings.offload_blocks:
            log.info("fuse_qkv skipped: block offload swaps weights each step")
        else:
            speed.fuse_qkv(transformer)
    if settings.share_lora_input:  # before compile; it turns itself off where it would change results
        speed.share_lora_input(transformer)
    if settings.offload_blocks:
        if not settings.gradient_checkpointing or settings.checkpoint_blocks not in (None, len(model.transformer_blocks)):
            log.info("offload_blocks: checkpointing every block (required for offload to save memory)")
        enable_checkpointing(transformer, None)
    elif settings.gradient_checkpointing:
        enable_checkpointing(transformer, settings.checkpoint_blocks)
    else:
        enable_checkpointing(transformer, 0)
    if settings.offload_blocks:
        offload_blocks(transformer, device)
    if settings.compile:
        speed.compile_blocks(transformer, **(compile_kwargs or {}))
    return transformer
