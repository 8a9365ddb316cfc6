"""ComfyUI's own Wan 2.1 VAE (comfy/ldm/wan/vae.py, the module ComfyUI builds for qwen_image_vae.safetensors) and its
Wan 2.1 latent format (comfy/latent_formats.py), run on CPU from a ComfyUI git checkout (not vendored: ComfyUI is
GPL-3.0). What the module imports of ComfyUI is taken by name from ComfyUI's files (Conv3d's `_conv_forward` with its
`causal_zero` autopad from comfy/ops.py, `pytorch_attention` and `torch_cat_if_needed` from
comfy/ldm/modules/diffusionmodules/model.py); only plain torch layers and einops' two patterns are stand-ins.
`load()` returns None without the checkout (tests skip).
"""

from __future__ import annotations

import os
import subprocess
import sys
import types

from _comfy_source import COMFYUI_GIT, source, stub_module, take


def rearrange(x, pattern: str, **n):
    pattern = pattern.replace(" ", "")
    if pattern == "bcthw->(bt)chw":
        return x.permute(0, 2, 1, 3, 4).flatten(0, 1)
    if pattern == "(bt)chw->bcthw":
        t = n["t"]
        return x.unflatten(0, (x.shape[0] // t, t)).permute(0, 2, 1, 3, 4)
    raise NotImplementedError(pattern)


def load():
    """Namespace(vae=the comfy.ldm.wan.vae module, Wan21=the latent format class), or None without the source."""
    import torch
    import torch.nn.functional as F

    if not os.path.isdir(COMFYUI_GIT):
        return None
    ours = ("comfy", "einops")
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in ours}
    try:
        mod = stub_module
        ops_ns = {"torch": torch, "NVIDIA_MEMORY_CONV_BUG_WORKAROUND": False}
        take("comfy/ops.py", {"_conv_forward"}, ops_ns, inside=("disable_weight_init", "Conv3d"),
             base="torch.nn.Conv3d")  # -> ops_ns["Conv3d"]

        class Conv3d(ops_ns["Conv3d"]):  # comfy/ops.py disable_weight_init.Conv3d's _conv_forward, plain weights
            def forward(self, input, autopad=None):
                return self._conv_forward(input, self.weight, self.bias, autopad=autopad)

        mm = mod("comfy.model_management", raise_non_oom=lambda e: (_ for _ in ()).throw(e))
        ops = mod("comfy.ops", disable_weight_init=types.SimpleNamespace(Conv3d=Conv3d, Conv2d=torch.nn.Conv2d),
                  scaled_dot_product_attention=F.scaled_dot_product_attention)
        comfy = mod("comfy", ops=ops, model_management=mm)
        model_ns = {"torch": torch, "comfy": comfy, "model_management": mm, "logging": __import__("logging")}
        take("comfy/ldm/modules/diffusionmodules/model.py", {"torch_cat_if_needed", "pytorch_attention"}, model_ns)
        mod("comfy.ldm")
        mod("comfy.ldm.modules")
        mod("comfy.ldm.modules.diffusionmodules")
        mod("comfy.ldm.modules.diffusionmodules.model", torch_cat_if_needed=model_ns["torch_cat_if_needed"],
            vae_attention=lambda: model_ns["pytorch_attention"])
        mod("einops", rearrange=rearrange)
        vae = types.ModuleType("comfy_wan_vae")
        exec(compile(source("comfy/ldm/wan/vae.py"), "comfy/ldm/wan/vae.py", "exec"), vae.__dict__)
        lf = {"torch": torch}
        take("comfy/latent_formats.py", {"LatentFormat", "Wan21"}, lf)
        return types.SimpleNamespace(vae=vae, Wan21=lf["Wan21"])
    except (OSError, subprocess.CalledProcessError, SyntaxError, ImportError, KeyError, StopIteration):
        return None
    finally:
        for k in [k for k in sys.modules if k.split(".")[0] in ours]:
            del sys.modules[k]
        sys.modules.update(saved)
