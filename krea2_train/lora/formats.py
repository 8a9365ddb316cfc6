"""Krea 2 LoRA file layouts: one in-memory form (`TrainedAdapter`) and readers for every peer layout (the writers
are in lora/writers.py).

Layouts (key = `<prefix><module>.<weight>`):

    diffusers   transformer.<diffusers module>.lora_A/lora_B.weight, scale baked into the weights and the header
                `lora_adapter_metadata` (the PEFT config, keys prefixed `transformer.`) saying alpha = rank; never
                `.alpha` tensors (diffusers' loader fails on them). Baked because ComfyUI loads these keys too and
                ignores the header. Files from other tools may carry alpha != rank in the header (read as such).
    comfyui     diffusion_model.<original module>.lora_down/lora_up.weight + .alpha (scale = alpha / rank), the
                layout of the Comfy-Org Krea 2 LoRAs. With style="baked": lora_A/lora_B with the scale folded into
                the weights and no alpha anywhere -- that file also loads in diffusers.
    civitai     the comfyui layout plus model-spec (`modelspec.*`) and kohya-style (`ss_*`) header metadata.
    original    diffusion_model.<original module>.lora_A/lora_B.weight, scale baked (ai-toolkit / Krea reference).
    musubi      lora_unet_<original module, dots as _>.lora_down/lora_up.weight + .alpha (musubi-tuner, kohya).

Read also: PEFT files (no prefix or `base_model.model.`, with a sibling adapter_config.json), ai-toolkit's
`base_model.model.<original>`, ComfyUI's `transformer.<diffusers>` with lora_down/lora_up, `lora_unet_<diffusers>`.

The effective scale of a module is alpha / r (alpha / sqrt(r) with rsLoRA). Every writer carries it exactly once:
in `.alpha` tensors (comfyui/civitai/musubi) or baked into the weights (diffusers, original, comfyui baked); a
header we write never disagrees with the tensors (lora/consumers.py: how each program reads the scale). q/k/v are never fused.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from krea2_train.config.choices import EXPORT_FORMATS, FORMAT_ALIASES
from krea2_train.errors import UserError
from krea2_train.models.keys import _STANDALONE, diffusers_to_original_module, original_to_diffusers_module

DIFFUSERS_META_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what `load_lora_weights(folder)` looks for
FORMATS, FORMAT_ALIASES = EXPORT_FORMATS, FORMAT_ALIASES  # one list, also what export.formats accepts


class LoraFormatError(UserError, ValueError):
    """A LoRA file cannot be read or written as asked. The message names the file and the fix."""


# --------------------------------------------------------------------------------------------------- adapter
@dataclass
class TrainedAdapter:
    """A Krea 2 LoRA in diffusers module names: delta W = scale * B @ A per module.

    `down[m]` is A (r, in), `up[m]` is B (out, r), `alpha[m]` the LoRA alpha; scale = alpha / r, or alpha / sqrt(r)
    when `use_rslora`. `info` is free-form training information (trigger words, steps, ...) for file headers.
    """

    down: dict[str, torch.Tensor]
    up: dict[str, torch.Tensor]
    alpha: dict[str, float]
    use_rslora: bool = False
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        for m in self.down:
            if m not in self.up or m not in self.alpha:
                raise LoraFormatError(f"adapter module {m} lacks lora_B or alpha")
            if self.down[m].shape[0] != self.up[m].shape[1]:
                raise LoraFormatError(f"adapter module {m}: lora_A has rank {self.down[m].shape[0]} but lora_B "
                                      f"has rank {self.up[m].shape[1]}")

    # ------------------------------------------------------------------ queries
    @property
    def modules(self) -> list[str]:
        return sorted(self.down, key=_module_sort_key)

    def rank(self, module: str) -> int:
        return int(self.down[module].shape[0])

    def scale(self, module: str) -> float:
        r = self.rank(module)
        return float(self.alpha[module]) / (math.sqrt(r) if self.use_rslora else r)

    def delta(self, module: str, dtype=torch.float32) -> torch.Tensor:
        """The weight change this adapter makes to `module` at strength 1, shape (out, in)."""
        return (self.up[module].to(dtype) @ self.down[module].to(dtype)) * self.scale(module)

    def num_parameters(self) -> int:
        return sum(self.down[m].numel() + self.up[m].numel() for m in self.down)

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.down.values())).dtype

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_peft(cls, state_dict: dict, config, info: dict | None = None) -> "TrainedAdapter":
        """From `peft.get_peft_model_state_dict(transformer)` and its `LoraConfig` (or the config as a dict).

        Alphas follow PEFT's own rule: `alpha_pattern` entry matched by `peft.utils.other.get_pattern_key`, else
        `lora_alpha`. Ranks come from the tensor shapes (so `rank_pattern` is honoured automatically).
        """
        from peft.utils.other import get_pattern_key

        cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        down, up = {}, {}
        for key, value in state_dict.items():
            m = _PEFT_KEY.match(_strip(key, ("base_model.model.", "transformer.")))
            if m is None:
                if key.endswith(".lora_B.bias") or "lora_magnitude_vector" in key:
                    raise LoraFormatError(f"PEFT state has {key}: LoRA biases and DoRA cannot be exported to the "
                                          "ComfyUI/Civitai layouts; train with lora_bias=False, use_dora=False")
                raise LoraFormatError(f"PEFT state has an unexpected key {key}")
            module, which = m.group(1), m.group(2)
            (down if which == "A" else up)[module] = value.detach()
        alpha_pattern = cfg.get("alpha_pattern") or {}
        default_alpha = cfg.get("lora_alpha", cfg.get("r"))
        alpha = {}
        for module in down:
            key = get_pattern_key(list(alpha_pattern), module) if alpha_pattern else module
            alpha[module] = float(alpha_pattern.get(key, default_alpha if default_alpha is not None
                                                    else down[module].shape[0]))
        _check_pairs(down, up, "the PEFT state dict")
        return cls(down, up, alpha, use_rslora=bool(cfg.get("use_rslora", False)), info=dict(info or {}))

    @classmethod
    def from_model(cls, transformer, adapter_name: str = "default", info: dict | None = None) -> "TrainedAdapter":
        """From a transformer carrying a PEFT LoRA (diffusers `add_adapter` or peft `inject_adapter_in_model`)."""
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
        config = transformer.peft_config[adapter_name]
        return cls.from_peft(state, config, info=info)

    # ------------------------------------------------------------------ views
    def peft_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Keys `<prefix><module>.lora_A.weight` / `.lora_B.weight` (what PEFT's set_peft_model_state_dict takes)."""
        out = {}
        for m in self.modules:
            out[f"{prefix}{m}.lora_A.weight"] = self.down[m]
            out[f"{prefix}{m}.lora_B.weight"] = self.up[m]
        return out

    def lora_config_dict(self) -> dict:
        """`LoraConfig` kwargs reproducing every module's rank and scale (exact module names, anchored patterns)."""
        from collections import Counter

        ranks = {m: self.rank(m) for m in self.down}
        r = Counter(ranks.values()).most_common(1)[0][0]
        lora_alpha = Counter(self.alpha.values()).most_common(1)[0][0]
        # PEFT matches patterns as regexes against dotted suffixes of module paths; escaped full names match exactly
        # one Krea 2 module (no diffusers module name is a dotted suffix of another), also under a PeftModel prefix.
        rank_pattern = {re.escape(m): v for m, v in ranks.items() if v != r}
        alpha_pattern = {re.escape(m): a for m, a in self.alpha.items() if a != lora_alpha}
        return dict(r=int(r), lora_alpha=_num(lora_alpha), use_rslora=self.use_rslora, target_modules=self.modules,
                    rank_pattern=rank_pattern, alpha_pattern={k: _num(v) for k, v in alpha_pattern.items()},
                    lora_dropout=0.0, bias="none", use_dora=False, lora_bias=False, init_lora_weights=True)

    def baked(self) -> "TrainedAdapter":
        """Same deltas with the scale folded into the weights (sqrt on each factor) and alpha = rank (scale 1)."""
        down, up, alpha = {}, {}, {}
        for m in self.down:
            s = self.scale(m)
            root = math.sqrt(abs(s))
            down[m] = (self.down[m].float() * root).to(self.dtype)
            up[m] = (self.up[m].float() * (root if s >= 0 else -root)).to(self.dtype)
            alpha[m] = float(self.rank(m))
        return TrainedAdapter(down, up, alpha, use_rslora=False, info=dict(self.info))

    def kohya_alphas(self) -> dict[str, float]:
        """Alphas for layouts whose loaders compute scale = alpha / rank (ComfyUI, kohya, musubi)."""
        return {m: self.scale(m) * self.rank(m) for m in self.down}

    def to(self, dtype) -> "TrainedAdapter":
        from krea2_train.models.loading import resolve_dtype

        dtype = resolve_dtype(dtype)
        return TrainedAdapter({m: t.to(dtype) for m, t in self.down.items()},
                              {m: t.to(dtype) for m, t in self.up.items()}, dict(self.alpha), self.use_rslora,
                              dict(self.info))

    def scaled(self, weight: float) -> "TrainedAdapter":
        """The adapter at strength `weight` (folded into lora_B)."""
        return TrainedAdapter(dict(self.down), {m: (t.float() * weight).to(t.dtype) for m, t in self.up.items()},
                              dict(self.alpha), self.use_rslora, dict(self.info))


def _num(v: float, digits: int | None = None):
    """An int when whole (headers read "16", not "16.0"), else the float, rounded to `digits` if given (display)."""
    v = float(v)
    if v.is_integer():
        return int(v)
    return round(v, digits) if digits is not None else v


def _module_sort_key(name: str):
    return [int(p) if p.isdigit() else p for p in name.split(".")]


_PEFT_KEY = re.compile(r"^(.*)\.lora_([AB])(?:\.[A-Za-z0-9_\-]+)?\.weight$")


def _strip(key: str, prefixes) -> str:
    for p in prefixes:
        if key.startswith(p):
            return key[len(p):]
    return key


def _check_pairs(down: dict, up: dict, source: str) -> None:
    only_a = sorted(set(down) - set(up))
    only_b = sorted(set(up) - set(down))
    if only_a or only_b:
        raise LoraFormatError(f"{source} is missing tensors: lora_B/lora_up absent for {only_a[:5]}, lora_A/lora_down "
                              f"absent for {only_b[:5]}. The file is truncated or was not saved completely; "
                              "re-export it from the training run.")
    if not down:
        raise LoraFormatError(f"{source} holds no LoRA weights (no lora_A/lora_B or lora_down/lora_up tensors).")


# --------------------------------------------------------------------------------------------------- reading
_WEIGHT = re.compile(r"^(?P<module>.+?)\.(?:(?P<kind>lora_A|lora_B|lora_down|lora_up)(?:\.[A-Za-z0-9_\-]+)?\.weight"
                     r"|(?P<alpha>alpha))$")
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.", "lora_unet_",
             "lora_transformer_")
_FLAT_DIFF = re.compile(r"^(transformer_blocks|text_fusion_layerwise_blocks|text_fusion_refiner_blocks)_(\d+)_"
                        r"(attn_to_q|attn_to_k|attn_to_v|attn_to_out_0|attn_to_gate|ff_gate|ff_up|ff_down)$")
_FLAT_ORIG = re.compile(r"^(blocks|txtfusion_layerwise_blocks|txtfusion_refiner_blocks)_(\d+)_(attn|mlp)_"
                        r"(wq|wk|wv|wo|gate|up|down)$")
_FLAT_STANDALONE = {**{k.replace(".", "_"): k for k in _STANDALONE}, **{v.replace(".", "_"): v
                                                                      for v in _STANDALONE.values()}}
_UNSUPPORTED = {"dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "hada_": "LoHa (LyCORIS)",
                "lokr_": "LoKr (LyCORIS)", ".diff": "full-weight diff (LyCORIS)", "lora_B.bias": "LoRA bias",
                "lora_mid": "LoCon mid weights"}


def _unflatten(flat: str) -> str | None:
    m = _FLAT_DIFF.match(flat)
    if m:
        group, idx, leaf = m.groups()
        group = group.replace("text_fusion_", "text_fusion.")
        leaf = {"attn_to_out_0": "attn.to_out.0"}.get(leaf, leaf.replace("_", ".", 1))
        return f"{group}.{idx}.{leaf}"
    m = _FLAT_ORIG.match(flat)
    if m:
        group, idx, kind, leaf = m.groups()
        return f"{group.replace('txtfusion_', 'txtfusion.')}.{idx}.{kind}.{leaf}"
    return _FLAT_STANDALONE.get(flat)


def _resolve_module(name: str) -> tuple[str | None, str]:
    """(diffusers module name or None, naming) for a module name with its prefix removed."""
    if diffusers_to_original_module(name) is not None:
        return name, "diffusers"
    mapped = original_to_diffusers_module(name)
    if mapped is not None:
        return mapped, "original"
    if "." not in name:
        flat = _unflatten(name)
        if flat is not None:
            return _resolve_module(flat)
    return None, "unknown"


@dataclass
class LoraFile:
    """A LoRA read from disk (or a dict): the adapter plus what the file looked like."""

    adapter: TrainedAdapter
    layout: str  # diffusers | peft | comfyui | original | ai-toolkit | musubi | mixed
    header: dict  # the safetensors header metadata (strings)
    source: str
    alpha_source: str  # "tensors" | "header" | "adapter_config.json" | "default (alpha = rank)"
    key_styles: set = field(default_factory=set)  # {(prefix, naming, kind)}
    warnings: list = field(default_factory=list)

    @property
    def diffusers_problem(self) -> str | None:
        """Why diffusers' `Krea2Pipeline.load_lora_weights` would reject or misread this file (None: it loads it)."""
        kinds = {k for _, _, k in self.key_styles}
        prefixes = {p for p, _, _ in self.key_styles}
        namings = {n for _, n, _ in self.key_styles}
        if "alpha" in kinds:
            return ("it has `.alpha` tensors, which diffusers' Krea 2 loader rejects; convert it with "
                    "`krea2-train convert FILE OUT --format diffusers` (alpha moves into the header)")
        if kinds & {"lora_down", "lora_up"}:
            return ("it uses lora_down/lora_up names, which diffusers' Krea 2 loader rejects; convert it with "
                    "`krea2-train convert FILE OUT --format diffusers`")
        if prefixes <= {"diffusion_model.", "base_model.model."} and namings == {"original"}:
            return None  # diffusers converts these (`_convert_non_diffusers_krea2_lora_to_diffusers`)
        if prefixes == {"transformer."} and namings == {"diffusers"}:
            return None
        return (f"its keys ({', '.join(sorted(p or '<none>' for p in prefixes))} prefix) are not a layout diffusers "
                "reads; convert it with `krea2-train convert FILE OUT --format diffusers`")


def read_lora_file(path) -> LoraFile:
    """Read any supported Krea 2 LoRA file (see module doc). Raises LoraFormatError naming the file and the fix.

    The inference core loads the result with `lora.adapter.peft_state_dict()` and `lora_config_dict()`.
    """
    from krea2_train.models.loading import ModelLoadError, open_safetensors

    path = Path(path).expanduser()
    if path.is_dir():
        for candidate in (DIFFUSERS_WEIGHT_NAME, "adapter_model.safetensors"):
            if (path / candidate).exists():
                path = path / candidate
                break
        else:
            found = sorted(p.name for p in path.glob("*.safetensors"))
            raise LoraFormatError(f"{path} is a folder without {DIFFUSERS_WEIGHT_NAME} or adapter_model.safetensors"
                                  f" (it has {found[:5]}); point at the LoRA .safetensors file itself.")
    if not path.exists():
        raise LoraFormatError(f"LoRA file not found: {path}")
    try:
        handle, keys = open_safetensors(path)
    except ModelLoadError as exc:
        raise LoraFormatError(str(exc)) from exc
    state = {k: handle.get_tensor(k) for k in keys}
    header = handle.metadata() or {}
    peft_config = None
    sidecar = path.parent / "adapter_config.json"
    if sidecar.exists():
        try:
            peft_config = json.loads(sidecar.read_text())
        except json.JSONDecodeError as exc:
            raise LoraFormatError(f"{sidecar} is not valid JSON ({exc}); fix or delete it") from exc
    return read_lora_state(state, header, source=str(path), peft_config=peft_config)


def read_lora_state(state: dict, header: dict | None = None, source: str = "<state dict>",
                    peft_config: dict | None = None) -> LoraFile:
    """The same as `read_lora_file` for an in-memory state dict and header."""
    header = dict(header or {})
    down, up, alphas = {}, {}, {}
    styles, unknown, foreign, origin = set(), [], [], {}
    for key, value in state.items():
        for marker, what in _UNSUPPORTED.items():
            if marker in key and what.split(" ")[0] in ("DoRA", "LoKr"):
                raise LoraFormatError(
                    f"{source} is a {what} file (tensor {key}). ComfyUI applies it; diffusers does not, and "
                    "krea2-train's plain-LoRA tools (convert, resize, merge, sample --lora, verify) cannot read it "
                    "(`inspect` describes it). To get another format or rank, re-export from the training run: "
                    "`krea2-train export RUN --turbo TURBO --formats comfyui,civitai,musubi`, or train "
                    "lora.type: lora for a plain LoRA.")
            if marker == ".diff":  # a suffix: "model.diffusion_model." prefixes hold ".diff" too
                if not key.endswith((".diff", ".diff_b")):
                    continue
                raise LoraFormatError(
                    f"{source}: tensor {key} is a full-weight delta (.diff/.diff_b, ComfyUI's layout; a Turbo LoRA "
                    "from `krea2-train extract --deltas` or Comfy-Org has them). `preview.turbo` and `sample "
                    "--turbo-lora` apply it as ComfyUI does and `inspect` describes it; the plain-LoRA tools (convert, "
                    "resize, merge, sample --lora, verify) cannot. For a plain LoRA, extract again without --deltas.")
            if marker in key:
                raise LoraFormatError(f"{source}: tensor {key} is a {what} weight; only plain LoRA (lora_A/lora_B or "
                                      "lora_down/lora_up, optional .alpha) is supported. Re-export it as a plain LoRA.")
        m = _WEIGHT.match(key)
        if m is None:
            unknown.append(key)
            continue
        raw_module = m.group("module")
        prefix = next((p for p in _PREFIXES if raw_module.startswith(p)), "")
        module, naming = _resolve_module(raw_module[len(prefix):])
        if module is None:
            foreign.append(key)
            continue
        kind = m.group("kind") or "alpha"
        styles.add((prefix, naming, kind))
        if module in origin and origin[module] != raw_module:
            raise LoraFormatError(f"{source}: module {module} appears twice, as {origin[module]} and {raw_module}; "
                                  "the file mixes two LoRAs. Keep one naming.")
        origin[module] = raw_module
        if kind == "alpha":
            alphas[module] = float(value.float().reshape(-1)[0])
        elif kind in ("lora_A", "lora_down"):
            down[module] = value
        else:
            up[module] = value
    if unknown:
        raise LoraFormatError(f"{source} has tensors that are not LoRA weights: {unknown[:5]}"
                              f"{' ...' if len(unknown) > 5 else ''}. It looks like a full checkpoint or another "
                              "adapter type; pass a LoRA file (or use `merge`/`extract` for checkpoints).")
    if foreign:
        fused = [k for k in foreign if re.search(r"(qkv|to_qkv|wqkv)", k)]
        hint = (" It has fused q/k/v weights, which Krea 2 loaders do not accept; re-export with separate "
                "q, k and v." if fused else " It is probably a LoRA for another model (Flux, Qwen-Image, SDXL ...).")
        raise LoraFormatError(f"{source}: {len(foreign)} tensors do not map to a Krea 2 transformer Linear, e.g. "
                              f"{foreign[:3]}.{hint}")
    _check_pairs(down, up, source)
    for m in down:
        if down[m].ndim != 2 or up[m].ndim != 2:
            raise LoraFormatError(f"{source}: {origin[m]} has a {down[m].ndim}-D lora_A / {up[m].ndim}-D lora_B; "
                                  "Krea 2 LoRAs are 2-D (Linear layers only).")
        if down[m].shape[0] != up[m].shape[1]:
            raise LoraFormatError(f"{source}: mismatched shapes at {origin[m]}: lora_A/down {tuple(down[m].shape)} "
                                  f"vs lora_B/up {tuple(up[m].shape)} (ranks {down[m].shape[0]} != {up[m].shape[1]}); "
                                  "the file is corrupt.")

    use_rslora = False
    warnings = []
    # An adapter_config.json describes a PEFT save (diffusers names, no prefix or `base_model.model.`, lora_A/B). A
    # baked or ComfyUI file that happens to sit in the same folder must not take its alpha from it (scale twice).
    peft_layout = all(p in ("", "base_model.model.") and n == "diffusers" and k in ("lora_A", "lora_B")
                      for p, n, k in styles)
    if peft_config is not None and (not peft_layout or "krea2_train.format" in header):
        peft_config = None
    meta_cfg = _header_peft_config(header, source)
    if alphas:
        missing = sorted(set(down) - set(alphas))
        if missing:
            raise LoraFormatError(f"{source} has .alpha for some modules but not for {missing[:5]}; the file is "
                                  "incomplete. Re-export it.")
        alpha_source = "tensors"
        if meta_cfg:
            warnings.append("file has both .alpha tensors and a lora_adapter_metadata header; the tensors win (as in "
                            "ComfyUI), diffusers would reject the file")
    elif meta_cfg or peft_config:
        cfg = meta_cfg or peft_config
        alpha_source = "header" if meta_cfg else "adapter_config.json"
        tmp = TrainedAdapter.from_peft({f"{m}.lora_A.weight": down[m] for m in down} |
                                       {f"{m}.lora_B.weight": up[m] for m in up}, cfg)
        alphas, use_rslora = tmp.alpha, tmp.use_rslora
    else:
        alpha_source = "default (alpha = rank)"
        alphas = {m: float(down[m].shape[0]) for m in down}
    adapter = TrainedAdapter(down, up, alphas, use_rslora=use_rslora, info=_header_info(header))
    return LoraFile(adapter, _layout_name(styles), header, source, alpha_source, styles, warnings)


def _header_peft_config(header: dict, source: str) -> dict | None:
    raw = header.get(DIFFUSERS_META_KEY)
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise LoraFormatError(f"{source}: header {DIFFUSERS_META_KEY} is not valid JSON ({exc})") from exc
    if any(k.startswith("transformer.") for k in cfg):
        cfg = {k[len("transformer."):]: v for k, v in cfg.items() if k.startswith("transformer.")}
    return cfg or None


def _header_info(header: dict) -> dict:
    raw = header.get("krea2_train.info")
    try:
        return json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return {}


def _layout_name(styles: set) -> str:
    prefixes = {p for p, _, _ in styles}
    namings = {n for _, n, _ in styles}
    kinds = {k for _, _, k in styles} - {"alpha"}
    if len(prefixes) != 1 or len(namings) != 1:
        return "mixed"
    (prefix,), (naming,) = prefixes, namings
    if prefix == "lora_unet_":
        return "musubi"
    if prefix == "transformer." and naming == "diffusers":
        return "diffusers" if kinds <= {"lora_A", "lora_B"} else "comfyui"
    if prefix in ("", "base_model.model.") and naming == "diffusers":
        return "peft"
    if prefix == "base_model.model." and naming == "original":
        return "ai-toolkit"
    if prefix in ("diffusion_model.", "model.diffusion_model.") and naming == "original":
        return "comfyui" if kinds & {"lora_down", "lora_up"} else "original"
    return "mixed"
