"""Write a trained adapter in the formats users load, then verify each file on Turbo (the end of a training run).

    paths = export_lora(adapter, out_dir, formats=("diffusers", "comfyui", "civitai"), metadata={...}, name="my_lora")
    result = export_and_verify(adapter, out_dir, turbo_path, ...)   # raises LoraVerifyError if any file is wrong

File names in `out_dir`:
    civitai   {name}.safetensors                            the file to share (ComfyUI layout + model metadata)
    comfyui   {name}_comfyui.safetensors
    diffusers {name}_diffusers/pytorch_lora_weights.safetensors  (`pipe.load_lora_weights(folder)` finds it)
    original  {name}_original.safetensors;  musubi {name}_musubi.safetensors
    workflow  {name}_workflow.json / _workflow_api.json        ComfyUI's Turbo graph with the LoRA (lora/workflow.py)
    export.json                                             what was written, with sizes and hashes, the programs
                                                            each file is written for and (after verify) valid for
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path

from krea2_train.errors import UserError
from krea2_train.lora.consumers import FORMAT_CONSUMERS
from krea2_train.lora.formats import DIFFUSERS_WEIGHT_NAME, LoraFile, TrainedAdapter, read_lora_file
from krea2_train.lora.writers import normalize_format, write_lora_file

log = logging.getLogger(__name__)

DEFAULT_FORMATS = ("diffusers", "comfyui", "civitai")


def export_path(out_dir, name: str, fmt: str) -> Path:
    out_dir = Path(out_dir)
    fmt = normalize_format(fmt)
    if fmt == "civitai":
        return out_dir / f"{name}.safetensors"
    if fmt == "diffusers":
        return out_dir / f"{name}_diffusers" / DIFFUSERS_WEIGHT_NAME
    return out_dir / f"{name}_{fmt}.safetensors"


def as_adapter(source) -> TrainedAdapter:
    """A TrainedAdapter from an adapter, a LoraFile, a LoRA file of any supported layout, or a run folder."""
    if isinstance(source, TrainedAdapter):
        return source
    if isinstance(source, LoraFile):
        return source.adapter
    return read_lora_file(find_lora_in(source)).adapter


def find_lora_in(path) -> Path:
    """A LoRA file itself, or the newest diffusers-layout adapter saved somewhere under a run folder."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"LoRA or run folder not found: {path}")
    if path.is_file():
        return path
    names = (DIFFUSERS_WEIGHT_NAME, "adapter_model.safetensors")
    for folder in (path, path / "adapter"):  # the trainer's final adapter is RUN/adapter
        for name in names:
            if (folder / name).exists():
                return folder / name
    # Otherwise the newest saved adapter anywhere below (e.g. the last checkpoint of an interrupted run).
    found = sorted((p for n in names for p in path.rglob(n)), key=lambda p: p.stat().st_mtime)
    if not found:
        found = sorted(path.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise UserError(f"{path} holds no LoRA: no {' or '.join(names)} under it and no .safetensors in it. "
                        "Point at the LoRA file or at the training run folder.")
    return found[-1]


def export_lora(adapter, out_dir, formats=DEFAULT_FORMATS, metadata: dict | None = None, name: str = "krea2_lora",
                dtype="bfloat16", comfyui_style: str = "alpha", preview_png: bytes | None = None,
                workflow_models=None) -> dict[str, Path]:
    """Write `adapter` (TrainedAdapter, LoRA file or run folder) in each of `formats`; returns {format: path}.

    `metadata`: training information for the headers (name, trigger_words, resolution, steps, dataset_size,
    datasets, tag_frequency, turbo_strength, sample_prompt, description, author, license, tags). `preview_png`: PNG
    bytes for the Civitai thumbnail. Beside the files, NAME_workflow.json (+ _api.json): ComfyUI's Turbo graph with
    the LoRA at metadata["turbo_strength"] (else 1.0); `workflow_models` (lora/workflow.ComfyModels) names the
    Turbo, text encoder and VAE files in it.
    """
    from krea2_train.export.lycoris import as_lycoris, export_lycoris
    from krea2_train.lora.workflow import ComfyModels, comfyui_lora_name, reference_nodes, workflow_size, write_workflow
    from krea2_train.utils.io import write_json_atomic

    lycoris = as_lycoris(adapter)
    if lycoris is not None:  # DoRA / LoKr: ComfyUI's LyCORIS layouts (export/lycoris.py; a DoRA needs Turbo)
        return export_lycoris(lycoris, out_dir, formats, metadata, name, dtype, preview_png,
                              workflow_models=workflow_models)
    adapter = as_adapter(adapter)
    if not formats:
        raise UserError("export needs at least one format (diffusers, comfyui, civitai, original, musubi)")
    out_dir = Path(out_dir)
    info = {"name": name, **(metadata or {})}
    paths = {}
    for fmt in dict.fromkeys(normalize_format(f) for f in formats):
        path = write_lora_file(adapter, export_path(out_dir, name, fmt), fmt, dtype=dtype, metadata=info,
                               comfyui_style=comfyui_style, preview_png=preview_png)
        paths[fmt] = path
        log.info("exported %s LoRA: %s", fmt, path)
    lora_name = comfyui_lora_name(paths, out_dir)
    strength = float(info.get("turbo_strength") or 1.0)
    ui, api = write_workflow(out_dir / f"{name}_workflow.json", lora_name, strength=strength,
                             prompt=str(info.get("sample_prompt") or ""), trigger_words=info.get("trigger_words") or (),
                             models=workflow_models, filename_prefix=name, **workflow_size(info),
                             **reference_nodes(info))
    ranks = sorted({adapter.rank(m) for m in adapter.modules})
    manifest = {
        "name": name,
        "modules": len(adapter.modules),
        "ranks": ranks,
        "scales": sorted({round(adapter.scale(m), 6) for m in adapter.modules}),
        "use_rslora": adapter.use_rslora,
        "parameters": adapter.num_parameters(),
        "dtype": str(dtype),
        "metadata": info,
        # written_for: the programs each file is laid out for; export_and_verify adds valid_for, as measured.
        "files": {fmt: {"path": str(p.relative_to(out_dir)), "bytes": p.stat().st_size, "sha256": _sha256(p),
                        "written_for": list(FORMAT_CONSUMERS[fmt])}
                  for fmt, p in paths.items()},
        "comfyui_workflow": {"ui": ui.name, "api": api.name, "lora_name": lora_name, "strength": strength,
                             "models": asdict(workflow_models or ComfyModels())},
    }
    write_json_atomic(out_dir / "export.json", manifest)
    return paths


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_and_verify(adapter, out_dir, turbo_path=None, *, formats=DEFAULT_FORMATS, metadata: dict | None = None,
                      name: str = "krea2_lora", dtype="bfloat16", comfyui_style: str = "alpha",
                      preview_png: bytes | None = None, transformer=None, verify_dtype="auto", device=None,
                      raw_path=None, text_encoder=None, vae=None, transfer: bool = False,
                      transfer_kwargs: dict | None = None, workflow_models=None,
                      verify_kwargs: dict | None = None) -> dict:
    """Export, then verify every file on Turbo against the trained adapter (one Turbo load for all files).

    With `transfer=True` (needs `raw_path`; `text_encoder` and `vae` for prompts and the image grid) the Raw -> Turbo
    transfer report runs first, and its suggested Turbo strength and a Turbo sample at that strength go into the
    Civitai header (unless `metadata["turbo_strength"]` / `preview_png` are given).

    A `transformer` passed in is taken to be Turbo as loaded from `turbo_path` (when given). `verify_kwargs`: passed
    to each file's verification (an edit LoRA's `references`, `reference_method`, `reference_source`).

    Returns {"paths": {format: path}, "reports": {format: VerifyReport}, "transfer": report or None}; writes
    verify.json (and transfer_report.json, transfer_grid.png) next to the files. Raises LoraVerifyError (a
    UserError, so the run fails) listing every file that failed.
    """
    from krea2_train.export.lycoris import as_lycoris, export_and_verify_lycoris
    from krea2_train.export.verify import LoraVerifyError, auto_dtype, default_device, verify_lora_file
    from krea2_train.models.loading import load_transformer
    from krea2_train.utils.io import write_json_atomic

    lycoris = as_lycoris(adapter)
    if lycoris is not None and transfer:
        raise UserError(f"the transfer report measures plain LoRA; this is a {lycoris.kind.upper()} adapter: set "
                        "export.transfer_report: false")
    adapter = lycoris if lycoris is not None else as_adapter(adapter)
    metadata = dict(metadata or {})
    if transformer is None:
        if turbo_path is None:
            raise UserError("verification needs the Turbo checkpoint (model.turbo / --turbo)")
        dtype_ = auto_dtype(turbo_path) if verify_dtype == "auto" else verify_dtype
        transformer = load_transformer(turbo_path, dtype=dtype_, device=default_device(device))
    if lycoris is not None:
        return export_and_verify_lycoris(lycoris, out_dir, transformer, formats=formats, metadata=metadata,
                                         name=name, dtype=dtype, preview_png=preview_png,
                                         workflow_models=workflow_models, turbo_path=turbo_path,
                                         verify_kwargs=verify_kwargs)
    transfer_result = None
    if transfer:
        from krea2_train.export.transfer import transfer_report

        if raw_path is None:
            raise UserError("the transfer report needs the Raw checkpoint (model.transformer)")
        dtype_ = str(transformer.img_in.weight.dtype).replace("torch.", "")
        # Raw is measured by swapping the loaded Turbo's base weights to Raw in place and back (turbo_path), so only
        # one 12.9B transformer is ever resident; without turbo_path, Turbo waits on the CPU meanwhile.
        transfer_result = transfer_report(adapter, raw_path, transformer, out_dir, turbo_path=turbo_path,
                                          text_encoder=text_encoder, vae=vae, dtype=dtype_,
                                          device=str(transformer.device), **{"name": name, **(transfer_kwargs or {})})
        metadata.setdefault("turbo_strength", transfer_result["suggested_turbo_strength"])
        preview_png = preview_png or transfer_result.get("_preview_png")
    paths = export_lora(adapter, out_dir, formats, metadata, name, dtype, comfyui_style, preview_png, workflow_models)
    reports = {fmt: verify_lora_file(p, adapter=adapter, transformer=transformer, raise_on_failure=False,
                                     **(verify_kwargs or {})) for fmt, p in paths.items()}
    for fmt, r in reports.items():
        # A file must be exact in every program it is written for (a consumer that refuses it loudly is fine).
        short = [c for c in FORMAT_CONSUMERS[fmt] if c not in r.valid_for]
        if short:
            r.problems.append(f"{fmt} file {paths[fmt].name} is not valid for {', '.join(short)}: "
                              + "; ".join(f"{c}: {r.consumers.get(c, 'not checked')}" for c in short))
    write_json_atomic(Path(out_dir) / "verify.json", {fmt: r.to_dict() for fmt, r in reports.items()})
    manifest_path = Path(out_dir) / "export.json"
    manifest = json.loads(manifest_path.read_text())
    for fmt, r in reports.items():
        manifest["files"][fmt]["valid_for"] = r.valid_for
    write_json_atomic(manifest_path, manifest)
    failed = [r for r in reports.values() if not r.ok]
    for r in reports.values():
        log.info("%s", r.summary())
    if failed:
        raise LoraVerifyError("exported LoRA failed verification on Turbo:\n" + "\n".join(r.summary() for r in failed))
    return {"paths": paths, "reports": reports, "transfer": transfer_result}
