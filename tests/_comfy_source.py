"""ComfyUI's own LoRA/LoKr/DoRA weight code, loaded from a ComfyUI git checkout (not vendored: ComfyUI is GPL-3.0).

`comfy/weight_adapter/{base,lora,loha,lokr}.py` import nothing of ComfyUI but `comfy.model_management.cast_to_device`,
which a stub provides; `load_lora` and `calculate_weight` are taken from `comfy/lora.py` by name (that module imports
the whole of ComfyUI). The git dir is $KREA2_COMFYUI_GIT, default the fork the project reads
(`fetch github:yzkee/ComfyUI`); tests using it skip when it is absent.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import types

COMFYUI_GIT = os.environ.get("KREA2_COMFYUI_GIT", "/work/.mirror/yzkee+ComfyUI/repo")


def source(path: str) -> str:
    """The text of `path` in the ComfyUI checkout (its HEAD)."""
    return subprocess.run(["git", "-C", COMFYUI_GIT, "show", f"HEAD:{path}"], capture_output=True, text=True,
                          check=True).stdout


def take(path: str, names: set, ns: dict, inside: tuple = (), base: str | None = None) -> None:
    """exec the top-level functions/classes `names` of `path` into ns. With `inside` (a chain of class names, e.g.
    ("disable_weight_init", "Conv3d")): methods of the innermost class, in a class of its name (with `base` as its
    base, e.g. "torch.nn.Conv3d"; their `super()` needs the __class__ cell a class body gives)."""
    body = ast.parse(source(path)).body
    for cls in inside:
        body = next(n for n in body if isinstance(n, ast.ClassDef) and n.name == cls).body
    nodes = [n for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in names]
    assert {n.name for n in nodes} == set(names), (path, names)
    if inside:
        bases = [ast.parse(base, mode="eval").body] if base else []
        nodes = [ast.ClassDef(name=inside[-1], bases=bases, keywords=[], body=nodes, decorator_list=[],
                              type_params=[])]
    exec(compile(ast.fix_missing_locations(ast.Module(body=nodes, type_ignores=[])), path, "exec"), ns)


def stub_module(name: str, **attrs) -> types.ModuleType:
    """A package-like module `name` holding `attrs`, registered in sys.modules (callers restore sys.modules)."""
    m = types.ModuleType(name)
    m.__path__ = []
    m.__dict__.update(attrs)
    sys.modules[name] = m
    return m


def load() -> types.SimpleNamespace | None:
    """Namespace with load_lora, calculate_weight and the adapter classes, or None without the ComfyUI source."""
    import logging

    import torch

    if not os.path.isdir(COMFYUI_GIT):
        return None
    try:
        saved = {k: v for k, v in sys.modules.items() if k == "comfy" or k.startswith("comfy.")}
        comfy = types.ModuleType("comfy")
        comfy.__path__ = []
        mm = types.ModuleType("comfy.model_management")
        mm.cast_to_device = lambda t, device, dtype, copy=False: t.to(device=device, dtype=dtype, copy=copy)
        comfy.model_management = mm
        wa = types.ModuleType("comfy.weight_adapter")
        wa.__path__ = []
        sys.modules.update({"comfy": comfy, "comfy.model_management": mm, "comfy.weight_adapter": wa})
        mods = {}
        for name in ("base", "lora", "loha", "lokr"):
            mod = types.ModuleType(f"comfy.weight_adapter.{name}")
            mod.__package__ = "comfy.weight_adapter"
            sys.modules[mod.__name__] = mod
            exec(compile(source(f"comfy/weight_adapter/{name}.py"), f"comfy/weight_adapter/{name}.py", "exec"),
                 mod.__dict__)
            mods[name] = mod
        wa.WeightAdapterBase = mods["base"].WeightAdapterBase
        # the order of comfy/weight_adapter/__init__.py's `adapters` (GLoRA/OFT/BOFT read none of our keys)
        wa.adapters = [mods["lora"].LoRAAdapter, mods["loha"].LoHaAdapter, mods["lokr"].LoKrAdapter]
        tree = ast.parse(source("comfy/lora.py"))
        funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in ("load_lora", "calculate_weight",
                                                                                      "pad_tensor_to_shape")]
        ns = {"torch": torch, "logging": logging, "comfy": comfy, "weight_adapter": wa}
        exec(compile(ast.Module(body=funcs, type_ignores=[]), "comfy/lora.py", "exec"), ns)
    except (OSError, subprocess.CalledProcessError, SyntaxError, ImportError):
        return None
    finally:
        for k in [k for k in sys.modules if k == "comfy" or k.startswith("comfy.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    return types.SimpleNamespace(load_lora=ns["load_lora"], calculate_weight=ns["calculate_weight"],
                                 weight_decompose=mods["base"].weight_decompose, **{n: m for n, m in mods.items()})


def patch(comfy, lora: dict, key_map: dict, weights: dict, strength: float = 1.0) -> tuple[dict, list, list]:
    """({model key: the weight ComfyUI's code makes of weights[model key]}, keys it logs as not loaded, errors it
    logs (an adapter that fails leaves the weight unpatched)), as
    LoraLoaderModelOnly does: load_lora(lora, key_map), add_patches(strength_patch=strength, strength_model=1.0),
    then calculate_weight on a float32 copy (ModelPatcher.patch_weight_to_device with a float32 LoRA dtype)."""
    import logging

    records = []

    class _Grab(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = _Grab()
    logging.getLogger().addHandler(handler)
    out = {}
    try:
        patches = comfy.load_lora(lora, key_map)
        for key, adapter in patches.items():
            w = weights[key].float().clone()
            out[key] = comfy.calculate_weight([(strength, adapter, 1.0, None, None)], w, key)
    finally:
        logging.getLogger().removeHandler(handler)
    not_loaded = [m.split(": ", 1)[1] for m in records if m.startswith("lora key not loaded")]
    errors = [m for m in records if m.startswith("ERROR") or "Failed" in m]
    return out, not_loaded, errors
