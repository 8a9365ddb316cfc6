"""DoRA and LoKr adapters trained with PEFT, the weights PEFT applies with them, and their ComfyUI layouts.

PEFT (the reference: what training optimised), per adapted Linear with base weight W (out, in):

    DoRA  W' = m / ||W + dW||_row * (W + dW),  dW = scale * B @ A,  m (out,) = `lora_magnitude_vector`
          (peft.tuners.lora.dora: the norm is over each output row of the adapted weight, recomputed on any base)
    LoKr  W' = W + alpha / r * kron(w1, w2),  w1 (out_l, in_m) = lokr_w1 or lokr_w1_a @ lokr_w1_b,
          w2 (out_k, in_n) = lokr_w2 or lokr_w2_a @ lokr_w2_b  (peft.tuners.lokr.layer.get_delta_weight)

ComfyUI (comfy/weight_adapter/{lora,lokr,base}.py; re-stated in lora/consumers.py) reads the LyCORIS keys:

    DoRA  <base>.lora_down/lora_up.weight + .alpha + .dora_scale; weight_decompose with a dora_scale of shape
          (out, 1) normalises by the row norms of the *base* weight W, not of W + dW:
          W_c = (W + dW) * dora_scale / (||W||_row + eps), and at strength s: W + s * (W_c - W).
          So the file's dora_scale = m * (||W||_row + eps) / ||W + dW||_row is exact on the base W it is computed
          with (we use Turbo, the deploy target) and off by ||W||/||W + dW|| ratios on another base.
    LoKr  <base>.lokr_w1 | lokr_w1_a + lokr_w1_b, lokr_w2 | lokr_w2_a + lokr_w2_b, .alpha; scale = alpha / dim with
          dim the rank of the decomposed factor (w2's when both are), and scale 1 when both factors are full
          matrices (alpha ignored): then the scale is baked into w1 and no `.alpha` is written.

diffusers' Krea 2 loader drops `dora_scale` keys with a warning and fails on `lokr_*` keys, so the ComfyUI files
are valid for ComfyUI only. It does read PEFT's own DoRA layout (`transformer.<module>.lora_A/lora_B.weight` +
`.lora_magnitude_vector`, header use_dora=True), exact on any base: the diffusers DoRA file is that, with the scale
baked (alpha = rank), plus `transformer.<module>.dora_scale` for ComfyUI, which maps those names for Krea 2, applies
lora_B @ lora_A with that dora_scale (exact on Turbo) and logs the magnitude vectors as "lora key not loaded"
(harmless). LoKr has no diffusers layout. export.json says per file which consumers it is valid for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from krea2_train.config.choices import DORA_FORMATS, LYCORIS_FORMATS
from krea2_train.lora.formats import LoraFormatError, TrainedAdapter, _module_sort_key

DORA, LOKR = "dora", "lokr"
# LYCORIS_FORMATS (config/choices.py): the layouts a DoRA/LoKr adapter is written in exactly; see `refuse_format`.
_WHY_NOT = {
    "diffusers": "diffusers' Krea 2 loader (Krea2LoraLoaderMixin) cannot read LoKr (`lokr_*`) keys",
    "original": "the `original` layout (diffusion_model. + lora_A/lora_B) is read by diffusers, which would drop "
                "DoRA's magnitude and load a plain LoRA (wrong weights), and it has no LoKr keys",
}


def refuse_format(kind: str, fmt: str, source: str = "the adapter") -> None:
    """Raise LoraFormatError when a {kind} adapter cannot be written exactly as `fmt`."""
    ok = DORA_FORMATS if kind == DORA else LYCORIS_FORMATS
    if fmt not in ok:
        why = _WHY_NOT.get(fmt, "it is not a layout ComfyUI applies {kind} from").format(kind=kind.upper())
        raise LoraFormatError(f"{source} is a {kind.upper()} adapter and cannot be exported as {fmt}: {why}. Use "
                              f"formats {', '.join(ok)}, or train lora.type: lora.")


def _row_norm(w: torch.Tensor) -> torch.Tensor:
    """(out, 1) Euclidean norms of the rows of a (out, in) weight."""
    return w.reshape(w.shape[0], -1).norm(dim=1, keepdim=True)


# --------------------------------------------------------------------------------------------------- DoRA
@dataclass
class DoraAdapter:
    """A PEFT DoRA: `lora` is the low-rank part (dW = lora.delta(m)), `magnitude[m]` is m, shape (out,)."""

    lora: TrainedAdapter
    magnitude: dict[str, torch.Tensor]
    info: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)  # the PEFT LoraConfig as a dict (use_dora=True)
    kind: str = DORA

    @property
    def modules(self) -> list[str]:
        return self.lora.modules

    def rank(self, module: str) -> int:
        return self.lora.rank(module)

    def num_parameters(self) -> int:
        return self.lora.num_parameters() + sum(t.numel() for t in self.magnitude.values())

    def kohya_alphas(self) -> dict[str, float]:
        return self.lora.kohya_alphas()

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """Keys as `get_peft_model_state_dict` gives them (what `set_peft_model_state_dict` takes)."""
        return {**self.lora.peft_state_dict(), **{f"{m}.lora_magnitude_vector": t for m, t in self.magnitude.items()}}

    def merged(self, module: str, weight: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
        """What PEFT's DoRA makes of base `weight` (out, in) at strength 1: m / ||W + dW||_row * (W + dW)."""
        adapted = weight.to(dtype) + self.lora.delta(module, dtype)
        return self.magnitude[module].to(dtype).reshape(-1, 1) / _row_norm(adapted) * adapted

    def comfyui_dora_scale(self, module: str, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """(out, 1) float32 dora_scale with which ComfyUI's weight_decompose gives `merged(module, weight)` on
        `weight` (eps: the finfo eps of ComfyUI's LoRA compute dtype, added to the base norm there)."""
        w = weight.double()
        adapted = w + self.lora.delta(module, torch.float64)
        scale = self.magnitude[module].double().reshape(-1, 1) * (_row_norm(w) + eps) / _row_norm(adapted)
        return scale.float()

    def to(self, dtype) -> "DoraAdapter":
        """Factors in `dtype` (the file's); the magnitude stays float32 (dora_scale is written in float32)."""
        return DoraAdapter(self.lora.to(dtype), dict(self.magnitude), dict(self.info), dict(self.config))

    @classmethod
    def from_peft(cls, state: dict, config: dict, info: dict | None = None) -> "DoraAdapter":
        """From a PEFT DoRA state dict (`<module>.lora_A.weight`, `.lora_B.weight`, `.lora_magnitude_vector`)."""
        mags = {k[: -len(".lora_magnitude_vector")]: v.detach() for k, v in state.items()
                if k.endswith(".lora_magnitude_vector")}
        rest = {k: v for k, v in state.items() if not k.endswith(".lora_magnitude_vector")}
        lora = TrainedAdapter.from_peft(rest, {**config, "use_dora": False}, info=info)
        if sorted(mags) != sorted(lora.down):
            raise LoraFormatError(f"DoRA state: magnitude vectors for {sorted(set(mags) ^ set(lora.down))[:3]} do "
                                  "not pair with lora_A/lora_B; the adapter file is incomplete")
        return cls(lora, mags, dict(info or {}), dict(config))


# --------------------------------------------------------------------------------------------------- LoKr
_LOKR_PARTS = ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b")


@dataclass
class LokrAdapter:
    """A PEFT LoKr: `factors[m]` holds w1 or (w1_a, w1_b) and w2 or (w2_a, w2_b); delta = alpha/r kron(w1, w2)."""

    factors: dict[str, dict[str, torch.Tensor]]
    alpha: dict[str, float]
    r: dict[str, int]
    info: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)  # the PEFT LoKrConfig as a dict
    kind: str = LOKR

    @property
    def modules(self) -> list[str]:
        return sorted(self.factors, key=_module_sort_key)

    def rank(self, module: str) -> int:
        return self.r[module]

    def scale(self, module: str) -> float:
        return self.alpha[module] / self.r[module]

    def num_parameters(self) -> int:
        return sum(t.numel() for f in self.factors.values() for t in f.values())

    def kohya_alphas(self) -> dict[str, float]:
        """The `.alpha` as ComfyUI files carry it (comfyui_tensors): alpha when a factor is decomposed, else the
        LyCORIS convention alpha = dim (scale 1, baked)."""
        return {m: self.alpha[m] if ("w1_a" in f or "w2_a" in f) else float(self.r[m])
                for m, f in self.factors.items()}

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{m}.lokr_{part}": t for m, f in self.factors.items() for part, t in f.items()}

    def w(self, module: str, which: str, dtype=torch.float64) -> torch.Tensor:
        f = self.factors[module]
        if which in f:
            return f[which].to(dtype)
        return f[f"{which}_a"].to(dtype) @ f[f"{which}_b"].to(dtype)

    def delta(self, module: str, dtype=torch.float64) -> torch.Tensor:
        """alpha / r * kron(w1, w2), shape (out_l * out_k, in_m * in_n) = the Linear's (out, in)."""
        return torch.kron(self.w(module, "w1", dtype), self.w(module, "w2", dtype)) * self.scale(module)

    def merged(self, module: str, weight: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
        return weight.to(dtype) + self.delta(module, dtype).reshape(weight.shape)

    def to(self, dtype) -> "LokrAdapter":
        return LokrAdapter({m: {k: t.to(dtype) for k, t in f.items()} for m, f in self.factors.items()},
                           dict(self.alpha), dict(self.r), dict(self.info), dict(self.config))

    @classmethod
    def from_peft(cls, state: dict, config: dict, info: dict | None = None) -> "LokrAdapter":
        """From `get_peft_model_state_dict` of a LoKr model (`<module>.lokr_w1`, `.lokr_w2_a`, ...) and its config.
        r and alpha follow PEFT's rank_pattern/alpha_pattern rule (peft.utils.other.get_pattern_key)."""
        from peft.utils.other import get_pattern_key

        factors: dict[str, dict] = {}
        for key, value in state.items():
            module, _, part = key.rpartition(".lokr_")
            if not module or part not in _LOKR_PARTS:
                raise LoraFormatError(f"LoKr state has {key}, which is not a Linear LoKr factor (lokr_t2 and conv "
                                      "LoKr are not used for Krea 2); it cannot be exported")
            factors.setdefault(module, {})[part] = value.detach()
        r, alpha = {}, {}
        rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
        for m, f in factors.items():
            if not (("w1" in f) ^ ("w1_a" in f and "w1_b" in f)) or not (("w2" in f) ^ ("w2_a" in f and "w2_b" in f)):
                raise LoraFormatError(f"LoKr module {m} has factors {sorted(f)}; expected lokr_w1 or lokr_w1_a/_b and "
                                      "lokr_w2 or lokr_w2_a/_b")
            rk = get_pattern_key(list(rank_pattern), m) if rank_pattern else m
            ak = get_pattern_key(list(alpha_pattern), m) if alpha_pattern else m
            r[m] = int(rank_pattern.get(rk, config.get("r", 8)))
            alpha[m] = float(alpha_pattern.get(ak, config.get("alpha", r[m])))
            for part in ("w1_b", "w2_b"):  # the decomposed factors carry the rank PEFT scales by
                if part in f and f[part].shape[0] != r[m]:
                    raise LoraFormatError(f"LoKr module {m}: lokr_{part} has rank {f[part].shape[0]} but the config "
                                          f"says r = {r[m]}; the adapter config does not match its weights")
        return cls(factors, alpha, r, dict(info or {}), dict(config))


# --------------------------------------------------------------------------------------------------- reading PEFT
def from_model(transformer, adapter_name: str = "default", info: dict | None = None):
    """The DoRA/LoKr adapter a transformer carries (PEFT-injected), or None for a plain LoRA."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    config = _config_dict(transformer.peft_config[adapter_name])
    kind = peft_kind(state, config)
    cls = {DORA: DoraAdapter, LOKR: LokrAdapter}.get(kind)
    return cls.from_peft(state, config, info=info) if cls else None


def _config_dict(config) -> dict:
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in d.items()}


def peft_kind(state: dict, config: dict | None = None) -> str | None:
    """"dora" / "lokr" for a PEFT adapter state dict of that kind, None for a plain LoRA (or anything else)."""
    if any(k.endswith(".lora_magnitude_vector") for k in state):
        return DORA
    if any(".lokr_" in k for k in state) or (config or {}).get("peft_type") == "LOKR":
        return LOKR
    return None


def read_peft_adapter(source) -> DoraAdapter | LokrAdapter | None:
    """The DoRA/LoKr adapter in a PEFT folder (adapter_model.safetensors + adapter_config.json, as the trainer
    saves RUN/adapter), or None when `source` is not such a folder or holds a plain LoRA."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(source).expanduser()
    folder = path if path.is_dir() else path.parent
    if path.is_dir() and not (path / "adapter_model.safetensors").exists() and (path / "adapter").is_dir():
        folder = path / "adapter"
    weights, cfg_path = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    if (path.is_file() and path.name != weights.name) or not weights.exists() or not cfg_path.exists():
        return None
    state = load_file(str(weights))
    config = json.loads(cfg_path.read_text())
    kind = peft_kind(state, config)
    if kind == DORA:
        return DoraAdapter.from_peft(state, config)
    if kind == LOKR:
        return LokrAdapter.from_peft(state, config)
    return None


# --------------------------------------------------------------------------------------------------- writing
def comfyui_tensors(adapter: DoraAdapter | LokrAdapter, key_base, base_weights: dict | None = None,
                    eps: float = torch.finfo(torch.float32).eps) -> dict[str, torch.Tensor]:
    """The LyCORIS tensors ComfyUI applies, keyed `key_base(module) + ".lokr_w1"` etc.

    DoRA needs `base_weights` {module: W (out, in)} of the checkpoint the file is for (dora_scale, module doc)."""
    out = {}
    if isinstance(adapter, DoraAdapter):
        if base_weights is None:
            raise LoraFormatError("a DoRA file for ComfyUI needs the base weights it will patch (ComfyUI normalises "
                                  "by the base weight's norm): pass the Turbo checkpoint (--turbo / model.turbo)")
        alphas = adapter.lora.kohya_alphas()
        for m in adapter.modules:
            b = key_base(m)
            out[f"{b}.lora_down.weight"] = adapter.lora.down[m].contiguous()
            out[f"{b}.lora_up.weight"] = adapter.lora.up[m].contiguous()
            out[f"{b}.alpha"] = torch.tensor(alphas[m], dtype=torch.float32)
            out[f"{b}.dora_scale"] = adapter.comfyui_dora_scale(m, base_weights[m], eps).contiguous()
        return out
    for m in adapter.modules:
        b, f = key_base(m), adapter.factors[m]
        decomposed = "w1_a" in f or "w2_a" in f
        dim = f["w2_b"].shape[0] if "w2_b" in f else f["w1_b"].shape[0] if "w1_b" in f else None
        if decomposed and dim == adapter.rank(m):  # ComfyUI's alpha / dim is PEFT's alpha / r
            for part, t in f.items():
                out[f"{b}.lokr_{part}"] = t.contiguous()
            out[f"{b}.alpha"] = torch.tensor(adapter.alpha[m], dtype=torch.float32)
        else:  # both factors full: ComfyUI applies scale 1, so bake the scale into w1 (no .alpha)
            dt = next(iter(f.values())).dtype
            out[f"{b}.lokr_w1"] = (adapter.w(m, "w1", torch.float32) * adapter.scale(m)).to(dt).contiguous()
            out[f"{b}.lokr_w2"] = adapter.w(m, "w2", torch.float32).to(dt).contiguous()
    return out


def summary(adapter: DoraAdapter | LokrAdapter) -> dict:
    """export.json's description of the adapter."""
    ranks = sorted({adapter.rank(m) for m in adapter.modules})
    scales = (sorted({round(adapter.lora.scale(m), 6) for m in adapter.modules}) if isinstance(adapter, DoraAdapter)
              else sorted({round(adapter.scale(m), 6) for m in adapter.modules}))
    return {"adapter": adapter.kind, "modules": len(adapter.modules), "ranks": ranks, "scales": scales,
            "parameters": adapter.num_parameters()}



# --------------------------------------------------------------------------------------------------- reading files
def comfyui_file_kind(path) -> str | None:
    """"dora" / "lokr" for a safetensors file with ComfyUI's DoRA (`.dora_scale`) or LoKr (`.lokr_*`) keys."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
    except Exception:  # noqa: BLE001 - not a readable safetensors file: the plain reader says why
        return None
    if any(".lokr_" in k for k in keys):
        return LOKR
    if any(k.endswith(".dora_scale") for k in keys):
        return DORA
    return None


def comfyui_shapes(state: dict) -> tuple[dict, dict]:
    """({diffusers module: (out, in)}, {module: rank}) of a ComfyUI-layout DoRA/LoKr state dict (full-rank LoKr
    factors count as rank 0)."""
    from krea2_train.lora.consumers import _ADAPTER_KEYS, _comfyui_module

    shapes, ranks = {}, {}
    for key, value in state.items():
        base, _, leaf = key.rpartition(".")
        if leaf == "weight":
            base, _, leaf = base.rpartition(".")
        module = _comfyui_module(base)
        if module is None:
            continue
        if leaf.startswith("lokr_w1") or leaf.startswith("lokr_w2"):
            get = lambda p: state.get(f"{base}.{p}")  # noqa: E731
            w1 = get("lokr_w1")
            o1, i1 = w1.shape if w1 is not None else (get("lokr_w1_a").shape[0], get("lokr_w1_b").shape[1])
            w2 = get("lokr_w2")
            o2, i2 = w2.shape if w2 is not None else (get("lokr_w2_a").shape[0], get("lokr_w2_b").shape[1])
            shapes[module] = (o1 * o2, i1 * i2)
            ranks[module] = int(get("lokr_w2_b").shape[0] if get("lokr_w2_b") is not None
                                else get("lokr_w1_b").shape[0] if get("lokr_w1_b") is not None else 0)
        elif any(key.endswith(up) for up, _ in _ADAPTER_KEYS):
            down = next(state[base + d] for u, d in _ADAPTER_KEYS if key.endswith(u))
            shapes[module] = (value.shape[0], down.shape[1])
            ranks[module] = int(down.shape[0])
    return shapes, ranks


def diffusers_dora_state(adapter: DoraAdapter, base_weights: dict, eps: float = torch.finfo(torch.float32).eps
                         ) -> tuple[dict, dict]:
    """(tensors, header) of the diffusers-layout DoRA file (module doc): PEFT's keys under `transformer.`, the
    scale baked (so ComfyUI's scale 1 is right), plus ComfyUI's dora_scale against `base_weights`."""
    import json

    from krea2_train.lora.formats import DIFFUSERS_META_KEY

    baked = adapter.lora.baked().to(adapter.lora.dtype)
    dora = DoraAdapter(baked, adapter.magnitude, adapter.info, adapter.config)
    tensors = {}
    for m in dora.modules:
        tensors[f"transformer.{m}.lora_A.weight"] = baked.down[m].contiguous()
        tensors[f"transformer.{m}.lora_B.weight"] = baked.up[m].contiguous()
        tensors[f"transformer.{m}.lora_magnitude_vector"] = adapter.magnitude[m].float().contiguous()
        tensors[f"transformer.{m}.dora_scale"] = dora.comfyui_dora_scale(m, base_weights[m], eps).contiguous()
    cfg = {**baked.lora_config_dict(), "use_dora": True}
    header = {"format": "pt", DIFFUSERS_META_KEY: json.dumps({f"transformer.{k}": v for k, v in cfg.items()},
                                                             indent=2, sort_keys=True)}
    return tensors, header
