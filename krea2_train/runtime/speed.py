"""Speed paths for Krea 2 LoRA training. Each gives the same maths as diffusers' plain path (tests pin it).

Functions (each takes the transformer -- a `Krea2Transformer2DModel`, possibly PEFT-wrapped -- modifies it in place
and returns it):

    set_fast_attention(transformer, backend="auto")
        Installs `Krea2FastAttnProcessor` on every `Krea2Attention`: no k/v head repeat (SDPA `enable_gqa=True`) when
        there is no mask, the fastest SDPA kernel available (priority list, see `SDPA_BACKENDS`), and the stock
        repeat+mask path only when some text token really is padding.
    enable_text_padding_trim(transformer)
        A forward pre-hook that drops text columns padded in every row of the batch and drops the mask when no text
        token is left padded (always at batch 1). One host sync per forward (one `mask.any(0)`), not one per block.
        `trim_text_padding(...)` is the same operation on a batch, for a data collator that wants it on CPU.
    fuse_qkv(transformer)
        One frozen base matmul for to_q/to_k/to_v/to_gate per attention (their weights become views of one buffer,
        so no extra memory and `state_dict()` keys are unchanged); LoRA deltas stay per projection, so exports stay
        unfused (`to_q.lora_A` etc.). Plain (float) base Linear layers only: quantised bases are left unfused.
    share_lora_input(transformer)
        Under autocast to the base's dtype (bf16 training), LoRA layers feed their bf16 input straight to the LoRA
        matmul instead of PEFT's fp32 copy per projection (autocast casts that copy straight back to bf16: same values,
        but autograd keeps one copy per adapted projection). Inactive without autocast, for fp32 inputs, DoRA and
        other LoRA variants, and under active LoRA dropout. In the fused q/k/v/gate path the four projections share
        one input (one cast at most).
    compile_blocks(transformer, **torch_compile_kwargs)
        Regional `torch.compile` of `Krea2TransformerBlock` (diffusers `compile_repeated_blocks`).

Order for the trainer: load -> inject LoRA (PEFT) -> memory.apply_memory_settings(transformer, settings, device),
which quantises, places, then calls set_fast_attention -> enable_text_padding_trim -> fuse_qkv (after the model is
on its device and dtype: moving it afterwards unfuses, with a warning) -> share_lora_input -> checkpointing/offload
-> compile_blocks (last). `unfuse_qkv` gives each projection its own weight again (state_dict keys and values are
the same either way).
"""

from __future__ import annotations

import inspect
import logging
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from krea2_train.config.memory import SDPA_BACKENDS

log = logging.getLogger(__name__)

FUSED_PROJECTIONS = ("to_q", "to_k", "to_v", "to_gate")


# ----------------------------------------------------------------------------------------------------- helpers
def unwrap_transformer(model: nn.Module) -> nn.Module:
    """The `Krea2Transformer2DModel` inside `model` (itself, a PeftModel, a compiled module, a DDP wrapper, an FSDP
    module, whose class is a subclass made by fully_shard)."""
    from diffusers import Krea2Transformer2DModel

    for m in model.modules():
        if isinstance(m, Krea2Transformer2DModel):
            return m
    raise TypeError(f"no Krea2Transformer2DModel inside {type(model).__name__}")


def attention_modules(model: nn.Module):
    return [m for m in model.modules() if type(m).__name__ == "Krea2Attention"]


def base_linear(module: nn.Module) -> nn.Module:
    """The layer that holds the frozen weight: PEFT's `base_layer` if LoRA-wrapped, else the module itself."""
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module


# --------------------------------------------------------------------------------------------------- attention
def _sdpa_backends():
    from torch.nn.attention import SDPBackend

    # Fastest first; SDPA skips a kernel that cannot take the inputs (e.g. a mask) and tries the next one.
    # cuDNN is second: on H100 it is often the fastest, but flash is the safer default; the benchmark compares both.
    return {
        "auto": [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
        "flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH],
        "cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                  SDPBackend.MATH],
        "efficient": [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
        "math": [SDPBackend.MATH],
    }




def _sdpa(query, key, value, attn_mask, enable_gqa, backends):
    if backends is None:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, enable_gqa=enable_gqa)
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(backends, set_priority=True):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, enable_gqa=enable_gqa)


class Krea2FastAttnProcessor:
    """Drop-in for diffusers' `Krea2AttnProcessor`, same results.

    * mask None: SDPA with `enable_gqa=True` (k/v stay at 12 heads: no repeat_interleave copies, 4x less k/v traffic),
      which flash and math kernels accept.
    * mask given: repeat k/v heads and pass the mask, exactly as diffusers does (flash rejects masks; the efficient
      kernel takes a mask but not GQA). `enable_text_padding_trim` makes this path rare: only batches with captions
      of different lengths still need a mask.
    * `backend`: one of SDPA_BACKENDS ("torch" or None = torch's own choice), or "diffusers:<name>" to route through diffusers'
      `dispatch_attention_fn` with that backend (e.g. "diffusers:_flash_3_hub"); that route repeats k/v like diffusers.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, backend: str | None = "auto"):
        self.backend = backend
        self._dispatch_backend = None
        self._backends = None
        if backend in (None, "torch"):
            pass  # torch picks the kernel
        elif backend.startswith("diffusers:"):
            self._dispatch_backend = backend.split(":", 1)[1]
        elif backend in SDPA_BACKENDS:
            self._backends = _sdpa_backends()[backend]
        else:
            raise ValueError(f"attention backend {backend!r}: use one of {SDPA_BACKENDS}, None, or 'diffusers:<name>'")

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        query, key, value, gate = project_qkvg(attn, hidden_states)
        query = query.unflatten(-1, (attn.num_heads, attn.head_dim))
        key = key.unflatten(-1, (attn.num_kv_heads, attn.head_dim))
        value = value.unflatten(-1, (attn.num_kv_heads, attn.head_dim))

        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        groups = attn.num_heads // attn.num_kv_heads
        if self._dispatch_backend is not None or self._parallel_config is not None:
            from diffusers.models.attention_dispatch import dispatch_attention_fn

            if groups > 1:
                key = key.repeat_interleave(groups, dim=2)
                value = value.repeat_interleave(groups, dim=2)
            out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask,
                                        backend=self._dispatch_backend or self._attention_backend,
                                        parallel_config=self._parallel_config)
        else:
            query, key, value = (t.transpose(1, 2) for t in (query, key, value))  # (B, H, S, D) for SDPA
            if attention_mask is None:
                out = _sdpa(query, key, value, None, groups > 1, self._backends)
            else:
                if groups > 1:
                    key = key.repeat_interleave(groups, dim=1)
                    value = value.repeat_interleave(groups, dim=1)
                out = _sdpa(query, key, value, attention_mask, False, self._backends)
            out = out.transpose(1, 2)
        out = out.flatten(2, 3)
        out = out * torch.sigmoid(gate)
        return attn.to_out[0](out)


def set_fast_attention(transformer: nn.Module, backend: str | None = "auto") -> nn.Module:
    """Install `Krea2FastAttnProcessor(backend)` on every Krea 2 attention (text fusion blocks included)."""
    for attn in attention_modules(transformer):
        attn.set_processor(Krea2FastAttnProcessor(backend))
    return transformer


def set_plain_attention(transformer: nn.Module) -> nn.Module:
    """Back to diffusers' stock processor (the reference path)."""
    from diffusers.models.transformers.transformer_krea2 import Krea2AttnProcessor

    for attn in attention_modules(transformer):
        attn.set_processor(Krea2AttnProcessor())
    return transformer


# ------------------------------------------------------------------------------------------------ text padding
def trim_text_padding(encoder_hidden_states, encoder_attention_mask, position_ids=None):
    """Drop text columns that are padding in every row; drop the mask if nothing is padded any more.

    Returns (encoder_hidden_states, encoder_attention_mask or None, position_ids). Works for left or right padding.
    Image tokens see the same keys, so their outputs are unchanged (up to float summation order in the kernel).
    """
    if encoder_attention_mask is None:
        return encoder_hidden_states, None, position_ids
    mask = encoder_attention_mask.bool()
    keep = mask.any(0)
    text_len = mask.shape[1]
    if not bool(keep.all()):
        # Columns valid nowhere carry nothing any image token can see: remove them.
        idx = keep.nonzero().squeeze(1)
        encoder_hidden_states = encoder_hidden_states.index_select(1, idx.to(encoder_hidden_states.device))
        mask = mask.index_select(1, idx)
        if position_ids is not None:
            text_pos = position_ids[:text_len].index_select(0, idx.to(position_ids.device))
            position_ids = torch.cat([text_pos, position_ids[text_len:]], dim=0)
    if bool(mask.all()):
        return encoder_hidden_states, None, position_ids
    return encoder_hidden_states, mask.to(encoder_attention_mask.dtype), position_ids


def enable_text_padding_trim(transformer: nn.Module) -> nn.Module:
    """Register a forward pre-hook on the Krea 2 model that applies `trim_text_padding` to its inputs."""
    model = unwrap_transformer(transformer)
    if getattr(model, "_krea2_trim_hook", None) is not None:
        return transformer
    sig = inspect.signature(type(model).forward)
    names = [n for n in sig.parameters if n != "self"]

    def hook(module, args, kwargs):
        bound = dict(zip(names, args))
        bound.update(kwargs)
        mask = bound.get("encoder_attention_mask")
        if mask is None:
            return None
        ehs, mask, pos = trim_text_padding(bound["encoder_hidden_states"], mask, bound.get("position_ids"))
        bound.update(encoder_hidden_states=ehs, encoder_attention_mask=mask, position_ids=pos)
        return (), bound

    model._krea2_trim_hook = model.register_forward_pre_hook(hook, with_kwargs=True)
    return transformer


# --------------------------------------------------------------------------------------------------- fused qkv
def _is_plain_linear(layer: nn.Module) -> bool:
    return type(layer) is nn.Linear and layer.bias is None and layer.weight.is_floating_point() \
        and layer.weight.element_size() >= 2


def fuse_qkv(transformer: nn.Module) -> nn.Module:
    """Make to_q/to_k/to_v/to_gate weights views of one frozen (out_q+out_k+out_v+out_g, in) tensor per attention.

    Why views: one matmul instead of four, no second copy of the weights, unchanged module names and state_dict, and
    LoRA stays per projection (a fused LoRA would export as `to_qkv`, which ComfyUI does not load). If anything later
    replaces a weight (moving the model, PEFT merge), the processor sees the views are gone and runs unfused.
    Skipped (logged) for attentions whose base layers are quantised or trainable.
    """
    fused, skipped = 0, 0
    for attn in attention_modules(transformer):
        bases = [base_linear(getattr(attn, n)) for n in FUSED_PROJECTIONS]
        ok = all(_is_plain_linear(b) for b in bases) and not any(b.weight.requires_grad for b in bases) \
            and len({(b.weight.dtype, b.weight.device, b.in_features) for b in bases}) == 1
        if not ok:
            skipped += 1
            continue
        with torch.no_grad():
            weight = torch.cat([b.weight for b in bases], dim=0)
        start = 0
        for b in bases:
            rows = b.out_features
            b.weight = nn.Parameter(weight[start:start + rows], requires_grad=False)
            start += rows
        # A plain attribute, not a buffer: `.to()` must not copy it separately from the views.
        object.__setattr__(attn, "_krea2_fused_weight", weight)
        fused += 1
    if skipped:
        log.info("fuse_qkv: fused %d attentions, left %d unfused (quantised or trainable base)", fused, skipped)
    return transformer


def unfuse_qkv(transformer: nn.Module) -> nn.Module:
    """Give each projection its own contiguous weight again (e.g. before saving a full model)."""
    for attn in attention_modules(transformer):
        if getattr(attn, "_krea2_fused_weight", None) is None:
            continue
        for n in FUSED_PROJECTIONS:
            b = base_linear(getattr(attn, n))
            b.weight = nn.Parameter(b.weight.detach().clone(), requires_grad=False)
        object.__setattr__(attn, "_krea2_fused_weight", None)
    return transformer


def _fused_weight(attn):
    weight = getattr(attn, "_krea2_fused_weight", None)
    if weight is None:
        return None
    if torch.compiler.is_compiling() or weight.is_meta:
        return weight  # checked in eager on the first call; data pointers cannot be traced (meta: all 0)
    ptr, step = weight.data_ptr(), weight.stride(0) * weight.element_size()
    start = 0
    for n in FUSED_PROJECTIONS:
        w = base_linear(getattr(attn, n)).weight
        if w.data_ptr() != ptr + start * step or w.dtype != weight.dtype:
            log.warning("fuse_qkv: weights of an attention were replaced (moved or merged); running it unfused")
            object.__setattr__(attn, "_krea2_fused_weight", None)
            return None
        start += w.shape[0]
    return weight


def _lora_ok(layer) -> bool:
    if not hasattr(layer, "lora_A"):
        return True
    return not layer.merged and not getattr(layer, "lora_variant", {}) and not any(
        getattr(layer, "use_dora", {}).values())


def _lora_input(layer, x, dtype, casts: dict):
    """`layer._cast_input_dtype(x, dtype)`, made once per kind of cast and shared by the four projections."""
    if _keeps_input(layer, x, dtype):
        return x
    key = (getattr(layer, "cast_input_dtype_enabled", True), dtype)
    if key not in casts:
        casts[key] = layer._cast_input_dtype(x, dtype)
    return casts[key]


def _add_lora(layer, x, result, casts: dict):
    """PEFT `lora.Linear.forward` without the base matmul (same casts and order); `casts` shares the input copy."""
    if not hasattr(layer, "lora_A") or layer.disable_adapters:
        return result
    dtype = result.dtype
    for name in layer.active_adapters:
        if name not in layer.lora_A.keys():
            continue
        lora_A, lora_B = layer.lora_A[name], layer.lora_B[name]
        xa = _lora_input(layer, x, lora_A.weight.dtype, casts)
        result = result + lora_B(lora_A(layer.lora_dropout[name](xa))) * layer.scaling[name]
    return result.to(dtype)


def project_qkvg(attn, hidden_states):
    """q, k, v, gate projections: one fused frozen matmul plus per-projection LoRA, or the four modules as is.
    The LoRA branches share one input: `hidden_states` itself under `share_lora_input` + autocast, else one cast copy
    (PEFT would make one per projection; the values are the same)."""
    weight = _fused_weight(attn)
    layers = [getattr(attn, n) for n in FUSED_PROJECTIONS]
    if weight is None or not all(_lora_ok(layer) for layer in layers):
        return tuple(layer(hidden_states) for layer in layers)
    base = F.linear(hidden_states, weight)
    sizes = [base_linear(layer).out_features for layer in layers]
    casts = {}
    return tuple(_add_lora(layer, hidden_states, part, casts)
                 for layer, part in zip(layers, base.split(sizes, dim=-1)))


# ------------------------------------------------------------------------------------------------ shared LoRA input
def _autocast_dtype(device_type: str):
    """The autocast dtype active for `device_type`, or None."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _keeps_input(layer, x, dtype) -> bool:
    """Whether a `share_lora_input` layer feeds x to its LoRA uncast (see `_cast_input_dtype`)."""
    return getattr(layer, "_krea2_shared_input", False) and x is not None and dtype == torch.float32 \
        and x.dtype != dtype and not layer.lora_variant and _autocast_dtype(x.device.type) == x.dtype \
        and (not layer.training or all(isinstance(d, nn.Identity) for d in layer.lora_dropout.values()))


def _cast_input_dtype(self, x, dtype):
    """Bound to each LoRA layer by `share_lora_input` in place of PEFT's `BaseTunerLayer._cast_input_dtype`.

    Skips the cast exactly when it cannot change a value: autocast is on with x's own dtype and the cast would widen
    to float32, so `lora_A`'s matmul would cast the fp32 copy straight back to x.dtype; the layer is vanilla LoRA (DoRA
    and other variants compute weight norms etc. in the input's dtype); and no dropout runs on the input (dropout in
    bf16 would round its 1/(1-p) scale, and its output is a new tensor per projection anyway: nothing to save).
    Otherwise PEFT's cast (which also honours `cast_input_dtype_enabled` / `disable_input_dtype_casting`)."""
    if _keeps_input(self, x, dtype):
        return x
    return type(self)._cast_input_dtype(self, x, dtype)


def _lora_linears(model: nn.Module):
    from peft.tuners.lora.layer import Linear as LoraLinear

    return [m for m in model.modules() if isinstance(m, LoraLinear)]


def share_lora_input(transformer: nn.Module) -> nn.Module:
    """Let every PEFT LoRA Linear pass its input to the LoRA matmul uncast when training under autocast to the
    input's dtype (bf16 base + fp32 LoRA + bf16 autocast, the trainer's default).

    PEFT casts the layer input to the LoRA weight dtype (fp32) before `lora_A`; autocast then casts that copy back to
    bf16 for the matmul, which saves the bf16 re-cast for backward. So each adapted projection keeps its own copy of
    its input (for q/k/v/gate: four copies of the same hidden state) although the values equal the input's. With this
    path on, `lora_A` sees the input itself, which the q/k/v/gate (and MLP gate/up) LoRAs then share: the same values
    reach the same bf16 matmuls, so outputs and gradients are the same (bit for bit unfused; with fuse_qkv up to the
    order bf16 gradient contributions are summed). Without autocast (an fp32 run, or a bf16 run without autocast,
    where the LoRA matmul really runs in fp32), with DoRA/variants, with active LoRA dropout, or for non-float32 LoRA
    weights nothing changes: the check runs on every call, so it holds under checkpoint recomputation and
    torch.compile too. `unshare_lora_input` undoes it."""
    n = 0
    for layer in _lora_linears(transformer):
        layer._cast_input_dtype = types.MethodType(_cast_input_dtype, layer)
        layer._krea2_shared_input = True
        n += 1
    log.debug("share_lora_input: %d LoRA layers", n)
    return transformer


def unshare_lora_input(transformer: nn.Module) -> nn.Module:
    """PEFT's own cast again (an fp32 copy of the input per LoRA layer)."""
    for layer in _lora_linears(transformer):
        layer.__dict__.pop("_cast_input_dtype", None)
        layer.__dict__.pop("_krea2_shared_input", None)
    return transformer


# ------------------------------------------------------------------------------------------------------ compile
def compile_blocks(transformer: nn.Module, **compile_kwargs) -> nn.Module:
    """Regional compile: each `Krea2TransformerBlock` is compiled once and reused by all 28 (compile time of one
    block, most of the whole-model speed-up). Apply last, after PEFT, checkpointing and offload hooks."""
    unwrap_transformer(transformer).compile_repeated_blocks(**compile_kwargs)
    return transformer
