"""Subcommands: export, verify, inspect, convert, resize, merge, extract, transfer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from krea2_train.errors import UserError

_FORMAT_HELP = ("diffusers (Krea2Pipeline.load_lora_weights), comfyui (diffusion_model. lora_down/up + alpha), "
                "civitai (comfyui + model metadata), original (diffusion_model. lora_A/B, scale baked; ai-toolkit), "
                "musubi (lora_unet_ + alpha)")


def _device(arg):
    if arg:
        return arg
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _kv(pairs) -> dict:
    out = {}
    for item in pairs or []:
        if "=" not in item:
            raise UserError(f"--meta expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _print_json(obj):
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


# --------------------------------------------------------------------------------------------------- commands
def default_export_dir(source) -> Path:
    """Where `export` writes without --out: RUN/export for a run folder (RUN, RUN/adapter or a file in RUN/adapter,
    the same folder the training pipeline exports to), else an export/ folder beside the LoRA file."""
    src = Path(source).expanduser()
    folder = src if src.is_dir() else src.parent
    if folder.name == "adapter":
        folder = folder.parent
    return folder / "export"


def _export(args) -> int:
    from krea2_train.export.export import export_and_verify, export_lora

    formats = [f.strip() for item in args.formats for f in item.split(",") if f.strip()]
    metadata = _kv(args.meta)
    if args.trigger:
        metadata["trigger_words"] = args.trigger
    for key in ("resolution", "steps", "dataset_size", "turbo_strength", "description", "author", "license"):
        if getattr(args, key, None) is not None:
            metadata[key] = getattr(args, key)
    run = _run_folder(Path(args.source).expanduser())
    cfg = _run_config(run) if run is not None and "resolution" not in metadata else None
    if cfg is not None:  # a run folder: its largest trained resolution, for the headers and the workflow's size
        metadata["resolution"] = max(st.resolution for st in cfg.train.stages)
    preview = Path(args.preview).read_bytes() if args.preview else None
    src = Path(args.source)
    if src.is_dir():  # a run folder (RUN or RUN/adapter): name the files after the run
        src = src.parent if src.name == "adapter" else src
        name = args.name or src.name
    else:
        name = args.name or ("krea2_lora" if src.stem in ("pytorch_lora_weights", "adapter_model") else src.stem)
    out = Path(args.out) if args.out else default_export_dir(args.source)
    if args.turbo:
        result = export_and_verify(args.source, out, args.turbo, formats=formats, metadata=metadata, name=name,
                                   dtype=args.dtype, comfyui_style=args.comfyui_style, preview_png=preview,
                                   device=_device(args.device), verify_dtype=args.verify_dtype)
        paths = result["paths"]  # export_and_verify has logged each file's verification once
    else:
        paths = export_lora(args.source, out, formats, metadata, name, args.dtype, args.comfyui_style, preview)
    for fmt, p in paths.items():
        print(f"{fmt}: {p}")
    if not args.turbo:  # say so: a file list alone reads as "done and checked"
        print("not verified: these files were not loaded on Turbo. Add --turbo TURBO to check each one, or run "
              "`krea2-train verify FILE --turbo TURBO`.")
    return 0


def _run_folder(path: Path) -> Path | None:
    """RUN for a training run folder given as RUN, RUN/adapter or RUN/export; None for anything else."""
    run = path.parent if path.name in ("adapter", "export") else path
    return run if path.is_dir() and ((run / "adapter").is_dir() or (run / "export").is_dir()) else None


def _run_config(run: Path):
    """The run's resolved config (RUN/config.yaml), or None when it has none or it no longer loads."""
    from krea2_train.config import load_config

    path = run / "config.yaml"
    if not path.exists():
        return None
    try:
        return load_config(path, warn_paths=False)
    except UserError:
        return None


def resolve_lora(arg) -> Path:
    """The LoRA file a command reads: a file as given, or a run folder's exported file (RUN/export/RUN.safetensors,
    else its ComfyUI or diffusers file), else the run's trained adapter. Read once here, so a wrong path or a file
    that is no LoRA fails before any model is loaded (which takes seconds to minutes)."""
    from krea2_train.export.export import find_lora_in
    from krea2_train.lora.formats import read_lora_file

    path = Path(arg).expanduser()
    if not path.exists():
        raise UserError(f"LoRA file or run folder not found: {path}. Give a LoRA .safetensors file or a training run "
                        "folder (runs/NAME).")
    run = _run_folder(path)
    found = None
    if run is not None and path.name != "adapter":  # RUN/adapter given: the trained adapter itself
        export = run / "export"
        for candidate in (export / f"{run.name}.safetensors", export / f"{run.name}_comfyui.safetensors",
                          export / f"{run.name}_diffusers" / "pytorch_lora_weights.safetensors"):
            if candidate.is_file():
                found = candidate
                break
    found = found or find_lora_in(path)
    try:
        read_lora_file(found)
    except UserError:
        raise
    except Exception as exc:  # not a safetensors file at all, a truncated download, ...
        raise UserError(f"{found} is not a readable LoRA file: {exc}") from exc
    if found != path:
        print(f"{arg}: using {found}", file=sys.stderr)  # stderr: `inspect --json` output stays JSON
    return found


def _verify(args) -> int:
    from krea2_train.export.export import as_adapter
    from krea2_train.export.verify import verify_lora_file, write_report

    lora = resolve_lora(args.lora)
    run = _run_folder(Path(args.lora).expanduser())
    against = args.against or (str(run / "adapter") if run is not None and (run / "adapter").is_dir()
                                and lora.parent.name != "adapter" else None)  # a run's file must match its training
    against = as_adapter(against) if against else None
    refs = {}
    cfg = _run_config(run) if run is not None else None
    if cfg is not None and cfg.data.reference:  # an edit run: verified with a held-out pair's references in context
        from krea2_train.pipeline import run_manifest, verify_references

        refs = verify_references(cfg, run_manifest(cfg))
    report = verify_lora_file(lora, args.turbo, adapter=against, dtype=args.dtype, device=_device(args.device),
                              strength=args.strength, check_diffusers=not args.no_diffusers, raise_on_failure=False,
                              **refs)
    print(report.summary())
    if args.json:
        write_report(report, args.json)
    return 0 if report.ok else 1


def run_turbo_strength(arg) -> dict | None:
    """{"value", "source"}: the suggested Turbo strength in the transfer report of the run `arg` is (RUN, RUN/adapter,
    RUN/export or a file in RUN/export), or None. A report older than the run's adapter is not used (the adapter was
    trained again after it: the strength belongs to the old weights) and that is said on stderr."""
    path = Path(arg).expanduser()
    run = _run_folder(path) or (_run_folder(path.parent) if path.is_file() else None)
    report = run / "export" / "transfer_report.json" if run is not None else None
    if report is None or not report.is_file():
        return None
    adapter = run / "adapter" / "adapter_model.safetensors"
    if adapter.exists() and adapter.stat().st_mtime > report.stat().st_mtime:
        print(f"{report} is older than {adapter} (trained again since): its suggested Turbo strength is not used; "
              f"run `krea2-train transfer {run} --out {run / 'export'}` to measure it again", file=sys.stderr)
        return None
    try:
        value = json.loads(report.read_text()).get("suggested_turbo_strength")
    except (OSError, ValueError, AttributeError) as exc:
        raise UserError(f"{report} is not a readable transfer report ({exc}); delete it or run `krea2-train "
                        f"transfer {run} --out {run / 'export'}` again") from exc
    return None if value is None else {"value": float(value), "source": str(report)}


def suggested_strength(arg, header: dict | None) -> dict | None:
    """{"value", "source"[, "other"]}: the suggested Turbo strength for the LoRA `arg`, whose file's header gives
    `header` ({"value", "source"} or None; lora.tools `suggested_turbo_strength`). A file
    given by name is judged by its own header: it belongs to exactly those weights (`convert --scale` rescales it),
    while the run's transfer report describes the run's export, not a copy rescaled or converted since. A run folder
    (or its adapter) is judged by the run's report, the header serving when there is none. Where both exist and
    differ, "other" says what the other one says."""
    report = run_turbo_strength(arg)
    first, second = (header, report) if Path(arg).expanduser().is_file() else (report, header)
    if first is None:
        return second
    if second is not None and abs(second["value"] - first["value"]) > 1e-6:
        say = "the file's metadata" if second is header else second["source"]
        first = {**first, "other": f"{say} says {second['value']:g}"}
    return first


def _run_references(arg) -> dict | None:
    """{"count": None, "method"} of an edit run's config, for a run file whose header does not say (the trained
    adapter): the count is the cache's (pipeline.reference_count), which inspect does not scan the data for."""
    run = _run_folder(Path(arg).expanduser())
    cfg = _run_config(run) if run is not None else None
    if cfg is None or not cfg.data.reference:
        return None
    return {"count": None, "method": cfg.train.reference_method}


def _inspect(args) -> int:
    from krea2_train.lora.lycoris import comfyui_file_kind
    from krea2_train.lora.tools import format_inspect, inspect_lora
    from krea2_train.lora.turbo import delta_key_count
    from krea2_train.models.inspect import format_checkpoint, inspect_checkpoint, is_transformer_checkpoint

    # every path checked before the first is printed; a Raw/Turbo checkpoint: format, precision per group, variant;
    # a DoRA/LoKr file or a LoRA with .diff/.diff_b deltas (a Turbo LoRA) is described too, though the plain-LoRA
    # reader in resolve_lora refuses it
    paths = [(p, p if is_transformer_checkpoint(p) or comfyui_file_kind(p) or delta_key_count(p) else
              resolve_lora(p)) for p in args.lora]
    for arg, path in paths:
        if is_transformer_checkpoint(path):
            info = inspect_checkpoint(path)
            _print_json(info) if args.json else print(format_checkpoint(info))
            continue
        info = inspect_lora(path)
        suggested = suggested_strength(arg, info.get("suggested_turbo_strength"))
        if suggested is not None:
            if suggested.get("other"):
                suggested = {"value": suggested["value"], "source": f"{suggested['source']}; {suggested['other']}"}
            info["suggested_turbo_strength"] = suggested
        if info.get("references") is None and info.get("kind") is None:
            refs = _run_references(arg)
            if refs:
                info.update(kind="edit LoRA (trained with reference images)", references=refs)
        _print_json(info) if args.json else print(format_inspect(info))
    return 0


def _convert(args) -> int:
    from krea2_train.lora.tools import convert_lora

    print(convert_lora(args.source, args.dest, args.format, dtype=args.dtype, comfyui_style=args.comfyui_style,
                       scale=args.scale))
    return 0


def _report_out(adapter, report, args, metadata: dict | None = None) -> int:
    from krea2_train.lora.tools import energy_summary
    from krea2_train.lora.writers import write_lora_file

    path = write_lora_file(adapter, args.dest, args.format, dtype=args.dtype, comfyui_style=args.comfyui_style,
                           metadata=metadata)
    if args.report:
        from krea2_train.utils.io import write_json_atomic

        write_json_atomic(args.report, report)
    if args.verbose:
        for m, r in report.items():
            print(f"  {m}: rank {r['rank']}, energy kept {r['energy']:.4f}")
    print(energy_summary(report))
    print(path)
    return 0


def _resize(args) -> int:
    from krea2_train.lora.tools import resize_lora

    adapter, report = resize_lora(args.source, rank=args.rank, min_energy=args.min_energy)
    return _report_out(adapter, report, args)


def _parse_weighted(items) -> list:
    out = []
    for item in items:
        path, sep, w = item.rpartition(":")
        if sep and path and not Path(item).exists():
            try:
                out.append((path, float(w)))
                continue
            except ValueError:
                pass
        out.append((item, 1.0))
    return out


def _merge(args) -> int:
    from krea2_train.lora.tools import merge_into_checkpoint, merge_loras

    items = _parse_weighted(args.loras)
    if args.into:
        print(merge_into_checkpoint(items, args.into, args.dest, dtype=args.checkpoint_dtype))
        return 0
    adapter, report = merge_loras(items, rank=args.rank)
    return _report_out(adapter, report, args)


# Why each layout other than comfyui cannot carry a Turbo LoRA's .diff/.diff_b deltas (`extract --deltas`).
_NO_DELTAS = {
    "civitai": "civitai is the comfyui layout plus header metadata for Civitai and kohya tools, and the deltas are "
               "written in the comfyui layout only; Civitai and ComfyUI take that file as it is (upload it)",
    "diffusers": "diffusers' Krea 2 loader reads no .diff/.diff_b tensors (it fails on them)",
    "original": "the original layout is read by diffusers, whose Krea 2 loader reads no .diff/.diff_b tensors",
    "musubi": "musubi-tuner and kohya tools read no .diff/.diff_b tensors",
}


def _extract(args) -> int:
    from krea2_train.lora.tools import extract_deltas, extract_lora, extraction_info
    from krea2_train.lora.writers import normalize_format

    which = getattr(args, "deltas", "none") or "none"
    fmt = normalize_format(args.format)  # an unknown format fails before minutes of SVDs
    if which != "none" and fmt != "comfyui":
        raise UserError(f"--deltas {which} cannot be written as --format {args.format}: {_NO_DELTAS[fmt]}. Only "
                        f"--format comfyui carries the .diff/.diff_b deltas (ComfyUI, preview.turbo and sample "
                        f"--turbo-lora read them); use --format comfyui, or --deltas none for a plain {fmt} LoRA")
    info = extraction_info(args.base, args.target)  # in the header: inspect names a Turbo LoRA as one
    deltas = extract_deltas(args.base, args.target, which)  # before the SVDs: a wrong pair fails fast
    adapter, report = extract_lora(args.base, args.target, rank=args.rank, min_energy=args.min_energy)
    if which == "none":
        return _report_out(adapter, report, args, metadata=info)
    from krea2_train.lora.tools import energy_summary
    from krea2_train.lora.turbo import write_turbo_lora

    path = write_turbo_lora(adapter, deltas, args.dest, dtype=args.dtype, comfyui_style=args.comfyui_style,
                            metadata=info)
    if args.report:
        from krea2_train.utils.io import write_json_atomic

        write_json_atomic(args.report, {**report, "deltas": sorted(deltas)})
    print(energy_summary(report))
    print(f"{len(deltas)} full deltas ({which}) as .diff/.diff_b")
    print(path)
    return 0


def _transfer(args) -> int:
    from krea2_train.export.transfer import transfer_report

    lora = resolve_lora(args.lora)  # before 17 s of model loading, not after
    run = _run_folder(Path(args.lora).expanduser())
    cfg = _run_config(run) if run is not None else None
    from krea2_train.models.micro import model_set

    models = model_set(args.models) if args.models else None
    run_model = cfg.model if cfg is not None else None

    def pick(given, attr, key):
        if given:
            return given
        if models is not None:
            return str(getattr(models, attr))
        return getattr(run_model, key, None) if run_model is not None else None

    raw, turbo = pick(args.raw, "transformer_raw", "transformer"), pick(args.turbo, "transformer_turbo", "turbo")
    if not (raw and turbo):
        raise UserError("transfer needs --raw and --turbo (or --models DIR|micro, or a run folder whose config names "
                        "them)")
    # the size the run previews at (the micro/tiny models were trained far below Krea 2's 1024 px)
    size = cfg.preview.resolution if cfg is not None else (128 if models is not None else 1024)
    style = args.style_reference
    if style is None and cfg is not None:
        from krea2_train.evaluate.style import StyleReference

        style = StyleReference.from_datasets(cfg.data.datasets)
    prompts = args.prompt or (list(cfg.preview.prompts) if cfg is not None else None) or None
    edit = {}
    if cfg is not None and cfg.data.reference:  # an edit run: its prompts come with their references
        if args.prompt or args.height or args.width:
            raise UserError(f"{run} is an edit LoRA: the transfer report takes its prompts with their references "
                            "and sizes from the run (preview.prompts + preview.references, else its held-out pairs); "
                            "drop --prompt / --height / --width")
        from krea2_train.pipeline import run_manifest, transfer_references

        manifest = run_manifest(cfg)
        edit = transfer_references(cfg, manifest)
        prompts = edit.pop("prompts", prompts)
        if args.style_reference is None:  # the targets, not the reference inputs beside them
            from krea2_train.pipeline import edit_style_reference

            style = edit_style_reference(manifest)
    height, width = edit.pop("height", args.height or size), edit.pop("width", args.width or size)
    report = transfer_report(lora, raw, turbo, args.out, text_encoder=pick(args.text_encoder, "text_encoder",
                                                                           "text_encoder"),
                             vae=pick(args.vae, "vae", "vae"), prompts=prompts, height=height,
                             width=width, seed=args.seed, dtype=args.dtype, device=_device(args.device),
                             style_reference=style,
                             slider=list(cfg.train.sliders) if cfg is not None and cfg.train.mode == "slider" else None,
                             **edit)
    print(report["reading"])
    print(Path(args.out) / "transfer_report.json")
    return 0


# --------------------------------------------------------------------------------------------------- parser
def _output_args(p, default_format="comfyui", dtype_default="bfloat16"):
    p.add_argument("dest", help="output LoRA file")
    p.add_argument("--format", default=default_format, help=f"output layout (default {default_format}): {_FORMAT_HELP}")
    p.add_argument("--dtype", default=dtype_default,
                   help=f"weight dtype of the written file (default {dtype_default or 'keep the source dtype'})")
    p.add_argument("--comfyui-style", default="alpha", choices=["alpha", "baked"],
                   help="comfyui/civitai: lora_down/up + .alpha (default), or lora_A/B with the scale baked in "
                   "(also loads in diffusers)")
    p.add_argument("--report", help="write the per-module rank/energy report to this JSON file")
    p.add_argument("-v", "--verbose", action="store_true", help="print every module's rank and energy kept")


def register(sub) -> None:
    p = sub.add_parser("export", help="write a LoRA (file or run folder) as diffusers/ComfyUI/Civitai files, "
                       "verified on Turbo with --turbo")
    p.add_argument("source", help="LoRA file in any supported layout, or a training run folder")
    p.add_argument("--out", help="output folder (default: RUN/export for a run folder, else export/ beside the "
                   "LoRA file)")
    p.add_argument("--formats", nargs="+", default=["diffusers", "comfyui", "civitai"], metavar="FORMAT",
                   help="formats to write, space- or comma-separated (default: diffusers comfyui civitai; put it "
                   f"after SOURCE): {_FORMAT_HELP}")
    p.add_argument("--name", help="file name stem (default: the source's)")
    p.add_argument("--turbo", help="Turbo checkpoint: verify every written file on it (fails on any mismatch)")
    p.add_argument("--dtype", default="bfloat16", help="weight dtype of the files (default bfloat16)")
    p.add_argument("--verify-dtype", default="auto", help="dtype Turbo is loaded in for verification (default "
                   "auto: float32 for small test models, bfloat16 for the real one)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--comfyui-style", default="alpha", choices=["alpha", "baked"],
                   help="comfyui/civitai: lora_down/up + .alpha (default), or lora_A/B with the scale baked in")
    p.add_argument("--trigger", action="append", help="trigger word (repeatable), for the Civitai header")
    p.add_argument("--resolution", type=int, help="training resolution in px, for the Civitai header")
    p.add_argument("--steps", type=int, help="training steps, for the Civitai header")
    p.add_argument("--dataset-size", type=int, help="number of training images, for the Civitai header")
    p.add_argument("--turbo-strength", type=float, help="recommended Turbo strength (see `transfer`)")
    p.add_argument("--description", help="free text for the Civitai header")
    p.add_argument("--author", help="author name for the Civitai header")
    p.add_argument("--license", help="license for the Civitai header (e.g. CC-BY-4.0)")
    p.add_argument("--preview", help="PNG for the Civitai thumbnail")
    p.add_argument("--meta", action="append", help="extra KEY=VALUE header metadata (repeatable)")
    p.set_defaults(func=_export)

    p = sub.add_parser("verify", help="load a LoRA onto Turbo and check every tensor lands with the right effect")
    p.add_argument("lora", help="LoRA file in any supported layout, or a training run folder (runs/NAME: its exported file)")
    p.add_argument("--turbo", required=True, help="Krea 2 Turbo checkpoint")
    p.add_argument("--against", help="the trained adapter (a run folder or LoRA file) the file must reproduce; "
                   "default: the file's own contents")
    p.add_argument("--strength", type=float, default=1.0, help="LoRA strength to verify the file at (default 1)")
    p.add_argument("--dtype", default="auto", help="dtype to load Turbo in (default auto: float32 for small test models, "
                   "bfloat16 for the real one; float32 gives the tightest tolerances)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--no-diffusers", action="store_true", help="skip the cross-check through diffusers' loader")
    p.add_argument("--json", help="also write the report as JSON here")
    p.set_defaults(func=_verify)

    p = sub.add_parser("inspect", help="show a LoRA's layout, rank, alpha, targets, parameters and metadata; or a "
                       "transformer checkpoint's format, precision per layer group and Raw/Turbo")
    p.add_argument("lora", nargs="+", help="LoRA files, training run folders (runs/NAME) or transformer checkpoints")
    p.add_argument("--json", action="store_true", help="print JSON instead of the text summary")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("convert", help="convert between LoRA layouts (reads diffusers, PEFT, ComfyUI, ai-toolkit, "
                       "musubi-tuner)")
    p.add_argument("source", help="LoRA file in any supported layout")
    _output_args(p, dtype_default=None)
    p.add_argument("--scale", type=float, default=1.0, help="bake this strength into the file (default 1: none; e.g. "
                   "the suggested Turbo strength from `transfer`)")
    p.set_defaults(func=_convert)

    p = sub.add_parser("resize", help="lower a LoRA's rank by SVD, reporting the energy kept per module")
    p.add_argument("source", help="LoRA file in any supported layout")
    _output_args(p)
    p.add_argument("--rank", type=int, help="maximum new rank (below the file's rank)")
    p.add_argument("--min-energy", type=float, help="per module, the smallest rank keeping this share of the "
                   "energy (0 < E <= 1, e.g. 0.99); capped by --rank")
    p.set_defaults(func=_resize)

    p = sub.add_parser("merge", help="combine LoRAs with weights (LORA[:WEIGHT] ...) into one LoRA, or into a "
                       "checkpoint with --into")
    p.add_argument("loras", nargs="+", help="LoRA files, each optionally suffixed :WEIGHT")
    p.add_argument("--out", dest="dest", required=True, help="output LoRA (or checkpoint with --into)")
    p.add_argument("--format", default="comfyui", help=f"output layout (default comfyui): {_FORMAT_HELP}")
    p.add_argument("--dtype", default="bfloat16", help="weight dtype of the written file (default bfloat16)")
    p.add_argument("--comfyui-style", default="alpha", choices=["alpha", "baked"],
                   help="comfyui/civitai: lora_down/up + .alpha (default), or lora_A/B with the scale baked in")
    p.add_argument("--rank", type=int, help="re-factor the sum to this rank (default: exact concatenation)")
    p.add_argument("--into", help="transformer checkpoint to merge into (writes a full checkpoint)")
    p.add_argument("--checkpoint-dtype", default="bfloat16", help="matmul dtype of the merged checkpoint "
                   "(default bfloat16)")
    p.add_argument("--report", help="write the per-module rank/energy report to this JSON file")
    p.add_argument("-v", "--verbose", action="store_true", help="print every module's rank and energy kept")
    p.set_defaults(func=_merge)

    p = sub.add_parser("extract", help="a low-rank LoRA of TARGET - BASE (Turbo - Raw: turns Raw towards Turbo)")
    p.add_argument("base", help="base transformer checkpoint (e.g. Raw)")
    p.add_argument("target", help="target transformer checkpoint (e.g. Turbo)")
    p.add_argument("--out", dest="dest", required=True, help="output LoRA file")
    p.add_argument("--rank", type=int, default=64, help="maximum rank per module (default 64)")
    p.add_argument("--min-energy", type=float, help="per module, the smallest rank keeping this share of the "
                   "energy (0 < E <= 1); capped by --rank")
    p.add_argument("--format", default="comfyui", help=f"output layout (default comfyui): {_FORMAT_HELP}")
    p.add_argument("--dtype", default="bfloat16", help="weight dtype of the written file (default bfloat16)")
    p.add_argument("--comfyui-style", default="alpha", choices=["alpha", "baked"],
                   help="comfyui/civitai: lora_down/up + .alpha (default), or lora_A/B with the scale baked in")
    p.add_argument("--deltas", default="none", choices=["none", "biases", "all"],
                   help="also write TARGET - BASE exactly for tensors a LoRA cannot carry, as ComfyUI's .diff/.diff_b "
                   "(--format comfyui only): biases (what ComfyUI's own extractor adds), or all (biases, norm "
                   "scales, modulation tables). Read by ComfyUI, preview.turbo and sample --turbo-lora; not by "
                   "diffusers. Default none")
    p.add_argument("--report", help="write the per-module rank/energy report to this JSON file")
    p.add_argument("-v", "--verbose", action="store_true", help="print every module's rank and energy kept")
    p.set_defaults(func=_extract)

    p = sub.add_parser("transfer", help="how a Raw-trained LoRA behaves on Turbo: effect ratio, cosine, suggested "
                       "Turbo strength, sample grid")
    p.add_argument("lora", help="LoRA file in any supported layout, or a training run folder (runs/NAME: its exported file)")
    p.add_argument("--out", required=True, help="folder for transfer_report.json and transfer_grid.png")
    p.add_argument("--models", help="`micro`, or a folder with transformer_{raw,turbo}.safetensors, text_encoder/, "
                   "vae/ (default: the run folder's config)")
    p.add_argument("--raw", help="Krea 2 Raw checkpoint (default: from --models)")
    p.add_argument("--turbo", help="Krea 2 Turbo checkpoint (default: from --models)")
    p.add_argument("--text-encoder", help="Qwen3-VL text encoder folder (default: from --models)")
    p.add_argument("--vae", help="Qwen-Image VAE (default: from --models)")
    p.add_argument("--prompt", action="append", help="prompt (repeatable)")
    p.add_argument("--height", type=int, help="sample height in px (default: the run's preview resolution; 128 with "
                   "--models; else 1024)")
    p.add_argument("--width", type=int, help="sample width in px (default as --height)")
    p.add_argument("--style-reference", help="folder of training images: the report checks its suggested strength "
                   "against their style (default: a run folder's datasets)")
    p.add_argument("--seed", type=int, default=0, help="noise seed of the samples (default 0)")
    p.add_argument("--dtype", default="bfloat16", help="dtype the models are loaded in (default bfloat16)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.set_defaults(func=_transfer)
