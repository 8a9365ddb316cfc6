"""Reference latents (edit LoRAs): diffusers' `Krea2Transformer2DModel` run the way ComfyUI's Krea 2 model runs
`ref_latents` (comfy/ldm/krea2/model.py, `SingleStreamDiT._forward` and `SingleStreamBlock.forward`):

- each reference latent (B, 16, h, w) is patchified like the image and appended after the image tokens, so the
  sequence is [text, image, ref 1, ref 2, ...];
- RoPE: text (0, 0, 0); image (0, row, col); reference k's token (k, row, col), k = 1, 2, ... (its own grid);
- method `index`: every token is modulated with the sampling timestep;
  method `index_timestep_zero`: text and image tokens with the sampling timestep, reference tokens with timestep 0
  (the final layer uses the sampling timestep; its per-token output is discarded for the references anyway);
- the output keeps only the image tokens.

Not a fork: `reference_forward` runs the model's own submodules (img_in, time_embed, time_mod_proj, text_fusion,
txt_in, rotary_emb, transformer_blocks, final_layer) with a per-token modulation vector, which diffusers' block
broadcasts as (B, S, 6*D) exactly as it does (B, 1, 6*D). Module names are untouched, so a PEFT LoRA on the model
trains and exports as for text-to-image.

Note (ComfyUI): with `ref_latents_method` unset, Krea 2's model ignores the reference latents (its
default_ref_method is None), so a graph needs the FluxKontextMultiReferenceLatentMethod node to use them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from krea2_train import facts

METHODS = ("index", "index_timestep_zero")


def check_method(method: str, key: str = "train.reference_method") -> str:
    if method not in METHODS:
        from krea2_train.errors import UserError

        raise UserError(f"{key} = {method!r} is not a reference-latent method; use one of {', '.join(METHODS)} "
                        "(ComfyUI's FluxKontextMultiReferenceLatentMethod names)")
    return method


def pack_reference(latent: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latent -> (B, h/2 * w/2, C*4) tokens, channel order (c, ph, pw), as the image is packed."""
    b, c, h, w = latent.shape
    p = facts.PATCH
    if h % p or w % p:
        raise ValueError(f"reference latent sides must be multiples of {p}, got {h}x{w}")
    x = latent.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def grid_ids(grid_h: int, grid_w: int, index: int, device=None) -> torch.Tensor:
    """(grid_h * grid_w, 3) rotary coordinates (index, row, col), row-major like the packing."""
    rows = torch.arange(grid_h, device=device).repeat_interleave(grid_w)
    cols = torch.arange(grid_w, device=device).repeat(grid_h)
    return torch.stack([torch.full_like(rows, index), rows, cols], dim=-1).float()


def reference_position_ids(position_ids: torch.Tensor, reference_grids: list[tuple[int, int]]) -> torch.Tensor:
    """Append the references' (k, row, col) ids (k = 1, 2, ...) to `position_ids` (N_text + N_img, 3)."""
    extra = [grid_ids(gh, gw, k, device=position_ids.device) for k, (gh, gw) in enumerate(reference_grids, 1)]
    return torch.cat([position_ids, *extra], dim=0)


def reference_forward(model, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                      timestep: torch.Tensor, position_ids: torch.Tensor, references: list[torch.Tensor] | None,
                      method: str = "index", encoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The velocity (B, N_img, 64) for the image tokens, the references in context.

    hidden_states: (B, N_img, 64) packed noisy latents; encoder_hidden_states: (B, N_text, layers, width);
    timestep: (B,) sigmas; position_ids: (N_text + N_img, 3) from `schedule.position_ids`; references: list of clean
    (B or 1, 16, h_k, w_k) latents (each its own size), or None/[] for the plain forward (the model's own call,
    exactly); method: `index` or `index_timestep_zero`; encoder_attention_mask: (B, N_text) bool or None.

    `model` may be the bare transformer or a PEFT / DDP / FSDP wrapper of it: the call still goes through
    `model(...)` (DDP's gradient sync, FSDP's unsharding and forward hooks run as usual); only the transformer's
    own `forward` is swapped for the reference one for this call.
    """
    kwargs = dict(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, timestep=timestep,
                  position_ids=position_ids, encoder_attention_mask=encoder_attention_mask, return_dict=False)
    if not references:
        return model(**kwargs)[0]
    check_method(method, "reference method")
    tr = _bare(model)
    if "forward" in tr.__dict__:
        raise RuntimeError("the transformer's forward is already overridden (a reference call inside another?)")

    def forward(hidden_states, encoder_hidden_states, timestep, position_ids, encoder_attention_mask=None,
                attention_kwargs=None, return_dict=False):
        return (_forward(tr, hidden_states, encoder_hidden_states, timestep, position_ids, references, method,
                         encoder_attention_mask),)

    tr.forward = forward
    try:
        return model(**kwargs)[0]
    finally:
        del tr.forward


def _forward(tr, hidden_states, encoder_hidden_states, timestep, position_ids, references, method,
             encoder_attention_mask):
    """Krea2Transformer2DModel.forward with the reference tokens: the same submodule calls in the same order."""
    b, n_img, _ = hidden_states.shape
    n_text = encoder_hidden_states.shape[1]
    if position_ids.shape[0] != n_text + n_img:
        raise ValueError(f"position_ids has {position_ids.shape[0]} rows for {n_text} text + {n_img} image tokens")
    refs, grids = [], []
    for r in references:
        if r.shape[0] != b:  # ComfyUI repeats a reference to the batch size
            if b % r.shape[0]:
                raise ValueError(f"reference batch {r.shape[0]} does not divide image batch {b}")
            r = r.repeat(b // r.shape[0], 1, 1, 1)
        refs.append(pack_reference(r).to(hidden_states.dtype))
        grids.append((r.shape[2] // facts.PATCH, r.shape[3] // facts.PATCH))
    ref_tokens = torch.cat(refs, dim=1)
    pos = reference_position_ids(position_ids, grids)

    dtype = hidden_states.dtype
    temb = tr.time_embed(timestep, dtype=dtype)  # (B, 1, D)
    temb_mod = tr.time_mod_proj(F.gelu(temb, approximate="tanh"))  # (B, 1, 6D)
    if method == "index_timestep_zero":
        t0 = tr.time_mod_proj(F.gelu(tr.time_embed(torch.zeros_like(timestep), dtype=dtype), approximate="tanh"))
        # per-token modulation (B, S, 6D): text + image rows at t, reference rows at 0
        temb_mod = torch.cat([temb_mod.expand(-1, n_text + n_img, -1),
                              t0.expand(-1, ref_tokens.shape[1], -1)], dim=1)

    text_mask = attention_mask = None
    if encoder_attention_mask is not None:
        text_mask = encoder_attention_mask[:, None, None, :]
        rest = encoder_attention_mask.new_ones((b, n_img + ref_tokens.shape[1]))
        attention_mask = torch.cat([encoder_attention_mask, rest], dim=1)[:, None, None, :]
    text = tr.txt_in(tr.text_fusion(encoder_hidden_states, attention_mask=text_mask))
    x = torch.cat([text, tr.img_in(torch.cat([hidden_states, ref_tokens], dim=1))], dim=1)
    rope = tr.rotary_emb(pos)
    for block in tr.transformer_blocks:
        if torch.is_grad_enabled() and tr.gradient_checkpointing:
            x = tr._gradient_checkpointing_func(block, x, temb_mod, rope, attention_mask)
        else:
            x = block(x, temb_mod, rope, attention_mask)
    return tr.final_layer(x[:, n_text:n_text + n_img], temb)


def _bare(model):
    """The Krea2Transformer2DModel under a PEFT / DDP / compile wrapper (same modules, LoRA layers included)."""
    m = model
    for _ in range(4):
        if hasattr(m, "transformer_blocks") and hasattr(m, "final_layer"):
            return m
        m = getattr(m, "module", None) or getattr(m, "_orig_mod", None) or getattr(m, "base_model", None) \
            or getattr(m, "model", None)
        if m is None:
            break
    raise TypeError(f"{type(model).__name__} is not a Krea2Transformer2DModel (or a wrapper of one)")
