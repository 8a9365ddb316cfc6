"""Export and verify DoRA and LoKr adapters (lora/lycoris.py) in ComfyUI's layouts, the files they can be shipped in.

    paths = export_lycoris(adapter, out_dir, formats=("comfyui", "civitai"), base_weights=turbo_weights(turbo))
    result = export_and_verify_lycoris(adapter, out_dir, transformer=turbo, formats=...)

The file names are export.export_path's. Each file is valid for ComfyUI only: export.json says so per file
(`written_for`, `not_valid_for` with the reason, and after verification `valid_for`). Verification on Turbo, per
module: the weights ComfyUI's rules (lora/consumers.comfyui_patch) make of Turbo's weights against what PEFT applies
there (lycoris.merged), and Turbo's velocity with those weights against Turbo with the PEFT adapter itself.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch

from krea2_train.errors import UserError
from krea2_train.lora.lycoris import (
    DORA,
    DoraAdapter,
    LokrAdapter,
    comfyui_tensors,
    diffusers_dora_state,
    refuse_format,
    summary,
)

log = logging.getLogger(__name__)

def written_for(fmt: str) -> tuple:
    """The consumers a DoRA/LoKr file in layout `fmt` is written for (module doc of lora/lycoris.py)."""
    return ("diffusers", "comfyui") if fmt == "diffusers" else ("comfyui",)


NOT_VALID_FOR = {
    "diffusers": "diffusers' Krea 2 loader cannot apply {kind} from this layout: it drops dora_scale keys and fails "
                 "on lokr_* and lora_down/lora_up keys (a DoRA's diffusers file is NAME_diffusers/)",
    "krea2-train": "krea2-train's `sample --lora`, inspect/convert/resize/merge read plain LoRA files only; use the "
                   "run's PEFT adapter (RUN/adapter) with krea2-train",
}
DORA_NOTE = ("dora_scale is computed against the Turbo weights this file was verified on (ComfyUI normalises DoRA by "
             "the base weight's norm, PEFT by the adapted weight's): exact on that Turbo; on Raw or another "
             "quantisation of Turbo the magnitude differs by the ratio of row norms (small, not exact)")


def turbo_weights(transformer, modules) -> dict[str, torch.Tensor]:
    """{module: the base Linear weight (out, in)} of `transformer` (unwrapping a PEFT layer left by a deleted
    adapter)."""
    named = dict(transformer.named_modules())
    missing = [m for m in modules if m not in named]
    if missing:
        raise UserError(f"the Turbo transformer has no modules {missing[:3]}: the adapter was trained on another "
                        "model size")
    return {m: getattr(named[m], "base_layer", named[m]).weight.detach() for m in modules}


def _key_base(fmt: str):
    from krea2_train.lora.writers import _original

    if fmt == "musubi":
        return lambda m: "lora_unet_" + _original(m).replace(".", "_")
    return lambda m: f"diffusion_model.{_original(m)}"


def lycoris_state(adapter, fmt: str, dtype="bfloat16", base_weights: dict | None = None,
                  info: dict | None = None, preview_png: bytes | None = None) -> tuple[dict, dict]:
    """(tensors, header) of a DoRA/LoKr `adapter` in layout `fmt` (comfyui, civitai, musubi)."""
    from krea2_train.lora.civitai import add_hashes, civitai_header
    from krea2_train.models.loading import resolve_dtype

    refuse_format(adapter.kind, fmt)
    if fmt == "diffusers":  # bake the scale before rounding to the file's dtype, as write_lora_file does
        adapter = DoraAdapter(adapter.lora.baked(), adapter.magnitude, adapter.info, adapter.config)
    if dtype is not None:
        adapter = adapter.to(resolve_dtype(dtype))
    if fmt == "diffusers":
        if base_weights is None:
            comfyui_tensors(adapter, _key_base("comfyui"), None)  # raises: DoRA needs the base weights
        tensors, header = diffusers_dora_state(adapter, base_weights)
    else:
        tensors, header = comfyui_tensors(adapter, _key_base(fmt), base_weights), {}
    info = {**adapter.info, **(info or {})}
    header |= {"krea2_train.format": fmt, "krea2_train.adapter": adapter.kind, "krea2_train.base_model": "krea-2-raw"}
    if adapter.kind == DORA:
        header["krea2_train.dora_base"] = str(info.get("dora_base") or "turbo")
    if info:
        header["krea2_train.info"] = json.dumps(info, sort_keys=True, default=str)
    if fmt == "civitai":
        header.update(civitai_header(adapter, info, preview_png))
        # LyCORIS files name their algorithm the way kohya-style readers (Civitai, A1111) look for it
        header["ss_network_module"] = "lycoris.kohya"
        header["ss_network_args"] = json.dumps({"algo": "lokr"} if adapter.kind != DORA
                                               else {"algo": "lora", "dora_wd": True, "wd_on_output": True})
        header = add_hashes(tensors, header)
    return tensors, header


def export_lycoris(adapter, out_dir, formats, metadata: dict | None = None, name: str = "krea2_lora",
                   dtype="bfloat16", preview_png: bytes | None = None, base_weights: dict | None = None,
                   workflow_models=None) -> dict[str, Path]:
    """Write `adapter` in each format (+ NAME_workflow.json and export.json); {format: path}. A DoRA needs
    `base_weights` (turbo_weights of the Turbo it is for)."""
    from krea2_train.export.export import _sha256, export_path
    from krea2_train.lora.workflow import ComfyModels, comfyui_lora_name, reference_nodes, workflow_size, write_workflow
    from krea2_train.lora.writers import normalize_format
    from krea2_train.utils.io import save_safetensors_atomic, write_json_atomic

    formats = list(dict.fromkeys(normalize_format(f) for f in formats))
    if not formats:
        raise UserError(f"export needs at least one format ({', '.join(('comfyui', 'civitai', 'musubi'))} for a "
                        f"{adapter.kind.upper()} adapter)")
    for fmt in formats:  # before writing anything
        refuse_format(adapter.kind, fmt)
    if adapter.kind == DORA and base_weights is None:
        raise UserError("a DoRA adapter is exported against the Turbo weights it will patch (ComfyUI normalises "
                        "DoRA by the base weight): pass --turbo TURBO (krea2-train export) or set model.turbo")
    out_dir = Path(out_dir)
    info = {"name": name, **(metadata or {})}
    paths = {}
    for fmt in formats:
        tensors, header = lycoris_state(adapter, fmt, dtype, base_weights, info, preview_png)
        paths[fmt] = save_safetensors_atomic(tensors, export_path(out_dir, name, fmt), metadata=header)
        log.info("exported %s %s: %s", adapter.kind, fmt, paths[fmt])
    lora_name = comfyui_lora_name(paths, out_dir)
    strength = float(info.get("turbo_strength") or 1.0)
    ui, api = write_workflow(out_dir / f"{name}_workflow.json", lora_name, strength=strength,
                             prompt=str(info.get("sample_prompt") or ""), trigger_words=info.get("trigger_words") or (),
                             models=workflow_models, filename_prefix=name, **workflow_size(info),
                             **reference_nodes(info))
    kind = adapter.kind.upper()
    files = {}
    for fmt, p in paths.items():
        not_valid = {c: why.format(kind=kind) for c, why in NOT_VALID_FOR.items() if c not in written_for(fmt)}
        files[fmt] = {"path": str(p.relative_to(out_dir)), "bytes": p.stat().st_size, "sha256": _sha256(p),
                      "written_for": list(written_for(fmt)), "not_valid_for": not_valid}
        if adapter.kind == DORA:
            files[fmt]["note"] = DORA_NOTE
    manifest = {"name": name, **summary(adapter), "dtype": str(dtype), "metadata": info, "files": files,
                "comfyui_workflow": {"ui": ui.name, "api": api.name, "lora_name": lora_name, "strength": strength,
                                     "models": asdict(workflow_models or ComfyModels())}}
    write_json_atomic(out_dir / "export.json", manifest)
    return paths


# --------------------------------------------------------------------------------------------------- verify
@torch.no_grad()
def peft_velocity(transformer, adapter, inputs) -> torch.Tensor:
    """Turbo with the PEFT adapter itself injected (what training's PEFT applies), then removed again."""
    from peft import PeftConfig, set_peft_model_state_dict

    from krea2_train.export.verify import velocity

    cfg = {k: v for k, v in adapter.config.items() if k not in ("base_model_name_or_path", "revision")}
    config = PeftConfig.from_peft_type(**cfg)
    name = "krea2_verify_peft"
    transformer.add_adapter(config, adapter_name=name)
    try:
        result = set_peft_model_state_dict(transformer, adapter.peft_state_dict(), adapter_name=name)
        missing = [k for k in getattr(result, "missing_keys", []) if name in k]
        if getattr(result, "unexpected_keys", None) or missing:
            raise UserError(f"the PEFT adapter does not fit Turbo (unexpected {result.unexpected_keys[:3]}, missing "
                            f"{missing[:3]})")
        transformer.set_adapter(name)
        return velocity(transformer, inputs)
    finally:
        transformer.delete_adapters([name])


@torch.no_grad()
def velocity_with_weights(transformer, weights: dict, inputs) -> torch.Tensor:
    """Turbo's velocity with the given Linear weights swapped in (restored afterwards)."""
    from krea2_train.export.verify import velocity

    named = dict(transformer.named_modules())
    saved = {}
    try:
        for m, w in weights.items():
            linear = getattr(named[m], "base_layer", named[m])
            saved[m] = linear.weight.data
            linear.weight.data = w.to(saved[m].dtype).to(saved[m].device)
        return velocity(transformer, inputs)
    finally:
        for m, w in saved.items():
            getattr(named[m], "base_layer", named[m]).weight.data = w


def diffusers_refusal(path) -> str:
    """How diffusers' Krea 2 loader reacts to the file, measured by calling its `lora_state_dict`."""
    import logging as _logging

    from diffusers.loaders.lora_pipeline import Krea2LoraLoaderMixin

    level = _logging.getLogger("diffusers").level
    _logging.getLogger("diffusers").setLevel(_logging.ERROR)  # its DoRA warning is expected here
    try:
        state = Krea2LoraLoaderMixin.lora_state_dict(str(path))
    except Exception as exc:  # noqa: BLE001 - any refusal is the answer
        return f"not read: diffusers refuses it ({type(exc).__name__}: {str(exc)[:120]})"
    finally:
        _logging.getLogger("diffusers").setLevel(level)
    usable = [k for k in state if k.startswith("transformer.")]
    if not usable:
        return "not read: diffusers finds no `transformer.` LoRA key in it and loads nothing"
    return f"WRONG: diffusers would load {len(usable)} keys of it as a plain LoRA (e.g. {usable[0]})"


def verify_lycoris_file(path, adapter, transformer, *, seed: int = 0, delta_tol: float | None = None,
                        output_tol: float | None = None, references=None, reference_method: str = "index",
                        reference_source: str = ""):
    """Check a DoRA/LoKr file on Turbo per consumer; returns export.verify.VerifyReport (not raising).
    `references` (an edit LoRA): the probe's reference latents, run with `reference_method` (as verify_lora_file)."""
    from safetensors import safe_open

    from krea2_train.export.verify import DELTA_TOL, OUTPUT_TOL, VerifyReport, probe_inputs, velocity
    from krea2_train.lora.consumers import comfyui_patch

    with safe_open(str(path), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    factor_dtype = next(v.dtype for k, v in state.items() if not k.endswith((".alpha", ".dora_scale")))
    compute = transformer.img_in.weight.dtype
    report = VerifyReport(
        path=str(path), layout=f"comfyui {adapter.kind}", modules=len(adapter.modules), strength=1.0,
        delta_tolerance=delta_tol or max(DELTA_TOL.get(factor_dtype, 2e-2), DELTA_TOL.get(compute, 2e-2)),
        output_tolerance=output_tol or max(OUTPUT_TOL.get(compute, 0.25), DELTA_TOL.get(factor_dtype, 2e-2)))
    base = turbo_weights(transformer, adapter.modules)
    patch = comfyui_patch(state, base)
    missing = [m for m in adapter.modules if m not in patch.weights]
    if missing:
        report.problems.append(f"ComfyUI would leave {len(missing)} trained modules unpatched, e.g. {missing[:3]}")
    magnitudes = [k for k in patch.unloaded if k.endswith(".lora_magnitude_vector")]
    if magnitudes:  # the diffusers file's PEFT magnitudes: ComfyUI logs them and uses dora_scale instead
        report.warnings.append(f"ComfyUI logs {len(magnitudes)} lora_magnitude_vector keys as not loaded (diffusers' "
                               "part of the file; ComfyUI applies dora_scale)")
        patch.unloaded = [k for k in patch.unloaded if k not in magnitudes]
    if patch.unloaded:
        report.problems.append(f"ComfyUI would not load {len(patch.unloaded)} tensors, e.g. {patch.unloaded[:3]}")
    want_kind = "dora" if isinstance(adapter, DoraAdapter) else "lokr"
    wrong_kind = [m for m, k in patch.kinds.items() if k != want_kind]
    if wrong_kind:
        report.problems.append(f"ComfyUI applies {patch.kinds[wrong_kind[0]]} at {wrong_kind[0]}, not {want_kind}")
    worst, worst_m = 0.0, ""
    for m in adapter.modules:
        if m not in patch.weights:
            continue
        w = base[m].double()
        want = adapter.merged(m, w) - w
        got = patch.weights[m].double() - w
        err = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
        if err > worst:
            worst, worst_m = err, m
    report.max_delta_error, report.worst_module = worst, worst_m
    if worst > report.delta_tolerance:
        report.problems.append(f"ComfyUI's weight change at {worst_m} differs from PEFT's by {worst:.2e} (relative), "
                               f"above {report.delta_tolerance:.0e}")
    report.comfyui_delta_error = worst
    inputs = probe_inputs(transformer, seed, references=references, reference_method=reference_method)
    if references:
        report.references = (f"{len(references)} reference latent(s)"
                             + (f" from {reference_source}" if reference_source else "")
                             + f", method {reference_method}")
    v_base = velocity(transformer, inputs)
    v_peft = peft_velocity(transformer, adapter, inputs)
    v_comfy = velocity_with_weights(transformer, patch.weights, inputs)
    change = (v_peft - v_base).norm().item()
    report.output_change = (v_comfy - v_base).norm().item() / max(v_base.norm().item(), 1e-12)
    report.output_error = (v_comfy - v_peft).norm().item() / max(change, 1e-12)
    if change > 0 and report.output_error > report.output_tolerance:
        report.problems.append(f"Turbo's output with ComfyUI's weights differs from Turbo + the PEFT adapter by "
                               f"{report.output_error:.2e} of the adapter's effect (tolerance "
                               f"{report.output_tolerance:.0e})")
    report.comfyui = (f"patched {len(patch.weights)} modules as {want_kind}; max weight error {worst:.2e}, output "
                      f"error {report.output_error:.2e}")
    report.consumers["comfyui"] = "valid" if not report.problems else "WRONG: " + report.problems[0]
    if magnitudes:
        _check_dora_with_diffusers(path, adapter, transformer, inputs, v_peft, report)
    else:
        report.diffusers = diffusers_refusal(path)
        report.consumers["diffusers"] = report.diffusers
        if report.diffusers.startswith("WRONG"):
            report.problems.append(f"{Path(path).name}: {report.diffusers}")
    report.consumers["krea2-train"] = "not read: " + NOT_VALID_FOR["krea2-train"]
    return report


def _check_dora_with_diffusers(path, adapter: DoraAdapter, transformer, inputs, v_peft, report) -> None:
    """Load the diffusers DoRA file with `Krea2Pipeline.load_lora_weights` (its dora_scale dropped by diffusers):
    DoRA on, every factor and magnitude as trained, Turbo's output as with the PEFT adapter."""
    import logging as _logging

    from diffusers import FlowMatchEulerDiscreteScheduler, Krea2Pipeline

    from krea2_train.export.verify import velocity

    name = "krea2_verify_diffusers"
    pipe = Krea2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                         transformer=transformer)
    before = len(report.problems)
    level = _logging.getLogger("diffusers").level
    _logging.getLogger("diffusers").setLevel(_logging.ERROR)  # its "dora_scale filtered out" warning is expected
    try:
        pipe.load_lora_weights(str(path), adapter_name=name)
    except Exception as exc:  # noqa: BLE001 - diffusers' own wording
        report.diffusers = f"FAILED to load: {exc}"
        report.problems.append(f"diffusers' Krea2Pipeline.load_lora_weights rejects the file: {exc}")
        report.consumers["diffusers"] = f"WRONG: rejects the file ({exc})"
        return
    finally:
        _logging.getLogger("diffusers").setLevel(level)
    try:
        worst = 0.0
        named = dict(transformer.named_modules())
        if not transformer.peft_config[name].use_dora:
            report.problems.append("diffusers loads the file without DoRA (use_dora false)")
        for m in adapter.modules:
            layer = named[m]
            got = layer.lora_B[name].weight.double() @ layer.lora_A[name].weight.double() * layer.scaling[name]
            want = adapter.lora.delta(m, torch.float64)
            mag = layer.lora_magnitude_vector[name].weight.double()
            worst = max(worst, ((got - want).norm() / want.norm().clamp_min(1e-30)).item(),
                        ((mag - adapter.magnitude[m].double()).norm() / adapter.magnitude[m].double().norm()).item())
        v_diff = velocity(transformer, inputs)
    finally:
        transformer.delete_adapters([name])
    change = (v_peft - velocity(transformer, inputs)).norm().item()
    report.diffusers_delta_error = worst
    report.diffusers_output_error = (v_diff - v_peft).norm().item() / max(change, 1e-12)
    report.diffusers = (f"loaded with DoRA; max factor/magnitude error {worst:.2e}, output error "
                        f"{report.diffusers_output_error:.2e} of the adapter's effect")
    if worst > report.delta_tolerance:
        report.problems.append(f"through diffusers the DoRA factors differ from the trained ones by {worst:.2e}")
    if report.diffusers_output_error > report.output_tolerance:
        report.problems.append(f"through diffusers Turbo's output differs from Turbo + the PEFT adapter by "
                               f"{report.diffusers_output_error:.2e}")
    new = report.problems[before:]
    report.consumers["diffusers"] = "valid" if not new else "WRONG: " + new[0]


def export_and_verify_lycoris(adapter, out_dir, transformer, *, formats, metadata=None, name="krea2_lora",
                              dtype="bfloat16", preview_png=None, workflow_models=None, turbo_path=None,
                              verify_kwargs: dict | None = None) -> dict:
    """export_lycoris against `transformer` (Turbo), verify each file, write verify.json and valid_for.
    `verify_kwargs`: verify_lycoris_file's references / reference_method / reference_source (edit LoRAs)."""
    from krea2_train.export.verify import LoraVerifyError
    from krea2_train.utils.io import write_json_atomic

    metadata = dict(metadata or {})
    if adapter.kind == DORA:
        metadata.setdefault("dora_base", Path(turbo_path).name if turbo_path else "the Turbo used for verify")
    base = turbo_weights(transformer, adapter.modules) if adapter.kind == DORA else None
    paths = export_lycoris(adapter, out_dir, formats, metadata, name, dtype, preview_png, base, workflow_models)
    reports = {fmt: verify_lycoris_file(p, adapter, transformer, **(verify_kwargs or {})) for fmt, p in paths.items()}
    write_json_atomic(Path(out_dir) / "verify.json", {fmt: r.to_dict() for fmt, r in reports.items()})
    manifest_path = Path(out_dir) / "export.json"
    manifest = json.loads(manifest_path.read_text())
    for fmt, r in reports.items():
        manifest["files"][fmt]["valid_for"] = r.valid_for
        manifest["files"][fmt]["not_valid_for"] = {c: v for c, v in r.consumers.items() if v != "valid"}
    write_json_atomic(manifest_path, manifest)
    for r in reports.values():
        log.info("%s", r.summary())
    failed = [r for r in reports.values() if not r.ok]
    if failed:
        raise LoraVerifyError(f"exported {adapter.kind.upper()} failed verification on Turbo:\n"
                              + "\n".join(r.summary() for r in failed))
    return {"paths": paths, "reports": reports, "transfer": None}


def as_lycoris(source) -> DoraAdapter | LokrAdapter | None:
    """`source` as a DoRA/LoKr adapter (an adapter, or a PEFT folder such as RUN/adapter), else None."""
    from krea2_train.lora.formats import LoraFile, TrainedAdapter
    from krea2_train.lora.lycoris import read_peft_adapter

    if isinstance(source, (DoraAdapter, LokrAdapter)):
        return source
    if isinstance(source, (TrainedAdapter, LoraFile)) or source is None:
        return None
    return read_peft_adapter(source)
