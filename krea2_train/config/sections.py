"""The run config's sections other than model/data/memory (those have their own files): LoRA, stages, optimiser,
timesteps, checkpoints, logging, previews, validation and export. Each is an OmegaConf structured config; string
options declare their choices on the field (config/choices.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Union

from krea2_train.config.choices import EXPORT_FORMATS, choice
from krea2_train.config.slider import SliderTarget

LORA_TARGETS = ("attention", "attention_mlp", "all_linear", "custom")
# Turbo strengths the transfer report samples to check its suggestion against pictures (evaluate/strength.py).
STRENGTH_SWEEP = (0.0, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)


@dataclass
class LoraSection:
    rank: int = 16
    # null: alpha = rank. The effective scale is alpha/rank (1 when null), or alpha/sqrt(rank) with rslora
    # (sqrt(rank) when null).
    alpha: Optional[float] = None
    dropout: float = 0.0
    # lora | dora | lokr (LoKr uses PEFT's LoKrConfig; dropout then means module dropout).
    type: str = choice("lora", ("lora", "dora", "lokr"))
    use_rslora: bool = False
    # PEFT init: default (kaiming A, zero B) | gaussian. Not PiSSA/OLoRA: they rewrite the base weights, so the
    # adapter would no longer apply to an untouched Raw or Turbo checkpoint.
    init: str = choice("default", ("default", "gaussian"))
    # attention: q/k/v/out/gate of the transformer blocks; attention_mlp: + the block MLPs;
    # all_linear: every Linear incl. text fusion, text/time/image projections and the final layer; custom: `pattern`.
    targets: str = choice("attention", LORA_TARGETS)
    # Regular expression over diffusers module names (full match), used when targets=custom.
    pattern: Optional[str] = None
    # Only adapt these block indices (null: all blocks).
    blocks: Optional[List[int]] = None


@dataclass
class StageSection:
    resolution: int = 512
    steps: int = 1000
    batch_size: int = 1
    lr_factor: float = 1.0


@dataclass
class TrainSection:
    # Progressive resolution: stages run in order; buckets and caches switch at each boundary.
    stages: List[StageSection] = field(default_factory=lambda: [StageSection()])
    gradient_accumulation: int = 1
    # no | bf16 | fp16 (fp16 is accepted for old GPUs; bf16 is what Krea 2 was trained in)
    mixed_precision: str = choice("bf16", ("no", "bf16", "fp16"))
    # Consecutive non-finite losses tolerated (each such step is skipped) before the run stops with a checkpoint.
    nan_patience: int = 3
    # Print/track every N optimiser steps.
    log_every: int = 1
    # Shard the frozen base and the LoRA across processes (torch FSDP2) instead of a full copy per GPU (DDP). Also on
    # when launched with an accelerate FSDP config (configs/accelerate/fsdp.yaml). Needs an unquantised base.
    fsdp: bool = False
    # lora: fit the data (flow matching); slider: a concept slider, one LoRA that moves `sliders`' attribute up at
    # +strength and down at -strength, taught by Raw itself (no data; config/slider.py, train/slider.py).
    mode: str = choice("lora", ("lora", "slider"))
    sliders: List[SliderTarget] = field(default_factory=list)
    # With data.reference: how the reference tokens enter, as ComfyUI's Krea 2 model reads ref_latents_method
    # (models/reference.py). index (default): every ComfyUI method value other than index_timestep_zero (its
    # FluxKontextMultiReferenceLatentMethod node's default "offset" included) runs as index in Krea 2's model.
    # index_timestep_zero: reference tokens modulated with timestep 0; the graph must then set that method.
    reference_method: str = choice("index", ("index", "index_timestep_zero"))


@dataclass
class OptimizerSection:
    name: str = choice("adamw", ("adamw", "adamw8bit", "prodigy"))
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    # constant | linear | cosine (decay after warm-up, down to min_lr_factor * lr)
    scheduler: str = choice("constant", ("constant", "linear", "cosine"))
    warmup_steps: int = 0
    min_lr_factor: float = 0.0
    # Gradient clipping by global norm (null: off).
    max_grad_norm: Optional[float] = 1.0


@dataclass
class TimestepSection:
    sampling: str = choice("logit_normal", ("logit_normal", "uniform"))
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # raw: shift with Raw's resolution-aware mu (as at inference); fixed: use `mu`; none: no shift.
    shift: str = choice("raw", ("raw", "fixed", "none"))
    mu: Optional[float] = None
    # Loss weighting per sample.
    weighting: str = choice("none", ("none", "sigma_sqrt", "cosmap"))


@dataclass
class CheckpointSection:
    every_steps: int = 250
    keep_last: int = 3
    # auto: continue from the latest checkpoint in the run folder if there is one; never: start fresh
    # (fails if checkpoints exist, so nothing is overwritten by accident); or a path to a checkpoint folder.
    resume: str = "auto"
    # Also resume older checkpoints written with pickle (accelerate's optimizer.bin, random_states_*.pkl): loading
    # them can run any code stored in them, so only for checkpoints you wrote yourself. New ones never use pickle.
    allow_pickle: bool = False


@dataclass
class LoggingSection:
    progress: str = choice("rich", ("rich", "tqdm", "none"))
    tensorboard: bool = True
    # wandb runs offline when not logged in (no WANDB_API_KEY / netrc).
    wandb: bool = False
    wandb_project: str = "krea2-train"


@dataclass
class PreviewSection:
    every_steps: int = 0  # 0: off (previews also run once at the end when prompts are given)
    prompts: List[str] = field(default_factory=list)
    seed: int = 0
    resolution: int = 1024
    raw_steps: int = 28
    raw_guidance: float = 4.5
    negative_prompt: str = ""
    # With data.reference (edit LoRAs): one reference image per prompt, shown first in the grid; every column is
    # sampled with it (train.reference_method).
    references: List[str] = field(default_factory=list)
    # Also sample Turbo with the current LoRA at 8 steps. true: with model.turbo (its weights swapped into the base
    # and back); false: off; a path: a Turbo checkpoint, or a Turbo LoRA (Turbo minus Raw, e.g. Comfy-Org's
    # krea2_turbo_lora_rank_64_bf16.safetensors or `krea2-train extract`) stacked on Raw under the training LoRA:
    # one base in memory, also with block offload, a quantised base and FSDP. Told apart by the file's content.
    turbo: Union[bool, str] = True
    turbo_steps: int = 8
    # Strength of a Turbo LoRA given as preview.turbo (1.0: the whole Turbo - Raw difference it holds).
    turbo_lora_strength: float = 1.0


@dataclass
class ValidationSection:
    every_steps: int = 0  # 0: off
    # Fixed sigmas and fixed noise so validation curves are comparable across runs.
    sigmas: List[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    seed: int = 1234
    max_samples: int = 8


@dataclass
class ExportSection:
    # Any of config/choices.EXPORT_FORMATS (checked per item at load).
    formats: List[str] = field(default_factory=lambda: ["diffusers", "comfyui"], metadata={"item_choices": EXPORT_FORMATS})
    verify: bool = True
    transfer_report: bool = False
    # Turbo strengths sampled by the transfer report, whose style score (against the training images) checks the
    # suggested strength; [] samples only 0, 1 and the suggestion.
    strength_sweep: List[float] = field(default_factory=lambda: list(STRENGTH_SWEEP))
    # File name stem of the exported LoRA (null: run_name).
    name: Optional[str] = None
    trigger_words: List[str] = field(default_factory=list)
    # File names in the ComfyUI workflow written beside the export (NAME_workflow.json), as ComfyUI lists them in
    # models/diffusion_models, models/text_encoders and models/vae; the defaults are Comfy-Org/Krea-2's.
    comfyui_unet: str = "krea2_turbo_fp8_scaled.safetensors"
    comfyui_text_encoder: str = "qwen3vl_4b_fp8_scaled.safetensors"
    comfyui_vae: str = "qwen_image_vae.safetensors"
