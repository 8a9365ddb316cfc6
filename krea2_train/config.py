"""The run config: one typed schema (dataclasses as OmegaConf structured configs) for a whole training job.

    cfg = load_config("configs/style.yaml", ["lora.rank=32", "train.stages.0.steps=500"])

Every mistake a user can make in YAML or on the command line fails here, before any model is loaded: an unknown or
misspelled key (naming the closest valid one), a wrong type, or an impossible value (naming the key and the fix).
`save_resolved(cfg, run_dir)` writes the resolved config next to the run's results so a run can be reproduced.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, List, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from .errors import UserError
from .models.config import ModelConfig

try:  # the data engineer's typed `data:` section
    from .data.config import DataConfig as _DataConfig
except ImportError:  # not landed yet: accept any mapping, the data code validates it
    _DataConfig = None
log = logging.getLogger(__name__)
DataType = _DataConfig if _DataConfig is not None else Any  # typed: OmegaConf checks the data keys too


class ConfigError(UserError, ValueError):
    """A config key has a bad name, type or value. The message names the key and the fix."""


# ------------------------------------------------------------------------------------------------------- sections
@dataclass
class LoraSection:
    rank: int = 16
    # null: alpha = rank. The effective scale is alpha/rank (1 when null), or alpha/sqrt(rank) with rslora
    # (sqrt(rank) when null).
    alpha: Optional[float] = None
    dropout: float = 0.0
    # lora | dora | lokr (LoKr uses PEFT's LoKrConfig; dropout then means module dropout).
    type: str = "lora"
    use_rslora: bool = False
    # PEFT init: default (kaiming A, zero B) | gaussian. Not PiSSA/OLoRA: they rewrite the base weights, so the
    # adapter would no longer apply to an untouched Raw or Turbo checkpoint.
    init: str = "default"
    # attention: q/k/v/out/gate of the transformer blocks; attention_mlp: + the block MLPs;
    # all_linear: every Linear incl. text fusion, text/time/image projections and the final layer; custom: `pattern`.
    targets: str = "attention"
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
    mixed_precision: str = "bf16"
    # Consecutive non-finite losses tolerated (each such step is skipped) before the run stops with a checkpoint.
    nan_patience: int = 3
    # Print/track every N optimiser steps.
    log_every: int = 1
    # Shard the frozen base and the LoRA across processes (torch FSDP2) instead of a full copy per GPU (DDP). Also on
    # when launched with an accelerate FSDP config (configs/accelerate/fsdp.yaml). Needs an unquantised base.
    fsdp: bool = False


@dataclass
class OptimizerSection:
    # adamw | adamw8bit | prodigy
    name: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    # constant | linear | cosine (decay after warm-up, down to min_lr_factor * lr)
    scheduler: str = "constant"
    warmup_steps: int = 0
    min_lr_factor: float = 0.0
    # Gradient clipping by global norm (null: off).
    max_grad_norm: Optional[float] = 1.0


@dataclass
class TimestepSection:
    # logit_normal | uniform
    sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # raw: shift with Raw's resolution-aware mu (as at inference); fixed: use `mu`; none: no shift.
    shift: str = "raw"
    mu: Optional[float] = None
    # none | sigma_sqrt | cosmap (loss weighting per sample)
    weighting: str = "none"


@dataclass
class MemorySection:
    """Handed to train/memory.py (`resolve_memory_settings`): null fields take the preset's value (or its default)."""

    # 80gb | 48gb | 24gb | 16gb: tested settings for that much GPU memory (explicit fields below win).
    preset: Optional[str] = None
    # none | int8 | nf4 | fp8 (frozen base weights quantised for training)
    quantize: Optional[str] = None
    gradient_checkpointing: Optional[bool] = None
    # How many blocks to checkpoint (null: all).
    checkpoint_blocks: Optional[int] = None
    offload_blocks: Optional[bool] = None
    # Fuse q/k/v for training only; exports are always unfused.
    fuse_qkv: Optional[bool] = None
    compile: Optional[bool] = None
    # SDPA backend for attention (auto: fastest available).
    attention_backend: Optional[str] = "auto"
    # Drop text padding per batch (same result, fewer tokens).
    trim_text_padding: Optional[bool] = None
    # Under bf16 autocast, LoRA layers share their bf16 input instead of an fp32 copy each (same result, less memory).
    share_lora_input: Optional[bool] = None


@dataclass
class CheckpointSection:
    every_steps: int = 250
    keep_last: int = 3
    # auto: continue from the latest checkpoint in the run folder if there is one; never: start fresh
    # (fails if checkpoints exist, so nothing is overwritten by accident); or a path to a checkpoint folder.
    resume: str = "auto"


@dataclass
class LoggingSection:
    # progress bar: rich | tqdm | none
    progress: str = "rich"
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
    # Also sample Turbo with the current LoRA at 8 steps (needs model.turbo).
    turbo: bool = True
    turbo_steps: int = 8


@dataclass
class ValidationSection:
    every_steps: int = 0  # 0: off
    # Fixed sigmas and fixed noise so validation curves are comparable across runs.
    sigmas: List[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    seed: int = 1234
    max_samples: int = 8


@dataclass
class ExportSection:
    formats: List[str] = field(default_factory=lambda: ["diffusers", "comfyui"])
    verify: bool = True
    transfer_report: bool = False
    # File name stem of the exported LoRA (null: run_name).
    name: Optional[str] = None
    trigger_words: List[str] = field(default_factory=list)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataType = field(default_factory=_DataConfig) if _DataConfig is not None else None
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainSection = field(default_factory=TrainSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    timesteps: TimestepSection = field(default_factory=TimestepSection)
    memory: MemorySection = field(default_factory=MemorySection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    preview: PreviewSection = field(default_factory=PreviewSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    export: ExportSection = field(default_factory=ExportSection)
    output_dir: str = "runs"
    run_name: str = "lora"
    cache_dir: str = ".cache/krea2"
    seed: int = 42
    # When set and missing, the tiny test model is written there first (`krea2-train make-tiny`); used by demo.yaml.
    make_tiny: Optional[str] = None

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.train.stages)


# Allowed values of string options (key path -> choices); checked with a closest-match hint.
CHOICES = {
    "model.variant": ("raw", "turbo"),
    "model.architecture": ("krea2", "tiny", "auto"),
    "model.dtype": ("bfloat16", "float16", "float32"),
    "lora.type": ("lora", "dora", "lokr"),
    "lora.init": ("default", "gaussian"),
    "lora.targets": ("attention", "attention_mlp", "all_linear", "custom"),
    "train.mixed_precision": ("no", "bf16", "fp16"),
    "optimizer.name": ("adamw", "adamw8bit", "prodigy"),
    "optimizer.scheduler": ("constant", "linear", "cosine"),
    "timesteps.sampling": ("logit_normal", "uniform"),
    "timesteps.shift": ("raw", "fixed", "none"),
    "timesteps.weighting": ("none", "sigma_sqrt", "cosmap"),
    "memory.quantize": ("none", "int8", "nf4", "fp8", None),
    "memory.preset": ("80gb", "48gb", "24gb", "16gb", None),
    "logging.progress": ("rich", "tqdm", "none"),
}
EXPORT_FORMATS = ("diffusers", "comfyui", "civitai")


# ------------------------------------------------------------------------------------------------------- loading
def _schema_at(path: list[str]):
    """The dataclass type found by walking `path` (list indices skipped) from RunConfig, or None."""
    from typing import get_args, get_type_hints

    cls = RunConfig
    for part in path:
        if part.isdigit() or not is_dataclass(cls):
            continue
        hints = get_type_hints(cls)
        if part not in hints:
            return None
        t = hints[part]
        for arg in (t, *get_args(t)):  # Optional[X], List[X]
            if is_dataclass(arg):
                t = arg
                break
            inner = get_args(arg)
            if inner and is_dataclass(inner[0]):
                t = inner[0]
                break
        cls = t
    return cls if is_dataclass(cls) else None


def _path_of(cls, root=None, prefix: str = "") -> str | None:
    """Dotted path of the section whose type is `cls` (list items as [i])."""
    from typing import get_args, get_type_hints

    root = root or RunConfig
    for name, t in get_type_hints(root).items():
        inner = [a for a in (t, *get_args(t)) if is_dataclass(a)]
        inner += [b for a in get_args(t) for b in get_args(a) if is_dataclass(b)]
        listy = "List" in str(t) or "list" in str(t)
        for sub in inner:
            here = f"{prefix}{name}" + ("[i]" if listy else "")
            if sub is cls:
                return here
            found = _path_of(cls, sub, here + ".")
            if found:
                return found
    return None


def _split_key(full_key: str) -> list[str]:
    return [p for p in re.split(r"[.\[\]]", full_key) if p]


def _closest(word: str, options) -> str:
    match = difflib.get_close_matches(word, [o for o in options if o is not None], n=1, cutoff=0.5)
    return f" Did you mean `{match[0]}`?" if match else ""


def _key_error(exc: OmegaConfBaseException, source: str) -> ConfigError:
    full_key = str(getattr(exc, "full_key", "") or "")
    parts = _split_key(full_key)
    if isinstance(exc, ConfigKeyError) or "not in" in str(exc):
        bad = parts[-1] if parts else str(getattr(exc, "key", "?"))
        parent = _schema_at(parts[:-1])
        where = ".".join(parts[:-1]) or "the top level"
        owner = getattr(exc, "object_type", None)
        if is_dataclass(owner) and owner is not parent:  # inside a list OmegaConf loses the path: use the type
            parent = owner
            where = _path_of(owner) or owner.__name__
            full_key = f"{where}.{bad}"
        valid = [f.name for f in fields(parent)] if parent else []
        listing = f" Valid keys in {where}: {', '.join(valid)}." if valid else ""
        return ConfigError(f"{source}: unknown config key `{full_key}`.{_closest(bad, valid)}{listing}")
    msg = str(exc).split("\n")[0]
    return ConfigError(f"{source}: config key `{full_key}` has a wrong type or value: {msg}. "
                       "Check the value against the documented type in configs/style.yaml.")


def _check_list_indices(cfg, key: str, source: str) -> None:
    """An override into a list (train.stages.5.steps) must use an existing index: OmegaConf would otherwise report
    its own internals ("dict is not a subclass of StageSection")."""
    from omegaconf import ListConfig

    node, walked = cfg, []
    for part in key.split("."):
        if isinstance(node, ListConfig):
            here = ".".join(walked)
            span = f"({0}..{len(node) - 1})" if len(node) else "(none)"
            if not part.lstrip("-").isdigit():
                raise ConfigError(f"{source}: config key `{key}`: {here} is a list; index it with a number "
                                  f"{span}, e.g. {here}.0")
            if not 0 <= int(part) < len(node):
                raise ConfigError(f"{source}: config key `{here}.{part}`: {here} has {len(node)} "
                                  f"entr{'y' if len(node) == 1 else 'ies'} {span}; add "
                                  f"{'a stage' if here == 'train.stages' else 'an entry'} in the YAML (or set the "
                                  f"whole list, e.g. {here}=[...]) or use an existing index")
            node = node[int(part)]
        else:
            try:
                if part not in node:
                    return  # an unknown key: the usual "did you mean" error follows
                node = node[part]
            except Exception:
                return
        walked.append(part)


def load_config(path=None, overrides: list[str] | None = None, warn_paths: bool = True) -> RunConfig:
    """Read YAML `path` (optional) plus `key=value` overrides into a checked RunConfig. Missing `model.*` paths are
    only warned about here (`check_model_paths` stops the commands that do work)."""
    schema = OmegaConf.structured(RunConfig)
    cfg = schema
    source = str(path) if path else "config"
    try:
        if path is not None:
            p = Path(path)
            if not p.exists():
                raise ConfigError(f"config file not found: {p}. Start from configs/style.yaml or configs/demo.yaml.")
            try:
                loaded = OmegaConf.load(p)
            except Exception as exc:  # YAML syntax errors
                raise ConfigError(f"{p} is not valid YAML: {exc}") from exc
            cfg = OmegaConf.merge(cfg, loaded)
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"override {bad[0]!r} is not of the form key=value (e.g. lora.rank=32)")
            source = f"{source} + overrides"
            for item in overrides:
                key, value = item.split("=", 1)
                key = re.sub(r"\[(\d+)\]", r".\1", key.strip())  # train.stages[0].steps == train.stages.0.steps
                _check_list_indices(cfg, key, source)
                OmegaConf.update(cfg, key, yaml.safe_load(value) if value.strip() else None, merge=True)
        obj = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except OmegaConfBaseException as exc:
        if "missing mandatory value" in str(exc).lower():
            key = getattr(exc, "full_key", "?")
            raise ConfigError(f"{source}: config key `{key}` is required but not set. Add it to the YAML or pass "
                              f"{key}=VALUE.") from exc
        raise _key_error(exc, source) from exc
    validate(obj, source)
    for problem in model_path_problems(obj, headers=False) if warn_paths else []:  # a warning only: `check_model_paths` stops the work
        log.warning("%s", problem)
    return obj


MODEL_PATH_KEYS = {  # config key -> (what it is, expected on disk)
    "model.transformer": "Krea 2 Raw transformer (single .safetensors file or diffusers folder)",
    "model.turbo": "Krea 2 Turbo transformer (single .safetensors file or diffusers folder)",
    "model.text_encoder": "Qwen3-VL text encoder folder",
    "model.vae": "Qwen-Image VAE (diffusers folder or single .safetensors file)",
}


def _transformer_header_problem(key: str, path: Path) -> str | None:
    """Cheap check (safetensors header only) that a single file is a Krea 2 transformer."""
    from . import facts
    from .models.loading import ModelLoadError, open_safetensors, original_names

    try:
        _, keys = open_safetensors(path)
    except ModelLoadError as exc:
        return f"config key `{key}`: {exc}"
    if original_names(keys) is None:
        return (f"config key `{key}`: {path} is not a Krea 2 transformer: it has no `{facts.KREA2_MARKER}` (the "
                f"text-fusion projector). Point `{key}` at the Krea 2 "
                f"{'Turbo' if key == 'model.turbo' else 'Raw'} checkpoint, not a VAE, text encoder or another model.")
    return None


def model_path_problems(cfg: RunConfig, keys=None, headers: bool = True) -> list[str]:
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


def check_model_paths(cfg: RunConfig, keys=None) -> None:
    """Raise `ModelLoadError` naming every bad `model.*` path: run before any work (data checks, caching, training)
    so a wrong path is not found after caching or at the first preview many steps in."""
    from .models.loading import ModelLoadError

    problems = model_path_problems(cfg, keys)
    if problems:
        raise ModelLoadError("\n".join(problems))


def _check_choice(key: str, value, source: str = "config") -> None:
    choices = CHOICES[key]
    if value not in choices:
        raise ConfigError(f"{source}: config key `{key}` = {value!r} is not one of "
                          f"{', '.join(c for c in choices if c is not None)}."
                          f"{_closest(str(value), choices)}")


def _get(obj, key: str):
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: RunConfig, source: str = "config") -> None:
    """Impossible values: each error names the key and what would be valid."""
    if str(cfg.train.mixed_precision).lower() in ("false", "no", "fp32", "none"):
        cfg.train.mixed_precision = "no"  # YAML reads a bare `no` as false
    for key in CHOICES:
        _check_choice(key, _get(cfg, key), source)

    def need(cond: bool, key: str, msg: str):
        if not cond:
            raise ConfigError(f"{source}: config key `{key}` {msg}")

    need(cfg.lora.rank >= 1, "lora.rank", f"= {cfg.lora.rank} must be a positive integer (typical: 8 to 64)")
    need(cfg.lora.alpha is None or cfg.lora.alpha > 0, "lora.alpha", "must be positive, or null for alpha = rank")
    need(0.0 <= cfg.lora.dropout < 1.0, "lora.dropout", "must be in [0, 1)")
    if cfg.lora.targets == "custom":
        need(bool(cfg.lora.pattern), "lora.pattern", "must be set when lora.targets=custom (a regex over module "
             "names, e.g. 'transformer_blocks\\.\\d+\\.attn\\.to_(q|k|v)')")
        try:
            re.compile(cfg.lora.pattern)
        except re.error as exc:
            raise ConfigError(f"{source}: config key `lora.pattern` is not a valid regular expression: {exc}")
    elif cfg.lora.pattern:
        raise ConfigError(f"{source}: config key `lora.pattern` is only used with lora.targets=custom; set "
                          "lora.targets: custom or remove lora.pattern")
    if cfg.lora.type == "lokr":
        need(not cfg.lora.use_rslora, "lora.use_rslora", "is not available for LoKr; set it to false")
    # The exporters write plain LoRA (what ComfyUI, diffusers and Civitai load for Krea 2); refuse now, not after
    # hours of training.
    need(cfg.lora.type == "lora" or not cfg.export.formats, "lora.type",
         f"= {cfg.lora.type} cannot be exported to {list(cfg.export.formats)}: use lora.type: lora, or set "
         "export.formats: [] to keep only the PEFT adapter in RUN/adapter")
    need(len(cfg.train.stages) >= 1, "train.stages", "must list at least one stage")
    for i, st in enumerate(cfg.train.stages):
        k = f"train.stages[{i}]"
        need(st.resolution >= 64 and st.resolution % 16 == 0, f"{k}.resolution",
             f"= {st.resolution} must be a multiple of 16 and at least 64 (e.g. 512, 768, 1024)")
        need(st.steps >= 1, f"{k}.steps", f"= {st.steps} must be at least 1")
        need(st.batch_size >= 1, f"{k}.batch_size", f"= {st.batch_size} must be at least 1")
        need(st.lr_factor > 0, f"{k}.lr_factor", f"= {st.lr_factor} must be positive")
    need(cfg.train.gradient_accumulation >= 1, "train.gradient_accumulation", "must be at least 1")
    need(cfg.train.nan_patience >= 1, "train.nan_patience", "must be at least 1")
    need(cfg.train.log_every >= 1, "train.log_every", "must be at least 1")
    o = cfg.optimizer
    need(o.lr > 0, "optimizer.lr", f"= {o.lr} must be positive (Prodigy: use 1.0)")
    need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optimizer.betas", "must be two numbers in [0, 1)")
    need(o.warmup_steps >= 0, "optimizer.warmup_steps", "must be >= 0")
    need(o.warmup_steps < cfg.total_steps or o.warmup_steps == 0, "optimizer.warmup_steps",
         f"= {o.warmup_steps} must be smaller than the total steps ({cfg.total_steps})")
    need(0 <= o.min_lr_factor <= 1, "optimizer.min_lr_factor", "must be in [0, 1]")
    need(o.max_grad_norm is None or o.max_grad_norm > 0, "optimizer.max_grad_norm", "must be positive or null")
    need(o.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
    t = cfg.timesteps
    need(t.logit_std > 0, "timesteps.logit_std", "must be positive")
    if t.shift == "fixed":
        need(t.mu is not None, "timesteps.mu", "must be set when timesteps.shift=fixed (Raw inference uses ~0.91 "
             "at 1024 px; Turbo 1.15)")
    m = cfg.memory
    need(m.checkpoint_blocks is None or m.checkpoint_blocks >= 0, "memory.checkpoint_blocks", "must be >= 0 or null")
    try:
        from dataclasses import asdict

        from .train.memory import resolve_memory_settings

        resolve_memory_settings(asdict(m))
    except ImportError:
        pass
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    c = cfg.checkpoint
    need(c.every_steps >= 0, "checkpoint.every_steps", "must be >= 0 (0: only at the end)")
    need(c.keep_last >= 1, "checkpoint.keep_last", "must be at least 1")
    for key in ("preview.every_steps", "validation.every_steps"):
        need(_get(cfg, key) >= 0, key, "must be >= 0 (0: off)")
    need(cfg.preview.resolution % 16 == 0, "preview.resolution", "must be a multiple of 16")
    need(all(0 < s < 1 for s in cfg.validation.sigmas), "validation.sigmas", "must all be in (0, 1)")
    for fmt in cfg.export.formats:
        if fmt not in EXPORT_FORMATS:
            raise ConfigError(f"{source}: config key `export.formats` has {fmt!r}; use any of "
                              f"{', '.join(EXPORT_FORMATS)}.{_closest(fmt, EXPORT_FORMATS)}")
    if cfg.lora.type != "lora" and cfg.export.formats:
        # the exporters write plain LoRA deltas (diffusers/ComfyUI keys); DoRA magnitudes and LoKr factors have none
        raise ConfigError(f"{source}: config key `lora.type` = {cfg.lora.type!r} cannot be exported to "
                          f"{', '.join(cfg.export.formats)} yet. Set `export.formats: []` to train and keep the PEFT "
                          "adapter (RUN/adapter, loadable with peft/diffusers), or use lora.type: lora.")
    need(bool(re.fullmatch(r"[A-Za-z0-9._-]+", cfg.run_name)), "run_name",
         f"= {cfg.run_name!r} must be a plain folder name (letters, digits, . _ -)")
    if _DataConfig is not None:  # the data section's own value checks, also before any work
        from .data.config import validate_data_config

        try:
            validate_data_config(cfg.data)
        except UserError as exc:
            raise ConfigError(f"{source}: {exc}") from exc
    if cfg.model.variant == "turbo" and not cfg.model.allow_turbo_training:
        raise ConfigError(f"{source}: config key `model.variant` is turbo, but LoRAs should be trained on Raw. Point "
                          "model.transformer at Raw, or set model.allow_turbo_training: true.")


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_resolved(cfg: RunConfig, run_dir) -> Path:
    from .utils.io import write_text_atomic

    return write_text_atomic(Path(run_dir) / "config.yaml", to_yaml(cfg))
