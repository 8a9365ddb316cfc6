"""`krea2-train caption CONFIG|DIR`, `krea2-train check-data CONFIG` and `krea2-train cache CONFIG`."""

from __future__ import annotations

from krea2_train.cli.common import say
from krea2_train.data.source import stage_resolutions  # one definition, shared with the trainer


def _load(args, warn_paths: bool = True):
    from krea2_train.cli.common import load_run_config

    return load_run_config(args, warn_paths=warn_paths)


def token_counter(cfg):
    """Exact caption lengths from the configured text encoder's tokenizer, loaded on the first caption long enough
    to need it (most never do); None without a text encoder folder (check-data then uses cheap bounds)."""
    from pathlib import Path

    folder = Path(str(cfg.model.text_encoder or "")).expanduser()
    if not cfg.model.text_encoder or not (folder / "tokenizer_config.json").exists():
        return None
    tokenizer = []

    def count(text: str) -> int:
        if not tokenizer:
            from transformers import AutoTokenizer

            tokenizer.append(AutoTokenizer.from_pretrained(str(folder)))
        return len(tokenizer[0](text, add_special_tokens=False).input_ids)

    return count


def check_data(args) -> int:
    from krea2_train.data.checks import format_report, scan_data

    cfg = _load(args)
    scan = scan_data(cfg.data, stage_resolutions(cfg), cfg.cache_dir, count_tokens=token_counter(cfg))
    say(format_report(scan, show_info=args.verbose))
    if scan.fatal:
        return 1
    if args.strict and scan.counts()["error"]:
        return 1
    return 0


def cache(args) -> int:
    from krea2_train.data.cache import build_caches
    from krea2_train.data.checks import format_report, scan_data
    from krea2_train.errors import UserError
    from krea2_train.models.paths import check_model_paths
    from krea2_train.models.tiny import ensure_tiny

    cfg = _load(args, warn_paths=False)  # checked below, once
    ensure_tiny(cfg)  # the demo config names a tiny model written on first use
    check_model_paths(cfg, ["model.text_encoder", "model.vae"])  # before any image is read, not at encoder load
    if args.prune:
        from krea2_train.data.cache import prune_cache

        files, nbytes = prune_cache(cfg.cache_dir)
        say(f"pruned {files} stale cache entries ({nbytes / 1e6:.1f} MB) from {cfg.cache_dir}")
    resolutions = stage_resolutions(cfg)
    scan = scan_data(cfg.data, resolutions, cfg.cache_dir)
    if scan.fatal:
        say(format_report(scan))
        raise UserError("fatal data problems (above); fix them and run again")
    say(scan.summary())
    manifest = build_caches(cfg.data, cfg.model, cfg.cache_dir, resolutions, scan=scan)
    say(f"cache ready: {len(manifest.items)} images at {resolutions} px; manifest {manifest.path}")
    return 0


def caption(args) -> int:
    """Caption every image without a caption file, with the Qwen3-VL of data.caption.model / model.text_encoder."""
    import json

    from krea2_train.data.caption import caption_datasets, caption_model_path
    from krea2_train.models.micro import resolve_models
    from krea2_train.utils.io import write_json_atomic

    micro = resolve_models(args.model) if args.model else None
    if micro is not None:  # `--model micro`: the shipped micro model's text encoder (it captions, as a model set)
        args.model = str(micro.text_encoder)
    flags = {"data.caption.model": args.model, "data.caption.preset": args.preset,
             "data.caption.instruction": args.instruction, "data.caption.batch_size": args.batch_size,
             "data.caption.max_new_tokens": args.max_new_tokens, "data.caption.max_pixels": args.max_pixels}
    # json.dumps: a YAML scalar that reads back as the same string (an instruction may hold ": ")
    args.overrides = list(args.overrides or []) + [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    cfg = _load(args, warn_paths=False)
    model = caption_model_path(cfg, command=f"krea2-train caption {args.config}")
    report = caption_datasets(cfg.data, model, cfg.cache_dir, overwrite=args.overwrite, dry_run=args.dry_run,
                              trigger=args.trigger, max_images=args.limit)
    say(report.summary())
    if not args.dry_run:
        from pathlib import Path

        path = Path(args.report or Path(cfg.cache_dir).expanduser() / "captions" / "report.json")
        from accelerate import PartialState

        if PartialState().is_main_process:
            write_json_atomic(path, report.to_json())
        say(f"report: {path}")
    return 1 if report.failed else 0


def register(sub) -> None:
    from krea2_train.cli.common import add_config_command
    from krea2_train.config.data import CAPTION_PRESETS

    p = add_config_command(sub, "caption", "write a .txt caption beside every image lacking one, with the Qwen3-VL "
                           "text encoder's own vision tower (resumable; splits across processes under accelerate "
                           "launch)", caption, overrides_help="key=value overrides (e.g. data.caption.max_pixels="
                           "524288)")
    p.add_argument("--model", help="Qwen3-VL folder to caption with, or `micro` (default: data.caption.model, else "
                   "model.text_encoder)")
    p.add_argument("--preset", choices=CAPTION_PRESETS, help="style: the content, never the style; character / "
                   "object (product): the subject named by the trigger word, its pose, clothes, setting; general "
                   "(default): everything")
    p.add_argument("--instruction", help="a free instruction instead of the preset's; {trigger} is the trigger word")
    p.add_argument("--trigger", help="trigger word for every image (default: each dataset's trigger_word)")
    p.add_argument("--overwrite", action="store_true", help="caption images that have a caption too (replacing it)")
    p.add_argument("--dry-run", action="store_true", help="print the captions of a few images, write nothing")
    p.add_argument("--limit", type=int, help="caption at most this many images (with --dry-run: default 4)")
    p.add_argument("--batch-size", type=int, help="images per generate call (data.caption.batch_size)")
    p.add_argument("--max-new-tokens", type=int, help="longest answer (data.caption.max_new_tokens)")
    p.add_argument("--max-pixels", type=int, help="resize images to at most this many pixels (data.caption."
                   "max_pixels)")
    p.add_argument("--report", help="where the JSON report goes (default CACHE_DIR/captions/report.json)")

    p = add_config_command(sub, "check-data", "validate every image and caption of the configured datasets",
                           check_data, overrides_help="key=value overrides (e.g. data.allow_upscale=true)")
    p.add_argument("--strict", action="store_true", help="exit non-zero when any file would be skipped")
    p.add_argument("-v", "--verbose", action="store_true", help="also list informational notes")
    p = add_config_command(sub, "cache", "encode captions and images into the on-disk caches (resumable; splits "
                           "across processes under accelerate launch)", cache)
    p.add_argument("--prune", action="store_true", help="first delete entries that no manifest in cache_dir uses "
                   "(stale after caption, image, model or setting changes); not while another run uses the cache")
