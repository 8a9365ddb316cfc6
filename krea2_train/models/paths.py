"""Checks of the `model.*` paths of a run config, cheap enough to run before any work: each path exists, and a
transformer file is a Krea 2 transformer (safetensors header only)."""

from __future__ import annotations

import os
from pathlib import Path

from krea2_train import facts
from krea2_train.models.loading import ModelLoadError, open_safetensors, original_names

MODEL_PATH_KEYS = {  # config key -> (what it is, expected on disk)
    "model.transformer": "Krea 2 Raw transformer (single .safetensors file or diffusers folder)",
    "model.turbo": "Krea 2 Turbo transformer (single .safetensors file or diffusers folder)",
    "model.text_encoder": "Qwen3-VL text encoder (Hugging Face folder, or ComfyUI's single .safetensors file)",
    "model.tokenizer": "Qwen3-VL tokenizer folder",
    "model.vae": "Qwen-Image VAE (diffusers folder or single .safetensors file)",
}


def _transformer_header_problem(key: str, path: Path) -> str | None:
    """Cheap check (safetensors header only) that a single file is a Krea 2 transformer."""
    try:
        _, keys = open_safetensors(path)
    except ModelLoadError as exc:
        return f"config key `{key}`: {exc}"
    if original_names(keys) is None:
        if key == "model.turbo" and any(".lora_" in k for k in keys):  # a Turbo LoRA, not a checkpoint
            return (f"config key `{key}`: {path} is a LoRA, not a Krea 2 transformer. A Turbo LoRA (Turbo minus "
                    "Raw) goes to `preview.turbo` (previews on Raw + that LoRA); `model.turbo` (verification, the "
                    "transfer report) needs the Turbo checkpoint, or null to skip those steps.")
        return (f"config key `{key}`: {path} is not a Krea 2 transformer: it has no `{facts.KREA2_MARKER}` (the "
                f"text-fusion projector). Point `{key}` at the Krea 2 "
                f"{'Turbo' if key == 'model.turbo' else 'Raw'} checkpoint, not a VAE, text encoder or another model.")
    return None


def model_path_problems(cfg, keys=None, headers: bool = True) -> list[str]:
    """One message per set `model.*` path that does not exist (or, with `headers`, whose transformer file has no
    Krea 2 text-fusion projector). Paths under `make_tiny` are skipped while that folder is still to be written."""
    problems = []
    tiny = Path(os.path.expanduser(cfg.make_tiny)).resolve() if cfg.make_tiny else None
    for key in keys or MODEL_PATH_KEYS:
        value = _get(cfg, key)
        if value in (None, "", "???"):
            continue
        p = Path(os.path.expanduser(str(value)))
        if not p.exists():
            if tiny is not None and not tiny.exists() and tiny in (p.resolve(), *p.resolve().parents):
                continue  # written by `make_tiny` before any work
            problems.append(f"config key `{key}`: {MODEL_PATH_KEYS[key]} not found: {p}. Fix the path (relative "
                            f"paths start at {Path.cwd()}), or run `krea2-train make-tiny DIR` for the tiny test "
                            "model" + (" (or set model.turbo: null to skip the Turbo steps)" if key == "model.turbo"
                                       else "") + ".")
        elif key == "model.text_encoder" and p.is_file() and _get(cfg, "model.tokenizer") in (None, "", "???"):
            from krea2_train.models.comfy_files import tokenizer_problem

            problems.append(f"config key `{key}`: {p} is a single-file text encoder (ComfyUI layout): "
                            f"{tokenizer_problem(None)}.")
        elif headers and key in ("model.transformer", "model.turbo") and p.is_file():
            problem = _transformer_header_problem(key, p)
            if problem:
                problems.append(problem)
        elif key in ("model.transformer", "model.turbo", "model.text_encoder") and p.is_dir() and \
                not (p / "config.json").exists():
            problems.append(f"config key `{key}`: {p} is a folder without config.json; point `{key}` at "
                            + ("the transformer single file or a diffusers `transformer/` folder"
                               if key != "model.text_encoder" else "the Qwen3-VL folder that holds config.json"))
    return problems


def check_model_paths(cfg, keys=None) -> None:
    """Raise `ModelLoadError` naming every bad `model.*` path: run before any work (data checks, caching, training)
    so a wrong path is not found after caching or at the first preview many steps in."""
    problems = model_path_problems(cfg, keys)
    if problems:
        raise ModelLoadError("\n".join(problems))


def _get(obj, key: str):
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj
