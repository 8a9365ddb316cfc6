"""Data: datasets, checks, aspect buckets, on-disk text/latent caches and the training loader.

    from krea2_train.data.checks import scan_data, format_report      # check-data
    from krea2_train.data.cache import build_caches, Manifest          # cache (loads encoders only when needed)
    from krea2_train.data.loader import make_loader, validation_batches

    scan = scan_data(cfg.data, resolutions, cfg.cache_dir)             # every problem per file; scan.fatal
    manifest = build_caches(cfg.data, cfg.model, cfg.cache_dir, resolutions, scan=scan)   # call on every process
    for batch in make_loader(manifest, resolution, batch_size, seed, start_step=step): ...

See cache.py and loader.py for the formats and the batch dict.
"""
