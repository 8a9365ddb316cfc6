"""The `model:` section of a run config: which files to load, and as what."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from krea2_train.config.choices import choice


@dataclass
class ModelConfig:
    # A whole model set by name: `micro` (the shipped, pretrained micro Krea 2) or a folder laid out like `make-tiny`
    # writes it. Fills every path below that is not set.
    models: Optional[str] = None
    # Raw transformer to train on: official single file, ComfyUI fp8-scaled file, or diffusers folder.
    transformer: str = "???"
    # What `transformer` is: "raw" (train here) or "turbo" (training on it needs allow_turbo_training).
    variant: str = choice("raw", ("raw", "turbo"))
    # Turbo transformer for previews, export verification and the transfer report (null: skip Turbo steps).
    turbo: Optional[str] = None
    # Qwen3-VL folder (Hugging Face layout, weights + tokenizer), or ComfyUI's single file (qwen3vl_4b_*.safetensors).
    text_encoder: str = "???"
    # Tokenizer folder: needed with the single file (a Hugging Face Qwen3-VL folder, or ComfyUI's
    # comfy/text_encoders/qwen25_tokenizer); with a folder text encoder it overrides the folder's own tokenizer.
    tokenizer: Optional[str] = None
    # Qwen-Image VAE: diffusers folder or single safetensors file.
    vae: str = "???"
    # Expected architecture: "krea2" (the 12.9B model), "tiny" (the embedded test model) or "auto" (from shapes).
    architecture: str = choice("auto", ("krea2", "tiny", "auto"))
    # Training on a Turbo checkpoint is almost always a mistake; this makes it a warning instead of an error.
    allow_turbo_training: bool = False
    # Storage dtype of the frozen base weights: bfloat16, float16 or float32.
    dtype: str = choice("bfloat16", ("bfloat16", "float16", "float32"))
