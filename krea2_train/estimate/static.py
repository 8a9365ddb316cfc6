"""The static half of the memory estimate and the arithmetic around it: resident weights, LoRA, optimiser states,
FSDP shards and buffers, the meta model with the run's settings applied, and the card total with its allowance."""

from __future__ import annotations

import dataclasses
import math

import torch

from krea2_train.estimate.trace import BNB8_BLOCK, SAME_AS_DTYPE, quantize_standins, trace_step
from krea2_train.runtime import memory, speed

GiB = 2**30
CONTEXT_GIB = 0.5
WORKSPACE_GIB = 0.25
FRAGMENTATION = 0.10
OFFLOAD_RESIDENT_BLOCKS = 2  # BlockOffloader: running block + prefetched neighbour

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
                   optimizer=None, dtype=torch.bfloat16, autocast_dtype=SAME_AS_DTYPE, static=None) -> dict:
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


