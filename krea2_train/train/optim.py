"""Optimisers (AdamW, bitsandbytes 8-bit AdamW, Prodigy) and the learning-rate schedule.

The schedule is one LambdaLR over optimiser steps: linear warm-up, then constant / linear / cosine decay to
`min_lr_factor`, multiplied by the current stage's `lr_factor` (progressive resolution stages).
"""

from __future__ import annotations

import math

import torch

from krea2_train.errors import UserError


def build_optimizer(params, cfg) -> torch.optim.Optimizer:
    params = list(params)
    if not params:
        raise UserError("no trainable parameters: the LoRA targets matched nothing (check `lora.targets`)")
    kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, eps=cfg.eps)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, **kw)
    if cfg.name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise UserError("optimizer.name=adamw8bit needs bitsandbytes (`pip install bitsandbytes`)") from exc
        return bnb.optim.AdamW8bit(params, **kw)
    if cfg.name == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError as exc:
            raise UserError("optimizer.name=prodigy needs prodigyopt (`pip install prodigyopt`)") from exc
        # Prodigy estimates the step size itself; lr is a multiplier (1.0 is the recommended value).
        return Prodigy(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, eps=cfg.eps,
                       safeguard_warmup=cfg.warmup_steps > 0, use_bias_correction=True)
    raise UserError(f"optimizer.name={cfg.name!r} is not supported; use adamw, adamw8bit or prodigy")


def stage_boundaries(stages) -> list[int]:
    """First global step of each stage."""
    out, total = [], 0
    for st in stages:
        out.append(total)
        total += st.steps
    return out


def stage_at(stages, step: int) -> int:
    starts = stage_boundaries(stages)
    return max(i for i, s in enumerate(starts) if s <= step) if step >= 0 else 0


def lr_factor(step: int, cfg, stages) -> float:
    total = sum(s.steps for s in stages)
    warm = cfg.warmup_steps
    if warm and step < warm:
        f = (step + 1) / warm
    elif cfg.scheduler == "constant":
        f = 1.0
    else:
        progress = min(1.0, (step - warm) / max(1, total - warm))
        decay = 1 - progress if cfg.scheduler == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        f = cfg.min_lr_factor + (1 - cfg.min_lr_factor) * decay
    return f * stages[min(stage_at(stages, step), len(stages) - 1)].lr_factor


def build_scheduler(optimizer, cfg, stages):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, stages))


def optimizer_name(cfg, mem) -> str:
    """The optimiser that runs: `optimizer.name`, or 8-bit AdamW when a memory preset (or memory.optimizer_8bit)
    asks for it and the config says plain adamw. The config itself is not changed; RUN/runtime.json records this."""
    return "adamw8bit" if mem.optimizer_8bit and cfg.name == "adamw" else cfg.name
