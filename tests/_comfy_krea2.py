"""ComfyUI's own Krea 2 model (comfy/ldm/krea2/model.py) run on CPU from a ComfyUI git checkout, with the few ComfyUI
helpers it imports stubbed or taken by name from their files (not vendored: ComfyUI is GPL-3.0). For checking the
reference-latent rules (`ref_latents`, `ref_latents_method`) against the code ComfyUI users run. The git dir is
tests/_comfy_source.COMFYUI_GIT; `load()` returns None when it is absent (tests skip).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import types

from _comfy_source import COMFYUI_GIT, source, stub_module, take


def rearrange(x, pattern: str, **n):
    """The einops patterns comfy/ldm/krea2/model.py and flux/math.py use (einops is not a project dependency)."""
    if pattern == "B L (H D) -> B H L D":
        return x.unflatten(-1, (n["H"], -1)).transpose(1, 2)
    if pattern == "(b l) n d -> b l d n":
        return x.reshape(n["b"], n["l"], *x.shape[1:]).transpose(-1, -2)
    if pattern == "b n d (i j) -> b n d i j":
        return x.unflatten(-1, (n["i"], n["j"]))
    if pattern == "b c (h ph) (w pw) -> b (h w) (c ph pw)":
        ph, pw = n["ph"], n["pw"]
        b, c, hh, ww = x.shape
        x = x.reshape(b, c, hh // ph, ph, ww // pw, pw).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (hh // ph) * (ww // pw), c * ph * pw)
    if pattern == "b (h w) (c ph pw) -> b c (h ph) (w pw)":
        h, w, c, ph, pw = n["h"], n["w"], n["c"], n["ph"], n["pw"]
        x = x.reshape(x.shape[0], h, w, c, ph, pw).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(x.shape[0], c, h * ph, w * pw)
    raise NotImplementedError(pattern)


def load():
    """The comfy.ldm.krea2.model module, or None without the ComfyUI source."""
    import torch
    import torch.nn.functional as F
    from torch import Tensor, nn

    if not os.path.isdir(COMFYUI_GIT):
        return None
    ours = ("comfy", "einops")
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in ours}
    try:
        mod = stub_module
        mm = mod("comfy.model_management", in_training=True, supports_fp64=lambda device: True,
                 cast_to=lambda t, dtype=None, device=None, **kw: t.to(dtype=dtype, device=device))

        class _Executor:
            def __init__(self, fn):
                self.fn = fn

            def execute(self, *a, **kw):
                return self.fn(*a, **kw)

        pe = mod("comfy.patcher_extension", get_all_wrappers=lambda *a, **kw: [],
                 WrappersMP=types.SimpleNamespace(DIFFUSION_MODEL="diffusion_model"),
                 WrapperExecutor=types.SimpleNamespace(new_class_executor=lambda fn, obj, wrappers: _Executor(fn)))

        def pad_to_patch_size(x, patch):
            assert x.shape[-2] % patch[0] == 0 and x.shape[-1] % patch[1] == 0
            return x

        def repeat_to_batch_size(t, bs):
            return t if t.shape[0] == bs else t.repeat(math.ceil(bs / t.shape[0]), *([1] * (t.ndim - 1)))[:bs]

        def optimized_attention_masked(q, k, v, heads, mask=None, skip_reshape=False, transformer_options=None):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, L, D)
            return out.transpose(1, 2).flatten(2)

        ns_math = {"torch": torch, "rearrange": rearrange, "Tensor": Tensor, "comfy": types.SimpleNamespace(
            model_management=mm)}
        take("comfy/ldm/flux/math.py", {"rope", "_apply_rope1", "_apply_rope", "apply_rope", "apply_rope1"}, ns_math)
        ns_layers = {"torch": torch, "nn": nn, "math": math, "Tensor": Tensor, "rope": ns_math["rope"]}
        take("comfy/ldm/flux/layers.py", {"EmbedND", "timestep_embedding"}, ns_layers)
        comfy = mod("comfy", model_management=mm, patcher_extension=pe)
        ldm = mod("comfy.ldm")
        comfy.ldm = ldm
        ldm.common_dit = mod("comfy.ldm.common_dit", pad_to_patch_size=pad_to_patch_size)
        comfy.utils = mod("comfy.utils", repeat_to_batch_size=repeat_to_batch_size)
        ldm.flux = mod("comfy.ldm.flux")
        mod("comfy.ldm.flux.layers", EmbedND=ns_layers["EmbedND"], timestep_embedding=ns_layers["timestep_embedding"])
        mod("comfy.ldm.flux.math", apply_rope=ns_math["apply_rope"])
        mod("comfy.ldm.modules")
        mod("comfy.ldm.modules.attention", optimized_attention_masked=optimized_attention_masked)
        mod("einops", rearrange=rearrange)
        krea2 = types.ModuleType("comfy_krea2_model")
        exec(compile(source("comfy/ldm/krea2/model.py"), "comfy/ldm/krea2/model.py", "exec"), krea2.__dict__)
        return krea2
    except (OSError, subprocess.CalledProcessError, SyntaxError, ImportError, KeyError):
        return None
    finally:
        for k in [k for k in sys.modules if k.split(".")[0] in ours]:
            del sys.modules[k]
        sys.modules.update(saved)
