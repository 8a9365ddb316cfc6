"""`krea2-train check-data CONFIG` and `krea2-train cache CONFIG`."""

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


def register(sub) -> None:
    from krea2_train.cli.common import add_config_command

    p = add_config_command(sub, "check-data", "validate every image and caption of the configured datasets",
                           check_data, overrides_help="key=value overrides (e.g. data.allow_upscale=true)")
    p.add_argument("--strict", action="store_true", help="exit non-zero when any file would be skipped")
    p.add_argument("-v", "--verbose", action="store_true", help="also list informational notes")
    p = add_config_command(sub, "cache", "encode captions and images into the on-disk caches (resumable; splits "
                           "across processes under accelerate launch)", cache)
    p.add_argument("--prune", action="store_true", help="first delete entries that no manifest in cache_dir uses "
                   "(stale after caption, image, model or setting changes); not while another run uses the cache")
