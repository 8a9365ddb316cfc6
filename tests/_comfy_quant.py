"""An independent writer of ComfyUI's quantised checkpoint layouts, for tests of the loader.

Written from the format rules (ComfyUI comfy/ops.py, comfy/utils.py convert_old_quants, comfy-kitchen's layouts),
not from krea2_train.models.quantized: the Hadamard matrix is built entry by entry from base-4 digits (the loader
uses Kronecker products), the block-scale tiles by an explicit index formula (the loader reshapes and permutes).
"""

from __future__ import annotations

import json
import math

import torch

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
H4 = ((1, 1, 1, -1), (1, 1, -1, 1), (1, -1, 1, 1), (-1, 1, 1, 1))


def regular_hadamard(size: int) -> torch.Tensor:
    """H[i, j] = prod over base-4 digits d of H4[i_d][j_d], / sqrt(size): the Kronecker power of H4."""
    n = round(math.log(size, 4))
    h = torch.empty(size, size, dtype=torch.float64)
    for i in range(size):
        for j in range(size):
            v, a, b = 1, i, j
            for _ in range(n):
                v *= H4[a % 4][b % 4]
                a, b = a // 4, b // 4
            h[i, j] = v
    return (h / math.sqrt(size)).float()


def marker(conf: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def to_tiles(scales: torch.Tensor) -> torch.Tensor:
    """cuBLAS block-scale layout: (rows, cols) scales into (ceil(rows/128)*128, ceil(cols/4)*4), the scale of (r, c)
    at tile (r // 128, c // 4), offset (r % 32) * 16 + (r % 128 // 32) * 4 + c % 4 within the tile's 512."""
    rows, cols = scales.shape
    tr, tc = -(-rows // 128), -(-cols // 4)
    flat = torch.zeros(tr * tc * 512, dtype=scales.dtype)
    for r in range(rows):
        for c in range(cols):
            tile = (r // 128) * tc + c // 4
            flat[tile * 512 + (r % 32) * 16 + (r % 128 // 32) * 4 + c % 4] = scales[r, c]
    return flat.reshape(tr * 128, tc * 4)


def fp8(w: torch.Tensor) -> dict:
    scale = w.abs().max().float() / 448.0
    return {"weight": (w.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn), "weight_scale": scale}


def int8_convrot(w: torch.Tensor, groupsize: int = 256) -> dict:
    """ComfyUI's ConvRot int8: rotate each group of input features by H^T, then per-row absmax int8 (/127)."""
    n, k = w.shape
    h = regular_hadamard(groupsize)
    rot = (w.float().reshape(n, k // groupsize, groupsize) @ h.T).reshape(n, k)
    scale = rot.abs().amax(dim=1, keepdim=True) / 127.0
    q = (rot / scale).round().clamp(-128, 127).to(torch.int8)
    return {"weight": q, "weight_scale": scale}


def int8_rows(w: torch.Tensor) -> dict:
    scale = w.float().abs().amax(dim=1, keepdim=True) / 127.0
    return {"weight": (w.float() / scale).round().clamp(-128, 127).to(torch.int8), "weight_scale": scale}


def nvfp4(w: torch.Tensor) -> dict:
    """Per-tensor scale amax / (448 * 6); per 16-block fp8 e4m3 scale amax_b / 6 / it; values to the nearest e2m1,
    two per byte, the first in the high nibble."""
    n, k = w.shape
    w = w.float()
    ts = w.abs().max() / (448.0 * 6.0)
    blocks = w.reshape(n, k // 16, 16)
    bs = (blocks.abs().amax(dim=-1) / 6.0 / ts).clamp(max=448).to(torch.float8_e4m3fn)
    total = (bs.float() * ts).unsqueeze(-1)
    x = (blocks / torch.where(total == 0, torch.ones_like(total), total)).clamp(-6, 6).reshape(n, k)
    code = (x.abs().unsqueeze(-1) - E2M1).abs().argmin(dim=-1) + 8 * (x < 0)
    code = code.to(torch.uint8).reshape(n, k // 2, 2)
    packed = (code[..., 0] << 4) | code[..., 1]
    return {"weight": packed, "weight_scale": to_tiles(bs.view(torch.uint8)).view(torch.float8_e4m3fn),
            "weight_scale_2": ts}


def mxfp8(w: torch.Tensor) -> dict:
    """Per 32-block power-of-two scale 2^ceil(log2(amax_b / 448)) stored as e8m0 (exponent + 127)."""
    n, k = w.shape
    blocks = w.float().reshape(n, k // 32, 32)
    amax = blocks.abs().amax(dim=-1).clamp(min=2.0 ** -127)
    e = (torch.ceil(torch.log2(amax / 448.0)) + 127).clamp(1, 254)
    scale = torch.exp2(e - 127).unsqueeze(-1)
    q = (blocks / scale).clamp(-448, 448).reshape(n, k).to(torch.float8_e4m3fn)
    return {"weight": q, "weight_scale": to_tiles(e.to(torch.uint8))}


def quantize_file(state: dict, fmt: str, select=None, style: str = "comfy_quant", groupsize: int = 256):
    """A ComfyUI-style quantised copy of an original-layout state dict: every 2-D `.weight` for which `select(name,
    tensor)` is true (default: the transformer blocks' Linear layers) in `fmt`. Returns (tensors, header)."""
    select = select or (lambda n, t: n.startswith("blocks.") and t.ndim == 2)
    out, layers = {}, {}
    for name, t in state.items():
        if not (name.endswith(".weight") and t.ndim == 2 and select(name, t)):
            out[name] = t
            continue
        layer = name[: -len(".weight")]
        if fmt == "float8_e4m3fn":
            parts, conf = fp8(t), {"format": "float8_e4m3fn"}
        elif fmt == "int8_convrot":
            parts = int8_convrot(t, groupsize)
            conf = {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": groupsize}
        elif fmt == "int8_tensorwise":
            parts, conf = int8_rows(t), {"format": "int8_tensorwise"}
        elif fmt == "nvfp4":
            parts, conf = nvfp4(t), {"format": "nvfp4"}
        elif fmt == "mxfp8":
            parts, conf = mxfp8(t), {"format": "mxfp8"}
        else:
            raise ValueError(fmt)
        out[name] = parts.pop("weight")
        if style == "legacy":  # scaled_fp8 marker + scale_weight
            out[f"{layer}.scale_weight"] = parts["weight_scale"].reshape(1)
        else:
            out.update({f"{layer}.{k}": v.contiguous() for k, v in parts.items()})
        if style == "comfy_quant":
            out[f"{layer}.comfy_quant"] = marker(conf)
        layers[layer] = conf
    header = {}
    if style == "header":
        header["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": layers})
    if style == "legacy":
        out["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    return out, header
