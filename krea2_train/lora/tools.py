"""LoRA tools: inspect, convert, resize (SVD), merge (LoRAs together or into a checkpoint), extract (checkpoint diff).

All work on `TrainedAdapter` (diffusers module names, exact per-module scale), so any readable layout goes in and
any writable layout comes out.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from pathlib import Path

import torch

from krea2_train.errors import UserError
from krea2_train.lora.formats import LoraFile, TrainedAdapter, _num, read_lora_file
from krea2_train.lora.writers import write_lora_file

log = logging.getLogger(__name__)


def _load(src) -> TrainedAdapter:
    if isinstance(src, TrainedAdapter):
        return src
    if isinstance(src, LoraFile):
        return src.adapter
    return read_lora_file(src).adapter


# --------------------------------------------------------------------------------------------------- inspect
def _module_kind(m: str) -> str:
    """`transformer_blocks.3.attn.to_q` -> `transformer_blocks.*.attn.to_q`."""
    return re.sub(r"\.\d+\.", ".*.", m)


def inspect_lora(path) -> dict:
    """Format, rank, alpha, scale, targets, parameter count and header metadata of a LoRA file."""
    from krea2_train.lora.lycoris import comfyui_file_kind
    from krea2_train.lora.turbo import delta_key_count

    kind = comfyui_file_kind(path)
    if kind:
        return _inspect_lycoris(path, kind)
    if delta_key_count(path):
        return _inspect_deltas(path)
    lora = read_lora_file(path)
    a = lora.adapter
    comfy_ok, comfy_line = _comfyui_verdict(lora)
    return {
        "path": str(path),
        "layout": lora.layout,
        "alpha_source": lora.alpha_source,
        **_adapter_fields(a),
        "diffusers_loadable": lora.diffusers_problem is None,
        "diffusers_problem": lora.diffusers_problem,
        "comfyui_exact": comfy_ok,
        "comfyui": comfy_line,
        "warnings": lora.warnings,
        **_provenance(a.info),
        "metadata": _shown_header(lora.header),
    }


def _adapter_fields(a: TrainedAdapter) -> dict:
    return {"use_rslora": a.use_rslora, "modules": len(a.modules),
            "ranks": dict(Counter(a.rank(m) for m in a.modules)),
            "alphas": dict(Counter(_num(a.alpha[m], 6) for m in a.modules)),
            "scales": dict(Counter(round(a.scale(m), 6) for m in a.modules)),
            "targets": dict(sorted(Counter(_module_kind(m) for m in a.modules).items())),
            "parameters": a.num_parameters(), "dtype": str(a.dtype).replace("torch.", "")}


def _shown_header(header: dict) -> dict:
    """The header for display: the thumbnail as its size, long values cut at 300 characters."""
    return {k: f"<image, {len(v)} characters>" if k == "modelspec.thumbnail" else
            (v[:300] + "..." if len(v) > 300 else v) for k, v in header.items()}


def _provenance(info: dict, deltas: bool = False) -> dict:
    """What the file is and where it goes, from the header we write (`krea2_train.info`: extract's source, an edit
    LoRA's reference_method / reference_count, the suggested Turbo strength of the run's transfer report). The
    long info JSON is cut in `metadata`, so these are shown on their own lines."""
    src = info.get("extracted_from") or {}
    out = {"kind": None, "applies_to": None, "references": None, "suggested_turbo_strength": None}
    if is_turbo_lora(info):
        out["kind"] = "Turbo LoRA (Krea 2 Turbo minus Raw, from `krea2-train extract`)" + (
            " with full-weight deltas" if deltas else "")
        out["applies_to"] = "Krea 2 Raw (it turns Raw towards Turbo; not for Turbo itself)"
    elif src:
        out["kind"] = f"extracted LoRA ({src.get('target')} minus {src.get('base')})"
        out["applies_to"] = str(src.get("base"))
    elif deltas:  # Comfy-Org's Turbo LoRA carries no header saying what it was extracted from
        out["kind"] = "LoRA with full-weight deltas (ComfyUI's Turbo LoRA layout; the header does not say what it " \
                      "was extracted from)"
        out["applies_to"] = "the checkpoint it was extracted from (for a Turbo LoRA: Krea 2 Raw)"
    else:
        if info.get("base_model"):  # what a training run's export writes (pipeline.export_settings)
            out["applies_to"] = f"trained on {info['base_model']}; on Turbo at its suggested Turbo strength"
        if info.get("reference_method"):
            out["kind"] = "edit LoRA (trained with reference images)"
            out["references"] = {"count": int(info.get("reference_count") or 1),
                                 "method": str(info["reference_method"])}
        if info.get("turbo_strength") is not None:
            out["suggested_turbo_strength"] = {"value": float(info["turbo_strength"]), "source": "file metadata"}
    return out


def header_provenance(path) -> dict:
    """`_provenance` of a LoRA file read from its header alone (kind, references, suggested Turbo strength), as
    inspect_lora gives it, without reading the tensors: sample asks before it loads the file to apply it."""
    from krea2_train.lora.formats import _header_info
    from krea2_train.lora.turbo import delta_key_count
    from krea2_train.models.loading import open_safetensors

    header = open_safetensors(Path(path))[0].metadata() or {}
    return _provenance(_header_info(header), deltas=bool(delta_key_count(path)))


def _inspect_deltas(path) -> dict:
    """inspect_lora for a LoRA with ComfyUI's full-weight deltas (.diff/.diff_b; a Turbo LoRA from `extract
    --deltas` or Comfy-Org), read as ComfyUI and `sample --turbo-lora` read it (lora.turbo.read_turbo_lora, which
    checks every delta patches a Krea 2 parameter). The plain-LoRA tools still refuse it (lora.formats)."""
    from krea2_train.lora.turbo import delta_key_count, read_turbo_lora
    from krea2_train.models.loading import open_safetensors

    turbo = read_turbo_lora(path)
    header = open_safetensors(Path(path))[0].metadata() or {}
    counts = delta_key_count(path)
    a = turbo.adapter
    fields = _adapter_fields(a) if a is not None else {
        "use_rslora": False, "modules": 0, "ranks": {}, "alphas": {}, "scales": {}, "targets": {}, "parameters": 0,
        "dtype": str(next(iter(turbo.diffs.values())).dtype).replace("torch.", "")}
    fields["parameters"] += sum(d.numel() for d in turbo.diffs.values())
    deltas = f"{counts['.diff']} .diff + {counts['.diff_b']} .diff_b"
    return {
        "path": str(path), "layout": "comfyui + full-weight deltas" if a is not None else "full-weight deltas only",
        "alpha_source": "tensors" if a is not None else "none (no LoRA factors)", **fields,
        "deltas": {"diff": counts[".diff"], "diff_b": counts[".diff_b"]},
        "diffusers_loadable": False,
        "diffusers_problem": "diffusers' Krea 2 loader reads no .diff/.diff_b deltas",
        "comfyui_exact": None,
        "comfyui": f"yes: {fields['modules']} LoRA modules + {deltas} deltas (comfy/lora.py load_lora)",
        "warnings": [],
        **_provenance(a.info if a is not None else {}, deltas=True),
        "metadata": _shown_header(header),
    }


def _inspect_lycoris(path, kind: str) -> dict:
    """inspect_lora for a DoRA/LoKr file in ComfyUI's LyCORIS keys: what ComfyUI loads of it (keys only: DoRA's
    effect depends on the base weights, which `verify`/export check on Turbo)."""
    from krea2_train.lora.consumers import comfyui_patch
    from krea2_train.lora.lycoris import comfyui_shapes
    from krea2_train.models.loading import open_safetensors

    handle, keys = open_safetensors(Path(path))
    state = {k: handle.get_tensor(k) for k in keys}
    header = handle.metadata() or {}
    shapes, ranks = comfyui_shapes(state)
    patch = comfyui_patch(state, {m: torch.zeros(s) for m, s in shapes.items()})
    loads = (f"yes: {len(patch.weights)} modules as {', '.join(sorted(set(patch.kinds.values())))}, every tensor "
             "loads" if patch.weights and not patch.unloaded else
             f"only in part: {len(patch.unloaded)} tensors not loaded (e.g. {patch.unloaded[:2]})")
    if kind == "dora":
        loads += f"; dora_scale computed for {header.get('krea2_train.dora_base', 'an unknown base')}"
    factors = [v for k, v in state.items() if not k.endswith((".alpha", ".dora_scale"))]
    return {
        "path": str(path), "layout": f"comfyui {kind} (LyCORIS keys)", "alpha_source": "tensors",
        "use_rslora": False, "modules": len(shapes), "ranks": dict(Counter(ranks.values())),
        "alphas": dict(Counter(_num(state[k].item(), 6) for k in state if k.endswith(".alpha"))),
        "scales": {}, "targets": dict(sorted(Counter(_module_kind(m) for m in shapes).items())),
        "parameters": sum(v.numel() for k, v in state.items() if not k.endswith(".alpha")),
        "dtype": str(factors[0].dtype).replace("torch.", "") if factors else "?",
        "diffusers_loadable": False,
        "diffusers_problem": f"diffusers' Krea 2 loader cannot apply {kind.upper()} (it drops dora_scale, fails on "
                             "lokr_* and lora_down/lora_up keys)",
        "comfyui_exact": None, "comfyui": loads, "warnings": [],
        "metadata": {k: (v[:300] + "..." if len(v) > 300 else v) for k, v in header.items()
                     if k != "modelspec.thumbnail"},
    }


def _comfyui_verdict(lora):
    """How ComfyUI's loader (keys + .alpha, header ignored) applies the file vs how diffusers/we read it."""
    from krea2_train.lora.consumers import comfyui_verdict
    from krea2_train.models.loading import open_safetensors

    handle, keys = open_safetensors(Path(lora.source))
    return comfyui_verdict({k: handle.get_tensor(k) for k in keys}, lora.adapter)


def format_inspect(info: dict) -> str:
    about = [f"  {info['kind']}" if info.get("kind") else None,
             f"  applies to: {info['applies_to']}" if info.get("applies_to") else None,
             "  deltas: {diff} .diff + {diff_b} .diff_b (full-weight, ComfyUI's layout; diffusers and the plain-LoRA "
             "tools read none)".format(**info["deltas"]) if info.get("deltas") else None]
    if info.get("references"):
        r = info["references"]
        count = "count not in the file" if r["count"] is None else f"{r['count']} image{'s' if r['count'] != 1 else ''}"
        about.append(f"  references: {count}, method {r['method']} (give them to `sample --reference` / ComfyUI's "
                     "ReferenceLatent)")
    if info.get("suggested_turbo_strength"):
        s = info["suggested_turbo_strength"]
        about.append(f"  suggested Turbo strength: {s['value']:g} ({s['source']})")
    lines = [f"{info['path']}", *(line for line in about if line),
             f"  layout: {info['layout']} (alpha from {info['alpha_source']}{', rsLoRA' if info['use_rslora'] else ''})",
             f"  modules: {info['modules']}, parameters: {info['parameters']:,}, dtype {info['dtype']}",
             f"  rank: {_counts(info['ranks'])}; alpha: {_counts(info['alphas'])}; scale: {_counts(info['scales'])}",
             "  loads in diffusers: " + ("yes" if info["diffusers_loadable"] else f"no ({info['diffusers_problem']})"),
             f"  loads in ComfyUI: {info['comfyui']}",
             "  targets:"]
    lines += [f"    {k}: {v}" for k, v in info["targets"].items()]
    if info["metadata"]:
        lines.append("  metadata:")
        lines += [f"    {k}: {v}" for k, v in sorted(info["metadata"].items())]
    lines += [f"  warning: {w}" for w in info["warnings"]]
    return "\n".join(lines)


def _counts(c: dict) -> str:
    return ", ".join(f"{k} (x{v})" if len(c) > 1 else str(k) for k, v in sorted(c.items(), key=lambda kv: -kv[1]))


# --------------------------------------------------------------------------------------------------- convert
def convert_lora(src, dst, fmt: str, dtype=None, comfyui_style: str = "alpha", metadata: dict | None = None,
                 scale: float = 1.0) -> Path:
    """Read any supported layout, write `fmt` (dtype None keeps the file's precision). `scale` bakes a strength in
    (e.g. the transfer report's suggested Turbo strength, for a file that is right on Turbo at 1.0)."""
    lora = read_lora_file(src)
    adapter = lora.adapter if scale == 1.0 else lora.adapter.scaled(scale)
    if scale != 1.0 and adapter.info.get("turbo_strength"):  # the same effect on Turbo now takes 1/scale of it
        adapter.info["turbo_strength"] = round(float(adapter.info["turbo_strength"]) / scale, 4)
    return write_lora_file(adapter, dst, fmt, dtype=dtype or lora.adapter.dtype, metadata=metadata,
                           comfyui_style=comfyui_style)


# --------------------------------------------------------------------------------------------------- resize
def _factor_svd(up: torch.Tensor, down: torch.Tensor, scale: float):
    """SVD of scale * up @ down without forming it: QR of each factor, SVD of the small r x r core."""
    qb, rb = torch.linalg.qr(up.float())
    qa, ra = torch.linalg.qr(down.float().T)
    u, s, vh = torch.linalg.svd(scale * rb @ ra.T)
    return qb @ u, s, vh @ qa.T  # U (out, r), S (r,), Vh (r, in)


def _split(u, s, vh, k, dtype):
    root = s[:k].sqrt()
    return (vh[:k] * root[:, None]).to(dtype).contiguous(), (u[:, :k] * root[None, :]).to(dtype).contiguous()


def resize_lora(src, rank: int | None = None, min_energy: float | None = None) -> tuple[TrainedAdapter, dict]:
    """Lower each module's rank by SVD of its delta. `rank`: the maximum new rank; `min_energy` (0..1): per module,
    the smallest rank keeping that share of the squared singular values (capped by `rank`).

    Returns (adapter with alpha = rank, i.e. scale 1; {module: {"rank": old -> new, "energy": kept share}}).
    """
    if rank is None and min_energy is None:
        raise UserError("resize needs --rank and/or --min-energy")
    if rank is not None and rank < 1:
        raise UserError(f"--rank must be at least 1, got {rank}")
    if min_energy is not None and not 0 < min_energy <= 1:
        raise UserError(f"--min-energy is the share of each module's energy to keep, in (0, 1] (e.g. 0.99), got "
                        f"{min_energy}")
    adapter = _load(src)
    top = max((adapter.rank(m) for m in adapter.modules), default=0)
    if rank is not None and min_energy is None and rank >= top:
        # nothing would change: SVD can only lower a rank, and a silent copy reads as a successful resize
        raise UserError(f"--rank {rank} is not below the rank of {src} ({top}): resize only lowers a LoRA's rank. "
                        f"Pick --rank below {top}, or use --min-energy (e.g. 0.99) to pick each module's rank.")
    down, up, alpha, report = {}, {}, {}, {}
    for m in adapter.modules:
        u, s, vh = _factor_svd(adapter.up[m], adapter.down[m], adapter.scale(m))
        energy = (s**2).cumsum(0) / (s**2).sum().clamp(min=1e-30)
        k = min(adapter.rank(m), s.numel())  # a 12 -> 1 projector has rank <= 1 whatever the LoRA rank
        if min_energy is not None:
            k = min(k, int((energy < min_energy - 1e-7).sum().item()) + 1)
        if rank is not None:
            k = min(k, rank)
        down[m], up[m] = _split(u, s, vh, k, adapter.dtype)
        alpha[m] = float(k)
        report[m] = {"rank": f"{adapter.rank(m)} -> {k}", "energy": round(float(energy[k - 1]), 6)}
    return TrainedAdapter(down, up, alpha, use_rslora=False, info=dict(adapter.info)), report


# --------------------------------------------------------------------------------------------------- merge
def merge_loras(items, rank: int | None = None) -> tuple[TrainedAdapter, dict]:
    """Combine [(lora, weight), ...] into one LoRA whose delta is sum(weight_i * delta_i).

    Without `rank`, factors are concatenated: exact, rank = sum of ranks. With `rank`, the sum is re-factored by
    SVD to at most that rank (report gives the energy kept per module).
    """
    items = [(_load(src), float(w)) for src, w in items]
    if not items:
        raise UserError("merge needs at least one LoRA")
    modules = sorted({m for a, _ in items for m in a.modules})
    down, up, alpha = {}, {}, {}
    dtype = items[0][0].dtype
    for m in modules:
        parts = [(a, w) for a, w in items if m in a.down]
        down[m] = torch.cat([a.down[m].float() for a, _ in parts], 0).to(dtype)
        up[m] = torch.cat([a.up[m].float() * (w * a.scale(m)) for a, w in parts], 1).to(dtype)
        alpha[m] = float(down[m].shape[0])  # scale 1: the scales were folded into up
    merged = TrainedAdapter(down, up, alpha, info={"merged_from": [a.info.get("name", "?") for a, _ in items]})
    if rank is None:
        return merged, {m: {"rank": merged.rank(m), "energy": 1.0} for m in modules}
    return resize_lora(merged, rank=rank)


class _CheckpointReader:
    """Tensor-by-tensor access to an original-layout Krea 2 checkpoint (official, prefixed or ComfyUI fp8 scaled),
    so merging into or extracting from a 12.9B model never holds a float32 copy of it."""

    def __init__(self, path):
        from krea2_train import facts
        from krea2_train.models.loading import open_safetensors, original_names, require_path

        self.path = require_path(path, "transformer checkpoint")
        if self.path.is_dir():
            raise UserError(f"{self.path} is a folder; pass the transformer's single .safetensors file")
        self.handle, keys = open_safetensors(self.path)
        self.names = original_names(keys)
        if self.names is None:
            raise UserError(f"{self.path} is not a Krea 2 transformer (no {facts.KREA2_MARKER}); pass the Raw or "
                            "Turbo checkpoint")
        self.header = self.handle.metadata() or {}

    def tensor_names(self):
        from krea2_train.models.quantized import QuantReader

        return [n for n in self.names if not QuantReader.is_side(n)]

    def get(self, name: str) -> torch.Tensor:
        """The tensor in its stored dtype, except ComfyUI-quantised weights, which come back dequantised (float32)
        exactly as ComfyUI defines them (or are refused: models/quantized.py)."""
        from krea2_train.models.quantized import QuantReader

        if not hasattr(self, "_quant"):
            self._quant = QuantReader(self.path, self.handle, self.names, self.header)
        q = self._quant.weight(name)
        return self.handle.get_tensor(self.names[name]) if q is None else q.dequantize()

    def linear_modules(self) -> dict[str, str]:
        """{diffusers Linear module: original weight name}."""
        from krea2_train.models.keys import original_to_diffusers_module

        out = {}
        for n in self.tensor_names():
            if n.endswith(".weight"):
                m = original_to_diffusers_module(n[: -len(".weight")])
                if m is not None:
                    out[m] = n
        return out


def merge_into_checkpoint(items, checkpoint, out_path, dtype="bfloat16") -> Path:
    """Add sum(weight_i * delta_i) to a transformer checkpoint; write it in the official single-file layout
    (matmuls in `dtype`, norms and modulation tables float32 as the official file stores them)."""
    from krea2_train.models.keys import diffusers_to_original_module
    from krea2_train.models.loading import resolve_dtype
    from krea2_train.utils.io import save_safetensors_atomic

    reader = _CheckpointReader(checkpoint)
    out_dtype = resolve_dtype(dtype)
    adapters = [(_load(src), float(w)) for src, w in items]
    by_weight: dict[str, list] = {}
    for adapter, w in adapters:
        for m in adapter.modules:
            key = f"{diffusers_to_original_module(m)}.weight"
            if key not in reader.names:
                raise UserError(f"{reader.path} has no {key} for LoRA module {m}: the LoRA is for another model")
            by_weight.setdefault(key, []).append((adapter, m, w))
    out = {}
    for name in reader.tensor_names():
        t = reader.get(name)
        for adapter, m, w in by_weight.get(name, []):
            want = (adapter.up[m].shape[0], adapter.down[m].shape[1])
            if tuple(t.shape) != want:
                raise UserError(f"mismatched shapes: {name} is {tuple(t.shape)} in {reader.path}, the LoRA's delta is "
                                f"{want}; the LoRA is for another model size")
            t = t.float() + w * adapter.delta(m)
        matmul = t.ndim == 2 and not name.endswith("modulation.lin")
        out[name] = t.to(out_dtype) if matmul else t.float()
    header = {**reader.header, "krea2_train.merged_loras": ", ".join(a.info.get("name", "?") for a, _ in adapters)}
    return save_safetensors_atomic(out, out_path, metadata=header)


# --------------------------------------------------------------------------------------------------- extract
class _LinearWeights:
    """{diffusers Linear module: float32 weight}, read one module at a time (single file) or from a loaded
    diffusers folder."""

    def __init__(self, path):
        from krea2_train.models.loading import load_transformer, require_path

        p = require_path(path, "transformer checkpoint")
        if p.is_dir():
            model = load_transformer(p, dtype="bfloat16")
            self._mods = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
            self._get = lambda m: self._mods[m].weight.float()
            self.modules = set(self._mods)
        else:
            reader = _CheckpointReader(p)
            names = reader.linear_modules()
            self._get = lambda m: reader.get(names[m]).float()
            self.modules = set(names)

    def __getitem__(self, module: str) -> torch.Tensor:
        return self._get(module)


def _linear_weights(path) -> dict[str, torch.Tensor]:
    """All Linear weights at once (for small models and tests)."""
    w = _LinearWeights(path)
    return {m: w[m] for m in w.modules}


def extraction_info(base, target) -> dict:
    """The header info (`krea2_train.info`) of a LoRA extracted as TARGET - BASE: both files and their variants
    (models.loading.detect_variant: header or file name), so `inspect` names a Turbo LoRA (Turbo - Raw) as one, and
    a usage hint saying it goes on BASE (a Civitai header otherwise says "trained on Raw, use on Turbo")."""
    from krea2_train.models.loading import detect_variant, open_safetensors

    def variant(p):
        p = Path(p).expanduser()
        return detect_variant(p, (open_safetensors(p)[0].metadata() or {}) if p.is_file() else {})

    source = {"base": Path(base).name, "target": Path(target).name, "base_variant": variant(base),
              "target_variant": variant(target)}
    if (source["base_variant"], source["target_variant"]) == ("raw", "turbo"):
        hint = ("Turbo LoRA (Krea 2 Turbo minus Raw): apply it to Krea 2 Raw, not Turbo (e.g. strength 0.6, 12 "
                "steps, CFG 1, euler, shift 1.15).")
        return {"extracted_from": source, "usage_hint": hint, "base_model_name": "Krea 2 Raw"}
    hint = f"Extracted LoRA ({source['target']} minus {source['base']}): apply it to {source['base']}."
    return {"extracted_from": source, "usage_hint": hint, "base_model_name": source["base"]}


def is_turbo_lora(info: dict) -> bool:
    """Whether header info from `extraction_info` says the file is Turbo minus Raw."""
    src = (info or {}).get("extracted_from") or {}
    return (src.get("base_variant"), src.get("target_variant")) == ("raw", "turbo")


def extract_lora(base, target, rank: int, min_energy: float | None = None,
                 niter: int = 4) -> tuple[TrainedAdapter, dict]:
    """A LoRA approximating target - base (e.g. Turbo - Raw: applied to Raw it moves it towards Turbo).

    Each Linear's difference is factored by (randomised, for large layers) SVD to `rank`; the report gives the share
    of the difference's energy (squared Frobenius norm) kept per module.
    """
    if rank < 1:
        raise UserError(f"--rank must be at least 1, got {rank}")
    wa, wb = _LinearWeights(base), _LinearWeights(target)
    missing = sorted(wa.modules ^ wb.modules)
    if missing:
        raise UserError(f"{base} and {target} do not have the same Linear layers (e.g. {missing[:3]}); extract needs "
                        "two checkpoints of the same architecture")
    down, up, alpha, report = {}, {}, {}, {}
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(0)  # svd_lowrank is randomised: make extraction reproducible
    try:
        for m in sorted(wa.modules, key=lambda n: [int(p) if p.isdigit() else p for p in n.split(".")]):
            a_w, b_w = wa[m], wb[m]
            if a_w.shape != b_w.shape:
                raise UserError(f"mismatched shapes at {m}: {tuple(a_w.shape)} vs {tuple(b_w.shape)}; the "
                                "checkpoints are different model sizes")
            diff = b_w - a_w
            del a_w, b_w
            total = float((diff**2).sum())
            if total == 0.0:
                continue  # identical layers: nothing to learn
            k = min(rank, *diff.shape)
            if min(diff.shape) <= 4 * k + 16:
                u, s, vh = torch.linalg.svd(diff, full_matrices=False)
            else:
                u, s, v = torch.svd_lowrank(diff, q=min(k + 10, min(diff.shape)), niter=niter)
                vh = v.T
            energy = (s[:k] ** 2).cumsum(0) / total
            if min_energy is not None:
                k = min(k, int((energy < min_energy - 1e-7).sum().item()) + 1)
            down[m], up[m] = _split(u, s, vh, k, torch.float32)
            alpha[m] = float(k)
            report[m] = {"rank": k, "energy": round(min(float(energy[k - 1]), 1.0), 6)}
    finally:
        torch.random.set_rng_state(gen_state)
    if not down:
        raise UserError(f"{base} and {target} are identical: there is nothing to extract")
    info = {"name": f"extract_{Path(str(target)).stem}_minus_{Path(str(base)).stem}", "extracted_rank": rank}
    return TrainedAdapter(down, up, alpha, info=info), report


DELTA_CHOICES = ("none", "biases", "all")


def extract_deltas(base, target, which: str = "biases") -> dict[str, torch.Tensor]:
    """{original tensor name: float32 target - base} for what a Linear LoRA cannot carry, to be written as ComfyUI's
    full-weight deltas (lora.turbo.write_turbo_lora): `biases` (what ComfyUI's own extractor, comfy_extras/
    nodes_lora_extract.py with bias_diff on, writes as `.diff_b`; its `.diff` for 1-D weights finds none in Krea 2,
    whose norms are `scale` and modulation tables `lin`, which it skips) or `all` (biases, norm scales and modulation
    tables: every tensor that is not a Linear weight; ComfyUI's loader reads these `.diff` too). Unchanged tensors
    are left out."""
    if which not in DELTA_CHOICES:
        raise UserError(f"--deltas must be one of {', '.join(DELTA_CHOICES)}, got {which!r}")
    if which == "none":
        return {}
    ra, rb = _CheckpointReader(base), _CheckpointReader(target)
    linear = set(ra.linear_modules().values())
    names = [n for n in ra.tensor_names() if n not in linear and (which == "all" or n.endswith(".bias"))]
    missing = sorted(set(names) - set(rb.tensor_names()))
    if missing:
        raise UserError(f"{target} lacks {missing[:3]} that {base} has; extract needs two checkpoints of the same "
                        "architecture")
    out = {}
    for n in names:
        a, b = ra.get(n).float(), rb.get(n).float()
        if a.shape != b.shape:
            raise UserError(f"mismatched shapes at {n}: {tuple(a.shape)} vs {tuple(b.shape)}; the checkpoints are "
                            "different model sizes")
        if not torch.equal(a, b):
            out[n] = b - a
    return out


def energy_summary(report: dict) -> str:
    if not report:
        return "no modules"
    e = [v["energy"] for v in report.values()]
    worst = min(report, key=lambda m: report[m]["energy"])
    return (f"{len(e)} modules, energy kept: mean {sum(e) / len(e):.4f}, min {min(e):.4f} at {worst}"
            f"{'' if math.isfinite(min(e)) else ' (non-finite!)'}")
