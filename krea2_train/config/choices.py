"""Allowed values of the string options, declared once on the field that takes them.

    mode: str = choice("logit_normal", ("logit_normal", "uniform"))

`validate_choices(cfg)` walks every section and checks each such field, with a closest-match hint, so
a choice is listed in exactly one place: the field's own declaration.
"""

from __future__ import annotations

import difflib
from dataclasses import field, fields, is_dataclass

from krea2_train.errors import UserError

# LoRA file layouts `krea2-train export` writes (lora/formats.py reads them); aliases name the peer trainers' layouts.
EXPORT_FORMATS = ("diffusers", "comfyui", "civitai", "original", "musubi")
# The formats a DoRA or LoKr adapter is written in (ComfyUI's LyCORIS layouts; lora/lycoris.py says why no other).
LYCORIS_FORMATS = ("comfyui", "civitai", "musubi")
DORA_FORMATS = LYCORIS_FORMATS + ("diffusers",)  # diffusers' Krea 2 loader reads PEFT's lora_magnitude_vector
FORMAT_ALIASES = {"ai-toolkit": "original", "aitoolkit": "original", "kohya": "musubi", "comfy": "comfyui"}


def choice(default, options: tuple, **kwargs):
    """A dataclass field whose value must be one of `options` (None allowed only if listed)."""
    return field(default=default, metadata={"choices": tuple(options)}, **kwargs)


class ConfigError(UserError, ValueError):
    """A config key has a bad name, type or value. The message names the key and the fix."""


def closest(word: str, options) -> str:
    match = difflib.get_close_matches(word, [o for o in options if o is not None], n=1, cutoff=0.5)
    return f" Did you mean `{match[0]}`?" if match else ""


def check_choice(key: str, value, choices, source: str = "config") -> None:
    if value not in choices:
        raise ConfigError(f"{source}: config key `{key}` = {value!r} is not one of "
                          f"{', '.join(c for c in choices if c is not None)}."
                          f"{closest(str(value), choices)}")


def validate_choices(obj, prefix: str, source: str) -> None:
    """Every field declared with `choice(...)` (config/choices.py), in every section and list item."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if "choices" in f.metadata:
            check_choice(key, value, f.metadata["choices"], source)
        if "item_choices" in f.metadata:
            for item in value:
                if item not in f.metadata["item_choices"]:
                    options = f.metadata["item_choices"]
                    raise ConfigError(f"{source}: config key `{key}` has {item!r}; use any of "
                                      f"{', '.join(options)}.{closest(item, options)}")
        if is_dataclass(value):
            validate_choices(value, f"{key}.", source)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if is_dataclass(item):
                    validate_choices(item, f"{key}[{i}].", source)
