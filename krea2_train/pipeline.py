"""`krea2-train CONFIG`: the whole job in order, each step skipped when its result is already valid.

    tiny model   (demo only: `make_tiny` set and the folder missing)
    caption      with `data.auto_caption: true`: a .txt beside every image lacking one, from the Qwen3-VL of
                 data.caption.model / model.text_encoder (no model loaded when every image has one); the transformer
                 is not loaded yet, so captioning has the GPU to itself
    check-data   every image and caption checked; fatal problems stop here with the report
    cache        text and latent caches; skipped when every entry already exists (no encoder is loaded)
    train        skipped when RUN/train_done.json says all steps ran and the adapter is on disk; resumes otherwise
    export       the configured formats; skipped when RUN/export/export.json is newer than the adapter and has the
                 same formats, name and header metadata (trigger words...)
    verify       each exported file on Turbo (a failure fails the run); skipped with export. An edit LoRA
                 (data.reference) is verified, and its transfer report measured, with references in context: a
                 held-out pair's cached reference latents (verify), preview.prompts + preview.references or the
                 held-out pairs (transfer), run with train.reference_method (`edit_pairs`, `transfer_references`)

Works under `accelerate launch`: caching splits across processes, training is data parallel, export and verify run
on the main process.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from krea2_train.errors import UserError
from krea2_train.lora.workflow import run_lora_name, run_models
from krea2_train.models.tiny import ensure_tiny

log = logging.getLogger(__name__)


def init_distributed():
    """Initialise Accelerate's process state once, before any data or model code asks for it (runtime/distributed.py:
    forced to CPU on a machine without a GPU, collective timeout, the watch that names a lost machine)."""
    from krea2_train.runtime.distributed import process_state

    return process_state()


def _say(msg: str) -> None:
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(f"==> {msg}", flush=True)


def auto_caption(cfg):
    """Caption the images that lack a caption (data.auto_caption), before check-data reads the captions."""
    from accelerate import PartialState

    from krea2_train.data.caption import caption_datasets, caption_model_path
    from krea2_train.utils.io import write_json_atomic

    report = caption_datasets(cfg.data, caption_model_path(cfg, command="krea2-train caption CONFIG"),
                              cfg.cache_dir)
    if not report.written and not report.failed:
        _say(f"caption: every image has a caption ({len(report.kept)}), skipped")
    else:
        _say(report.summary())
    if PartialState().is_main_process:
        write_json_atomic(cfg.run_dir / "caption_report.json", report.to_json())
    return report


def check_data(cfg):
    from krea2_train.data.checks import format_report, scan_data
    from krea2_train.data.source import stage_resolutions

    scan = scan_data(cfg.data, stage_resolutions(cfg), cfg.cache_dir)
    if scan.fatal:
        raise UserError("the data has fatal problems; fix them and run again:\n" + format_report(scan))
    _say(f"check-data: {scan.summary()}")
    skipped = sorted(map(str, scan.skipped_files()))
    if skipped:  # the reasons and fixes per file: `krea2-train check-data CONFIG`, or RUN/data_report.json
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        _say(f"check-data: not trained on: {', '.join(skipped[:5])}{more} (why and how to fix: "
             f"krea2-train check-data CONFIG, or {cfg.run_dir / 'data_report.json'})")
    from accelerate import PartialState

    if PartialState().is_main_process:  # for the run page
        from krea2_train.runpage import write_data_report

        write_data_report(cfg.run_dir, scan)
    return scan


def cache(cfg, scan):
    from accelerate import PartialState

    from krea2_train.data.cache import build_caches, manifest_if_ready
    from krea2_train.data.source import stage_resolutions

    res = stage_resolutions(cfg)
    manifest = manifest_if_ready(cfg.data, cfg.model, cfg.cache_dir, res, scan, device=PartialState().device)
    if manifest is not None:
        _say(f"cache: up to date ({len(manifest.items)} images at {res} px), skipped")
        return manifest
    _say(f"cache: {res} px into {cfg.cache_dir} (only missing entries are encoded)")
    return build_caches(cfg.data, cfg.model, cfg.cache_dir, res, scan=scan)


def _epochs(cfg, dataset_size: int) -> int:
    """Passes over the training images (kohya's ss_num_epochs, whole passes rounded up): images drawn by every
    process of the run (RUN/runtime.json says how many trained it) over the training images."""
    import math

    from krea2_train.train.trainer import RUNTIME_FILE

    runtime = cfg.run_dir / RUNTIME_FILE
    try:
        processes = int(json.loads(runtime.read_text()).get("processes", 1))
    except (OSError, ValueError):
        processes = 1
    seen = sum(st.steps * st.batch_size for st in cfg.train.stages) * cfg.train.gradient_accumulation * processes
    return math.ceil(seen / dataset_size)


def export_settings(cfg, manifest=None) -> tuple[str, dict]:
    """The exported files' name stem and header metadata, as the config asks for them now."""
    name = cfg.export.name or cfg.run_name
    triggers = list(cfg.export.trigger_words) or [d.trigger_word for d in cfg.data.datasets if d.trigger_word]
    # resolution: the largest trained (headers, and the exported ComfyUI graph's size)
    metadata = {"trigger_words": triggers, "resolution": max(st.resolution for st in cfg.train.stages),
                "steps": cfg.total_steps, "base_model": "Krea 2 Raw"}
    if cfg.preview.prompts:  # the prompt of the ComfyUI workflow written beside the export
        metadata["sample_prompt"] = cfg.preview.prompts[0]
    if cfg.data.reference:  # an edit LoRA: the workflow gets the reference nodes with the method trained
        metadata["reference_method"] = cfg.train.reference_method
        metadata["reference_count"] = reference_count(cfg, manifest)
    if manifest is not None:
        train = [i for i in manifest.items if i.get("split") == "train"]
        metadata["dataset_size"] = len(train)
        if train:
            metadata["epochs"] = _epochs(cfg, len(train))
        # Civitai's ss_dataset_dirs / ss_tag_frequency (lora/civitai.py): per dataset folder, its training images
        # and the tags of their captions as trained (trigger word included).
        from krea2_train.lora.civitai import tag_frequency

        folders = _dataset_folder_names(cfg)
        by_dir: dict = {}
        for item in train:
            by_dir.setdefault(folders[item["dataset"]], []).append(item.get("caption") or "")
        metadata["datasets"] = {d: len(c) for d, c in by_dir.items()}
        metadata["tag_frequency"] = {d: tag_frequency(c) for d, c in by_dir.items()}
    return name, metadata


def reference_count(cfg, manifest=None) -> int:
    """References per pair of an edit run: what the cache holds (metadata / dataset columns decide it at check-data),
    else the number of data.reference_folders."""
    for item in getattr(manifest, "items", None) or ():
        for lat in item.get("latents", {}).values():
            if lat.get("reference_keys"):
                return len(lat["reference_keys"])
    return len(cfg.data.reference_folders)


def _dataset_folder_names(cfg) -> list[str]:
    """A short unique name per data.datasets entry (its folder name; index-suffixed when two share one)."""
    names = [Path(str(d.path)).name or str(d.path) for d in cfg.data.datasets]
    return [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]


def export_valid(cfg, manifest=None) -> bool:
    """The export folder holds what the config asks for now: same formats, name and header metadata (trigger
    words...), newer than the adapter, verified when verification is on."""
    run = cfg.run_dir
    adapter = run / "adapter" / "adapter_model.safetensors"
    done = run / "export" / "export.json"
    if not (adapter.exists() and done.exists()) or done.stat().st_mtime < adapter.stat().st_mtime:
        return False
    meta = json.loads(done.read_text())
    from krea2_train.lora.writers import normalize_format

    if set(meta.get("files", {})) != {normalize_format(f) for f in cfg.export.formats}:  # aliases: ai-toolkit...
        return False
    name, metadata = export_settings(cfg, manifest)
    written = meta.get("metadata") or {}
    if meta.get("name") != name or written.get("name", name) != name:
        return False
    if any(not _json_equal(written.get(k), v) for k, v in metadata.items()):  # export adds keys of its own
        return False
    from dataclasses import asdict

    if (meta.get("comfyui_workflow") or {}).get("models") != asdict(run_models(cfg)):  # export.comfyui_*
        return False
    if cfg.export.transfer_report and not (run / "export" / "transfer_report.json").exists():
        return False
    # an edit run's reports must have been measured with its references (not text-to-image, as before they were),
    # its style distance labelled as no style result (edit_style_distance, not `style`, as before it was)
    edit = bool(cfg.data.reference)
    if cfg.export.transfer_report and edit:
        transfer = json.loads((run / "export" / "transfer_report.json").read_text())
        if "references" not in transfer or "style" in transfer:
            return False
    if cfg.export.verify:
        v = run / "export" / "verify.json"
        if not v.exists() or not all(r.get("ok") and (not edit or r.get("references"))
                                     for r in json.loads(v.read_text()).values()):
            return False
    return True


def _json_equal(a, b) -> bool:
    """Equal as they would read back from export.json (tuples are lists there)."""
    return json.loads(json.dumps(a)) == json.loads(json.dumps(b))


def export(cfg, manifest=None):
    from krea2_train.export.export import export_and_verify, export_lora

    run = cfg.run_dir
    name, metadata = export_settings(cfg, manifest)
    previews = sorted((run / "previews").glob("step-*.png"))
    preview_png = previews[-1].read_bytes() if previews else None
    out = run / "export"
    if cfg.export.transfer_report and not cfg.model.turbo:
        raise UserError("export.transfer_report needs model.turbo; set it or export.transfer_report: false")
    if cfg.export.verify:
        if not cfg.model.turbo:
            raise UserError("export.verify needs the Turbo checkpoint: set model.turbo, or export.verify: false")
        # The transfer report runs inside, first, so the Civitai header gets its suggested Turbo strength and a
        # Turbo sample at that strength as the thumbnail.
        transfer = bool(cfg.export.transfer_report)
        result = export_and_verify(
            run / "adapter", out, cfg.model.turbo, formats=list(cfg.export.formats), metadata=metadata, name=name,
            preview_png=None if transfer else preview_png, transfer=transfer, raw_path=cfg.model.transformer,
            text_encoder=cfg.model.text_encoder, vae=cfg.model.vae,
            transfer_kwargs=_transfer_kwargs(cfg, manifest) if transfer else None,
            workflow_models=run_models(cfg), verify_kwargs=verify_references(cfg, manifest))
        paths = result["paths"]
        _say_exported(paths)  # what was written first, then what was checked on it
        _say("verify: every exported file loads on Turbo with the trained effect")
        if transfer:
            _say(f"transfer report: {out / 'transfer_report.json'}")
    else:
        paths = export_lora(run / "adapter", out, list(cfg.export.formats), metadata, name, preview_png=preview_png,
                            workflow_models=run_models(cfg))
        _say_exported(paths)
        if cfg.export.transfer_report:
            _transfer_report(cfg, run, out, manifest)
    return paths


def _say_exported(paths) -> None:
    for fmt, p in paths.items():
        _say(f"export: {fmt}: {p}")


def _transfer_kwargs(cfg, manifest=None) -> dict:
    from krea2_train.evaluate.style import StyleReference

    kwargs = dict(name=cfg.export.name or cfg.run_name, prompts=list(cfg.preview.prompts) or None,
                  height=cfg.preview.resolution, width=cfg.preview.resolution, seed=cfg.preview.seed,
                  style_reference=StyleReference.from_datasets(cfg.data.datasets),
                  sweep=list(cfg.export.strength_sweep), workflow=_workflow_for_pictures(cfg),
                  slider=list(cfg.train.sliders) if cfg.train.mode == "slider" else None)
    if cfg.data.reference:
        kwargs.update(transfer_references(cfg, manifest), style_reference=edit_style_reference(manifest))
    return kwargs


def edit_style_reference(manifest, max_images: int = 64):
    """The style check's reference for an edit run: its target images only (a dataset folder's reference/ inputs
    are not what the LoRA should produce, but StyleReference.from_datasets reads every image under the folder); at
    most `max_images`, evenly spaced in name order; None when no target is a file (save_to_disk datasets)."""
    from krea2_train.evaluate.style import StyleReference, open_spaced

    files = sorted({i["name"] for i in (manifest.items if manifest is not None else ()) if Path(i["name"]).is_file()})
    images = open_spaced(files, max_images)
    return StyleReference.from_images(images) if images else None


EDIT_PAIRS = 3  # pairs the transfer report measures an edit LoRA on, without preview.prompts


def edit_pairs(cfg, manifest, count: int = EDIT_PAIRS) -> dict:
    """Up to `count` pairs of an edit run from its cache, at the last stage's resolution and in one bucket (their
    references stack): held-out (validation) pairs first, then training pairs, each in id order.

    Returns {"names", "captions", "references": per reference k a (n, 16, h, w) clean latent, "width", "height",
    "resolution", "source"}. Refuses (naming the fix) a manifest without reference latents."""
    from krea2_train.data.loader import read_batch

    res = int(cfg.train.stages[-1].resolution)
    items = [i for i in (manifest.items if manifest is not None else ()) if str(res) in i["latents"]
             and i["latents"][str(res)].get("reference_keys")]
    if not items:
        raise UserError(f"data.reference: true, but the cache has no pair with reference latents at {res} px to verify "
                        "the edit LoRA with: run `krea2-train cache CONFIG` (or the whole job) again")
    items.sort(key=lambda i: (i["split"] != "validation", i["id"]))
    bucket = items[0]["latents"][str(res)]["bucket"]
    chosen = [i for i in items if i["latents"][str(res)]["bucket"] == bucket][:count]
    batch = read_batch(manifest, res, [(i, False, False) for i in chosen])
    held = sum(i["split"] == "validation" for i in chosen)
    what = (f"held-out pair(s) {', '.join(Path(i['name']).name for i in chosen)}" if held == len(chosen) else
            f"pair(s) {', '.join(Path(i['name']).name for i in chosen)} ({held} held out, the rest training pairs: "
            "data.validation_images holds pairs out)")
    return {"names": [i["name"] for i in chosen], "captions": [i["caption"] for i in chosen],
            "references": batch["references"], "width": int(bucket[0]), "height": int(bucket[1]),
            "resolution": res, "source": f"{what}, cached at {res} px ({bucket[0]}x{bucket[1]})"}


def verify_references(cfg, manifest) -> dict | None:
    """verify_lora_file's reference arguments for an edit run (one held-out pair's reference latents, the trained
    method), or None for text-to-image."""
    if not cfg.data.reference:
        return None
    pairs = edit_pairs(cfg, manifest, count=1)
    return dict(references=[r[:1] for r in pairs["references"]], reference_method=cfg.train.reference_method,
                reference_source=pairs["source"])


def run_manifest(cfg):
    """The cache manifest of a finished run's data as its config reads now (check-data, no model loaded), for
    `verify` / `transfer` on an edit run folder; refuses, with the command to run, a cache that is not complete."""
    from krea2_train.data.cache import manifest_if_ready
    from krea2_train.data.checks import scan_data
    from krea2_train.data.source import stage_resolutions

    res = stage_resolutions(cfg)
    scan = scan_data(cfg.data, res, None, progress=False)
    manifest = None if scan.fatal else manifest_if_ready(cfg.data, cfg.model, cfg.cache_dir, res, scan)
    if manifest is None:
        raise UserError(f"{cfg.run_dir} is an edit run (data.reference: true): its references come from its cache "
                        f"({cfg.cache_dir}), which is not complete for its data now. Run `krea2-train cache "
                        f"{cfg.run_dir / 'config.yaml'}` first.")
    return manifest


def transfer_references(cfg, manifest) -> dict:
    """transfer_report's prompts, size and reference arguments for an edit run: preview.prompts with their
    preview.references (encoded at the preview size, as previews do) when the run has one reference per pair, else
    up to EDIT_PAIRS held-out / training pairs from the cache with their captions, at their bucket's size."""
    method = cfg.train.reference_method
    count = reference_count(cfg, manifest)
    if cfg.preview.prompts and cfg.preview.references and count == 1:
        import torch

        from krea2_train.train.preview import preview_references

        lats, images = preview_references(cfg)
        return dict(references=[torch.cat([lat[0] for lat in lats])], reference_images=list(images),
                    reference_method=method, reference_names=[Path(p).name for p in cfg.preview.references[:1]],
                    reference_source=f"preview.references at {cfg.preview.resolution} px")
    pairs = edit_pairs(cfg, manifest)
    why = "" if not cfg.preview.prompts else f" (preview.references give 1 reference per prompt, the run has {count})"
    return dict(prompts=pairs["captions"], height=pairs["height"], width=pairs["width"],
                references=pairs["references"], reference_method=method, reference_source=pairs["source"] + why)


def _workflow_for_pictures(cfg) -> dict:
    """workflow_png_chunks' file and model names for this run's pictures."""
    return dict(lora_name=run_lora_name(cfg), trigger_words=tuple(cfg.export.trigger_words),
                models=run_models(cfg), filename_prefix=cfg.export.name or cfg.run_name)


def _transfer_report(cfg, run, out, manifest=None):
    """How the LoRA acts on Turbo compared with Raw (strength suggestion + side-by-side grid), next to the files."""
    from krea2_train.export.transfer import transfer_report

    report = transfer_report(run / "adapter" / "adapter_model.safetensors", out_dir=out,
                             raw_path=cfg.model.transformer, turbo_path=cfg.model.turbo,
                             text_encoder=cfg.model.text_encoder, vae=cfg.model.vae, dtype=cfg.model.dtype,
                             **_transfer_kwargs(cfg, manifest))
    _say(f"transfer report: {out / 'transfer_report.json'}")
    return report


def run_all(cfg) -> int:
    from accelerate import PartialState

    from krea2_train.data.source import CachedData
    from krea2_train.models.paths import check_model_paths
    from krea2_train.train.resume import check_resume_settings, training_done
    from krea2_train.train.trainer import Trainer

    init_distributed()
    ensure_tiny(cfg)
    # before any work: wrong model paths, and a run folder trained with other settings, fail here
    check_model_paths(cfg)
    done = training_done(cfg)
    if not done:
        check_resume_settings(cfg)
    source = None
    if cfg.train.mode == "slider":  # no dataset: the slider's prompts (and start images) are what is cached
        from krea2_train.data.slider_source import SliderData, prepare_slider_cache

        manifest = None
        source = SliderData(cfg, texts=prepare_slider_cache(cfg))
        _say(f"cache: {len(source.texts)} slider prompts encoded into {cfg.cache_dir}")
    else:
        if cfg.data.auto_caption:
            auto_caption(cfg)
        manifest = cache(cfg, check_data(cfg))
    if done:
        _say(f"train: {cfg.run_dir} already finished {cfg.total_steps} steps, skipped (new run_name to train again)")
    else:
        _say(f"train: {cfg.total_steps} steps into {cfg.run_dir}")
        trainer = Trainer(cfg)
        trainer.source = source or CachedData(cfg, trainer.acc, manifest=manifest)
        result = trainer.run()
        if result.interrupted:
            return 130
    state = PartialState()
    if state.is_main_process:
        if not cfg.export.formats:
            _say(f"export: no formats configured (export.formats: []); the PEFT adapter is in {cfg.run_dir / 'adapter'}")
        elif export_valid(cfg, manifest):
            _say(f"export: {cfg.run_dir / 'export'} is up to date, skipped")
        else:
            export(cfg, manifest)
        from krea2_train.runpage import write_run_page

        _say(f"done: {cfg.run_dir} (open {write_run_page(cfg.run_dir)} in a browser)")
    state.wait_for_everyone()
    return 0
