"""ComfyUI's quantised checkpoint layouts, read exactly or refused.

How ComfyUI marks a quantised layer (comfy/ops.py `_load_quantized_module`, comfy/utils.py `convert_old_quants`):
    * a `<layer>.comfy_quant` uint8 tensor holding JSON `{"format": ..., ...}`, or
    * a `_quantization_metadata` header entry `{"layers": {"<layer>": {"format": ...}}}`, or
    * the legacy layout: a `scaled_fp8` marker tensor and `<layer>.scale_weight` (+ `scale_input`) per fp8 layer.
Formats and how a weight is rebuilt from the file (definitions in comfy/quant_ops.py and the comfy-kitchen kernels):
    float8_e4m3fn / float8_e5m2  w = q * weight_scale                   (per-tensor float32 scale)
    int8_tensorwise              w = q * weight_scale                   (scalar, or one scale per output row)
        + convrot                w = (q * weight_scale) @ blockdiag(H)^T, H the normalised regular Hadamard of
                                 size convrot_groupsize (kron powers of a 4x4 one; symmetric, H @ H = I)
    nvfp4                        w = e2m1(q) * weight_scale_2 * weight_scale[block of 16]  (two e2m1 per byte, high
                                 nibble first; fp8 e4m3 block scales in cuBLAS' swizzled 128x4 tile layout)
    mxfp8                        w = q * 2^(e8m0 weight_scale[block of 32] - 127)  (same tile layout)
Any layer whose format, dtype or side tensors do not match these rules is refused with a message naming the file,
the layer, the format and what to do: a quantised file is never loaded with a wrong weight.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass

import torch

from krea2_train.errors import ModelLoadError

SIDE_SUFFIXES = ("comfy_quant", "weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale", "scale_weight",
                 "scale_input")
FP8_FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
READABLE = (*FP8_FORMATS, "int8_tensorwise", "nvfp4", "mxfp8")
# Formats ComfyUI knows that are not read here (4-bit weights with their own group scales and codebooks).
NOT_READ = ("convrot_w4a4", "asym_w4a8_int8")
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FIX = ("Use the bf16, fp8_scaled or int8_convrot file of the same model, or convert this one to bf16 with "
       "ComfyUI (ModelSave) first.")


class QuantFormatError(ModelLoadError):
    """A quantised checkpoint the loader cannot read exactly; the message names file, layer, format and fix."""


@functools.lru_cache(maxsize=16)
def _hadamard_on(size: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    return hadamard(size).to(device=device, dtype=dtype)


def hadamard(size: int) -> torch.Tensor:
    """ComfyUI's ConvRot rotation: the regular Hadamard matrix of `size` (a power of 4), the Kronecker power of
    [[1,1,1,-1],[1,1,-1,1],[1,-1,1,1],[-1,1,1,1]], divided by sqrt(size). Orthogonal and symmetric, so it is its
    own inverse."""
    if size < 4 or 4 ** round(math.log(size, 4)) != size:
        raise ValueError(f"ConvRot group size must be a power of 4, got {size}")
    h4 = torch.tensor([[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], dtype=torch.float64)
    h = h4
    while h.shape[0] < size:
        h = torch.kron(h, h4)
    return (h / math.sqrt(size)).float()


def rotate_groups(x: torch.Tensor, groupsize: int, h: torch.Tensor | None = None) -> torch.Tensor:
    """x @ blockdiag(H, H, ...) over the last dimension (H symmetric, so also x @ blockdiag(H)^T)."""
    h = _hadamard_on(groupsize, str(x.device), x.dtype) if h is None else h.to(x.dtype)
    shape = x.shape
    return (x.reshape(*shape[:-1], shape[-1] // groupsize, groupsize) @ h).reshape(shape)


def _from_tiles(blocked: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Undo cuBLAS' block-scale layout (128x4 tiles, each stored as 32 rows of [4 sub-rows x 4 columns]): the scale
    of (r, c) sits in tile (r // 128, c // 4) at offset (r % 32) * 16 + (r % 128 // 32) * 4 + c % 4."""
    tr, tc = -(-rows // 128), -(-cols // 4)
    if blocked.numel() != tr * tc * 512:
        raise ValueError(f"{blocked.numel()} block scales, expected {tr * tc * 512} for {rows}x{cols} blocks")
    t = blocked.reshape(tr, tc, 32, 4, 4)  # tile row, tile col, r % 32, r % 128 // 32, c % 4
    return t.permute(0, 3, 2, 1, 4).reshape(tr * 128, tc * 4)[:rows, :cols]


@dataclass
class QuantWeight:
    """One quantised weight as stored; `dequantize()` rebuilds the float32 weight (for nvfp4/mxfp8 at the stored,
    possibly padded, shape), `one_byte()` gives the (1-byte storage, per-row scale) QuantLinear can run from."""

    file: str
    layer: str
    format: str
    qdata: torch.Tensor
    scale: torch.Tensor | None = None
    block_scale: torch.Tensor | None = None
    groupsize: int = 0
    pre_quant_scale: torch.Tensor | None = None

    def fail(self, why: str):
        raise QuantFormatError(f"{self.file}: layer {self.layer} ({self.format}): {why}. {FIX}")

    @property
    def padded(self) -> bool:
        """True for the block formats, whose stored shape is the real one rounded up to the block (16 / 32)."""
        return self.format in ("nvfp4", "mxfp8")

    def dequantize(self) -> torch.Tensor:
        fmt, q = self.format, self.qdata
        if fmt in FP8_FORMATS:
            w = q.float() * self.scale
        elif fmt == "int8_tensorwise":
            w = q.float() * (self.scale if self.scale.numel() == 1 else self.scale.reshape(-1, 1))
            if self.groupsize:
                w = rotate_groups(w, self.groupsize)
        elif fmt == "nvfp4":
            lut = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES))
            codes = torch.stack([q >> 4, q & 0x0F], dim=-1).reshape(q.shape[0], -1).long()
            vals = lut[codes]
            rows, cols = vals.shape
            bs = _from_tiles(self.block_scale.view(torch.float8_e4m3fn).float(), rows, cols // 16)
            w = (vals.reshape(rows, -1, 16) * (bs * self.scale).unsqueeze(-1)).reshape(rows, cols)
        else:  # mxfp8
            rows, cols = q.shape
            exps = _from_tiles(self.block_scale.view(torch.uint8).to(torch.int32), rows, cols // 32)
            # e8m0: 2^(e - 127); ComfyUI's decoder maps the code 0 to a zero scale
            bs = torch.where(exps == 0, torch.zeros((), dtype=torch.float32), torch.exp2((exps - 127).float()))
            w = (q.float().reshape(rows, -1, 32) * bs.unsqueeze(-1)).reshape(rows, cols)
        if self.pre_quant_scale is not None:  # ComfyUI multiplies the input by it: fold it into the weight columns
            w = w * self.pre_quant_scale.float().reshape(1, -1)
        return w

    def one_byte(self):
        """(storage as 1-byte tensor, per-output-row float32 scale, convrot group size) for QuantLinear, or None when
        the format has no such form (nvfp4, mxfp8, or a pre_quant_scale)."""
        if self.pre_quant_scale is not None or self.format not in ("float8_e4m3fn", "int8_tensorwise"):
            return None
        rows = self.qdata.shape[0]
        scale = self.scale.float().reshape(-1).expand(rows).contiguous() if self.scale.numel() == 1 \
            else self.scale.float().reshape(-1).contiguous()
        return self.qdata, scale, self.groupsize


class QuantReader:
    """Reads which layers of one safetensors file are quantised and how, and hands out their `QuantWeight`s.

    `names` maps the original (un-prefixed) tensor names to the keys in the file."""

    def __init__(self, path, handle, names: dict[str, str], metadata: dict):
        self.path, self.handle, self.names = str(path), handle, names
        self.layers: dict[str, dict] = {}
        header = metadata.get("_quantization_metadata")
        if header is not None:
            try:
                layers = json.loads(header)["layers"]
            except (ValueError, KeyError, TypeError) as exc:
                raise QuantFormatError(f"{path}: the `_quantization_metadata` header is not ComfyUI's JSON "
                                       f"({exc}). {FIX}") from exc
            by_key = {key: name for name, key in names.items()}
            for layer, conf in layers.items():
                name = by_key.get(f"{layer}.weight", f"{layer}.weight")[: -len(".weight")]
                if f"{name}.weight" not in names:
                    raise QuantFormatError(f"{path}: `_quantization_metadata` lists layer {layer} but the file has "
                                           f"no {layer}.weight. The file is incomplete. {FIX}")
                self.layers[name] = conf
        for name in names:
            if name.endswith(".comfy_quant"):
                layer = name[: -len(".comfy_quant")]
                raw = handle.get_tensor(names[name])
                try:
                    self.layers[layer] = json.loads(bytes(raw.to(torch.uint8).tolist()).decode("utf-8"))
                except (ValueError, UnicodeDecodeError) as exc:
                    raise QuantFormatError(f"{path}: {name} is not ComfyUI's JSON marker ({exc}). {FIX}") from exc
        self.legacy = "scaled_fp8" in names
        if self.legacy:  # convert_old_quants: every layer with scale_weight is float8_e4m3fn
            for name in names:
                if name.endswith(".scale_weight"):
                    self.layers.setdefault(name[: -len(".scale_weight")], {"format": "float8_e4m3fn"})
        self.scaled = bool(self.layers) or any(n.endswith((".weight_scale", ".scale_weight")) for n in names)
        self._check_side_tensors()

    def _check_side_tensors(self):
        for name in self.names:
            for suffix in SIDE_SUFFIXES:
                if name.endswith("." + suffix):
                    layer = name[: -len(suffix) - 1]
                    if f"{layer}.weight" not in self.names:
                        raise QuantFormatError(f"{self.path}: {name} belongs to no weight (no {layer}.weight); the "
                                               f"file is incomplete or not a ComfyUI checkpoint. {FIX}")
                    break

    @staticmethod
    def is_side(name: str) -> bool:
        return name == "scaled_fp8" or name.endswith(tuple("." + s for s in SIDE_SUFFIXES))

    def _side(self, layer: str, suffix: str):
        key = self.names.get(f"{layer}.{suffix}")
        return None if key is None else self.handle.get_tensor(key)

    def weight(self, name: str) -> QuantWeight | None:
        """The `QuantWeight` of tensor `name` (e.g. `blocks.0.attn.wq.weight`), or None for a plain tensor; raises
        `QuantFormatError` for anything that cannot be read exactly."""
        if not name.endswith(".weight"):
            return None
        layer = name[: -len(".weight")]
        conf = self.layers.get(layer)
        qdata = self.handle.get_tensor(self.names[name])
        if conf is None:
            return self._unmarked(layer, qdata)
        fmt = conf.get("format") if isinstance(conf, dict) else None
        q = QuantWeight(self.path, layer, str(fmt), qdata)
        if fmt in NOT_READ:
            q.fail("this 4-bit ComfyUI format is not supported for training or previews")
        if fmt not in READABLE:
            q.fail(f"unknown quantisation format {fmt!r} (readable: {', '.join(READABLE)})")
        scale = self._side(layer, "weight_scale")
        if scale is None and self.legacy:
            scale = self._side(layer, "scale_weight")
        if fmt in FP8_FORMATS:
            self._dtype(q, FP8_FORMATS[fmt])
            q.scale = self._scalar(q, scale, "weight_scale")
        elif fmt == "int8_tensorwise":
            self._dtype(q, torch.int8)
            if scale is None:
                q.fail("the weight_scale is missing; int8 values without it are not the weights")
            if scale.numel() not in (1, qdata.shape[0]) or (scale.numel() > 1 and scale.ndim == 2
                                                             and scale.shape[1] != 1):
                q.fail(f"weight_scale has shape {tuple(scale.shape)}; expected a scalar or one per output row "
                       f"({qdata.shape[0]})")
            q.scale = scale.float()
            params = conf.get("params") if isinstance(conf.get("params"), dict) else {}
            if conf.get("convrot", params.get("convrot", False)):
                q.groupsize = int(conf.get("convrot_groupsize", params.get("convrot_groupsize", 256)))
                try:
                    hadamard(q.groupsize)
                except ValueError:
                    q.fail(f"convrot_groupsize {q.groupsize} is not a power of 4")
                if qdata.shape[1] % q.groupsize:
                    q.fail(f"convrot_groupsize {q.groupsize} does not divide the {qdata.shape[1]} input features")
        elif fmt == "nvfp4":
            self._dtype(q, torch.uint8)
            if (qdata.shape[1] * 2) % 16:
                q.fail(f"{qdata.shape[1] * 2} input features are not a multiple of the 16-wide blocks")
            q.scale = self._scalar(q, self._side(layer, "weight_scale_2"), "weight_scale_2")
            q.block_scale = self._blocks(q, scale, qdata.shape[0], qdata.shape[1] * 2 // 16, torch.float8_e4m3fn)
            pqs = self._side(layer, "pre_quant_scale")
            if pqs is not None:
                if pqs.numel() != qdata.shape[1] * 2:
                    q.fail(f"pre_quant_scale has {pqs.numel()} values for {qdata.shape[1] * 2} input features")
                q.pre_quant_scale = pqs
        else:  # mxfp8
            self._dtype(q, torch.float8_e4m3fn)
            if qdata.shape[1] % 32:
                q.fail(f"{qdata.shape[1]} input features are not a multiple of the 32-wide blocks")
            e8m0 = getattr(torch, "float8_e8m0fnu", torch.uint8)
            q.block_scale = self._blocks(q, scale, qdata.shape[0], qdata.shape[1] // 32, e8m0)
        return q

    def _unmarked(self, layer, qdata):
        """A weight with no format marker: plain float, or an fp8 cast (ComfyUI reads it as the weight), or an fp8
        weight with a per-tensor `weight_scale`/`scale_weight` next to it (the older "fp8 scaled" files)."""
        if qdata.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            return None
        q = QuantWeight(self.path, layer, f"unmarked {str(qdata.dtype).replace('torch.', '')}", qdata)
        if qdata.dtype not in FP8_FORMATS.values():
            q.fail("integer weights with no ComfyUI format marker (`comfy_quant` or `_quantization_metadata`) "
                   "cannot be read: their scale and rotation are unknown")
        scale = self._side(layer, "weight_scale")
        scale = self._side(layer, "scale_weight") if scale is None else scale
        if scale is None and self.scaled:
            q.fail("an fp8 weight without a scale in a scaled file: the scale is missing, so the values are not "
                   "the weights")
        q.format = "float8_e4m3fn" if qdata.dtype == torch.float8_e4m3fn else "float8_e5m2"
        q.scale = torch.ones(()) if scale is None else self._scalar(q, scale, "weight_scale")
        return q

    @staticmethod
    def _dtype(q: QuantWeight, want: torch.dtype):
        if q.qdata.dtype != want:
            q.fail(f"the weight is stored as {q.qdata.dtype}, the format stores {want}")

    @staticmethod
    def _scalar(q: QuantWeight, t, what: str) -> torch.Tensor:
        if t is None:
            q.fail(f"the {what} is missing; the stored values are not the weights without it")
        if t.numel() != 1:
            q.fail(f"{what} has shape {tuple(t.shape)}; the format has one per-tensor scale")
        return t.float().reshape(())

    @staticmethod
    def _blocks(q: QuantWeight, t, rows: int, cols: int, dtype) -> torch.Tensor:
        if t is None:
            q.fail("the block scales (weight_scale) are missing")
        want = -(-rows // 128) * 128 * -(-cols // 4) * 4
        if t.numel() != want or t.element_size() != 1:
            q.fail(f"weight_scale has {t.numel()} {t.dtype} values; expected {want} one-byte block scales "
                   f"({rows}x{cols} blocks in 128x4 tiles)")
        return t.view(dtype) if t.dtype != dtype else t
