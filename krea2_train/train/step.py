"""The flow-matching training step's maths, in one place: the trainer, scripts/bench_step.py and the memory estimator
all call `flow_matching_loss`, so a benchmark or an estimate measures exactly what training runs.

Flow matching (FACTS.md): x_t = (1 - s) x0 + s noise, target noise - x0, model input timestep s.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch


def flow_matching_loss(model, x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, text: torch.Tensor,
                       position_ids: torch.Tensor, text_mask: torch.Tensor | None = None, *, dtype: torch.dtype,
                       autocast=None, references: list | None = None, reference_method: str = "index") -> torch.Tensor:
    """Per-sample flow-matching MSE, float32, shape (B,).

    x0, noise: packed latents (B, N_img, 64); sigmas: (B,) in (0, 1); text: (B, N_text, layers, width) text-encoder
    taps; position_ids: (N_text + N_img, 3) from `schedule.position_ids`; text_mask: (B, N_text) bool or None.
    `dtype`: the base weights' storage dtype (inputs are cast to it); `autocast`: the mixed-precision context
    (accelerator.autocast() in training), or None. The noisy mix is formed in float32, then cast.
    references: clean (B, 16, h, w) reference latents (edit LoRAs), appended as context tokens by
    models/reference.py; the loss is on the target tokens only (the wrapper returns only those).
    """
    s = sigmas.float().view(-1, 1, 1)
    xt = (1 - s) * x0.float() + s * noise.float()
    target = noise.float() - x0.float()
    pred = model_velocity(model, xt, sigmas, text, position_ids, text_mask, dtype=dtype, autocast=autocast,
                          references=references, reference_method=reference_method)
    return ((pred.float() - target) ** 2).mean(dim=(1, 2))


def model_velocity(model, xt: torch.Tensor, sigmas: torch.Tensor, text: torch.Tensor, position_ids: torch.Tensor,
                   text_mask: torch.Tensor | None = None, *, dtype: torch.dtype, autocast=None,
                   references: list | None = None, reference_method: str = "index") -> torch.Tensor:
    """The transformer's velocity (B, N_img, 64) for noisy packed latents `xt` (B, N_img, 64) at `sigmas` (B,);
    the one forward call every training objective makes (flow matching here, sliders in train/slider.py)."""
    with autocast if autocast is not None else nullcontext():
        if references:
            from krea2_train.models.reference import reference_forward

            return reference_forward(model, xt.to(dtype), text.to(dtype), sigmas.to(dtype), position_ids,
                                     [r.to(device=xt.device, dtype=dtype) for r in references], reference_method,
                                     encoder_attention_mask=text_mask)
        return model(hidden_states=xt.to(dtype), encoder_hidden_states=text.to(dtype), timestep=sigmas.to(dtype),
                     position_ids=position_ids, encoder_attention_mask=text_mask, return_dict=False)[0]
