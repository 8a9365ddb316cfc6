"""Reading a run config: YAML + `key=value` overrides into a checked `RunConfig`.

    cfg = load_config("configs/style.yaml", ["lora.rank=32", "train.stages.0.steps=500"])

Every mistake a user can make in YAML or on the command line fails here, before any model is loaded: an unknown or
misspelled key (naming the closest valid one), a wrong type, or an impossible value (naming the key and the fix).
`save_resolved(cfg, run_dir)` writes the resolved config next to the run's results so a run can be reproduced.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import get_args, get_type_hints

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from krea2_train.config.choices import DORA_FORMATS, FORMAT_ALIASES, LYCORIS_FORMATS, ConfigError, validate_choices
from krea2_train.config.choices import closest as _closest
from krea2_train.config.data import validate_data_config
from krea2_train.config.memory import memory_problems, resolve_memory_settings
from krea2_train.config.run import RunConfig
from krea2_train.config.slider import slider_problems
from krea2_train.errors import UserError
from krea2_train.models.paths import model_path_problems
from krea2_train.utils.io import write_text_atomic

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------- loading
def _schema_at(path: list[str]):
    """The dataclass type found by walking `path` (list indices skipped) from RunConfig, or None."""
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


def _fill_from_model_set(cfg, source: str) -> None:
    """`model.models: micro` (the shipped micro Krea 2) or a folder laid out like `make-tiny` writes it fills every
    `model.*` path the config leaves unset; paths given explicitly win."""
    name = OmegaConf.select(cfg, "model.models")
    if name in (None, ""):
        return
    from krea2_train.models.micro import MicroModelError, model_set

    try:
        paths = model_set(name)
    except MicroModelError as exc:
        raise ConfigError(f"{source}: config key `model.models` = {name!r}: {exc}") from exc
    values = {"transformer": paths.transformer_raw, "turbo": paths.transformer_turbo,
              "text_encoder": paths.text_encoder, "vae": paths.vae}
    for key, value in values.items():
        if OmegaConf.is_missing(cfg.model, key) or OmegaConf.select(cfg, f"model.{key}") is None:
            OmegaConf.update(cfg, f"model.{key}", str(value), merge=True)


def load_config(path=None, overrides: list[str] | None = None, warn_paths: bool = True,
                base: dict | None = None, source: str | None = None) -> RunConfig:
    """Read YAML `path` (optional) plus `key=value` overrides into a checked RunConfig. Missing `model.*` paths are
    only warned about here (`check_model_paths` stops the commands that do work). `base`: values under the YAML
    (what a command given a data folder instead of a config fills in); `source` names it in messages."""
    schema = OmegaConf.structured(RunConfig)
    cfg = schema
    source = source or (str(path) if path else "config")
    try:
        if base:
            cfg = OmegaConf.merge(cfg, OmegaConf.create(base))
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
        _fill_from_model_set(cfg, source)
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
    for problem in model_path_problems(obj, headers=False) if warn_paths else []:  # `check_model_paths` stops the work
        log.warning("%s", problem)
    return obj


def _get(obj, key: str):
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: RunConfig, source: str = "config") -> None:
    """Impossible values: each error names the key and what would be valid."""
    if str(cfg.train.mixed_precision).lower() in ("false", "no", "fp32", "none"):
        cfg.train.mixed_precision = "no"  # YAML reads a bare `no` as false
    validate_choices(cfg, "", source)

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
    # DoRA and LoKr are written only in ComfyUI's LyCORIS layouts (lora/lycoris.py); refuse now, not after hours of
    # training.
    if cfg.lora.type in ("dora", "lokr"):
        ok = DORA_FORMATS if cfg.lora.type == "dora" else LYCORIS_FORMATS
        why = ("the `original` layout would load in diffusers as a plain LoRA" if cfg.lora.type == "dora" else
               "diffusers' Krea 2 loader cannot read LoKr")
        bad = [f for f in cfg.export.formats if FORMAT_ALIASES.get(f, f) not in ok]
        need(not bad, "export.formats", f"has {bad}, which a lora.type: {cfg.lora.type} adapter cannot be written "
             f"as ({why}): use {list(ok)}, or lora.type: lora")
        need(not cfg.export.transfer_report, "export.transfer_report", f"measures plain LoRA only; set it to false "
             f"for lora.type: {cfg.lora.type}")
        if cfg.lora.type == "dora" and cfg.export.formats:
            need(bool(cfg.export.verify and cfg.model.turbo), "export.verify",
                 "must be true with model.turbo set for lora.type: dora: a DoRA file for ComfyUI is computed against "
                 "the Turbo weights (ComfyUI normalises DoRA by the base weight) and checked there")
    if cfg.data.reference:
        need(cfg.train.mode == "lora", "data.reference", f"= true needs train.mode: lora (not {cfg.train.mode}); "
             "set data.reference: false for a slider")
        # previews without the reference would show a text-to-image picture of an edit LoRA
        need(len(cfg.preview.references) == len(cfg.preview.prompts), "preview.references",
             f"has {len(cfg.preview.references)} images for {len(cfg.preview.prompts)} preview.prompts with "
             "data.reference: true: give one reference image per prompt")
    else:
        need(not cfg.preview.references, "preview.references", "is only used with data.reference: true; remove it")
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
    for key, msg in slider_problems(cfg):
        raise ConfigError(f"{source}: config key `{key}` {msg}")
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
    for key, msg in memory_problems(cfg.memory):
        raise ConfigError(f"{source}: config key `{key}` {msg}")
    try:
        resolve_memory_settings(cfg.memory)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    c = cfg.checkpoint
    need(c.every_steps >= 0, "checkpoint.every_steps", "must be >= 0 (0: only at the end)")
    need(c.keep_last >= 1, "checkpoint.keep_last", "must be at least 1")
    for key in ("preview.every_steps", "validation.every_steps"):
        need(_get(cfg, key) >= 0, key, "must be >= 0 (0: off)")
    need(cfg.preview.resolution % 16 == 0, "preview.resolution", "must be a multiple of 16")
    need(math.isfinite(cfg.preview.turbo_lora_strength), "preview.turbo_lora_strength",
         "must be a finite number (1.0: the whole Turbo - Raw difference the LoRA holds)")
    need(all(0 < s < 1 for s in cfg.validation.sigmas), "validation.sigmas", "must all be in (0, 1)")
    need(bool(re.fullmatch(r"[A-Za-z0-9._-]+", cfg.run_name)), "run_name",
         f"= {cfg.run_name!r} must be a plain folder name (letters, digits, . _ -)")
    try:  # the data section's own value checks, also before any work
        validate_data_config(cfg.data)
    except UserError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    if cfg.model.variant == "turbo" and not cfg.model.allow_turbo_training:
        raise ConfigError(f"{source}: config key `model.variant` is turbo, but LoRAs should be trained on Raw. Point "
                          "model.transformer at Raw, or set model.allow_turbo_training: true.")


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_resolved(cfg: RunConfig, run_dir) -> Path:
    return write_text_atomic(Path(run_dir) / "config.yaml", to_yaml(cfg))
