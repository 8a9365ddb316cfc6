"""Training batches from the on-disk caches (krea2_train.data): the trainer's default source.

The data loader numbers batches per process as g = step * num_processes + process_index and reads them from a seed,
so the trainer passes its micro-step within the stage as `start_step` and a resumed run sees the same batches.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def stage_resolutions(cfg) -> list[int]:
    """Resolutions of the run's training stages (train.stages[*].resolution), sorted, each once."""
    return sorted({int(s.resolution) for s in cfg.train.stages})


def prepare_manifest(cfg, progress: bool = True):
    """Check the data and make sure every cache entry exists (encoders load only if something is missing).
    Every set `model.*` path is checked first, so a wrong one fails before the caching, not after it."""
    from krea2_train.data.cache import build_caches
    from krea2_train.models.paths import check_model_paths

    check_model_paths(cfg)

    return build_caches(cfg.data, cfg.model, cfg.cache_dir, stage_resolutions(cfg), progress=progress)


class CachedData:
    def __init__(self, cfg, accelerator=None, manifest=None):
        self.cfg = cfg
        self.manifest = manifest if manifest is not None else prepare_manifest(cfg)
        self._val: dict = {}

    def stage_batches(self, stage_index, stage, start, seed, process_index=0, num_processes=1, global_offset=0):
        from krea2_train.data.loader import make_loader

        loader = make_loader(self.manifest, stage.resolution, stage.batch_size, seed, start_step=start,
                             num_workers=self.cfg.data.num_workers, process_index=process_index,
                             num_processes=num_processes, drop_last=self.cfg.data.drop_last)
        return _start_ignoring_sigint(loader)

    def validation_batches(self, stage):
        from krea2_train.data.loader import validation_batches

        if stage.resolution not in self._val:
            self._val[stage.resolution] = validation_batches(self.manifest, stage.resolution, stage.batch_size,
                                                             max_samples=self.cfg.validation.max_samples)
        return self._val[stage.resolution]


def _start_ignoring_sigint(loader):
    """Start the loader's worker processes (data.worker_type process) with SIGINT ignored: Ctrl-C reaches the whole
    process group, and a worker killed by it would break the batches the trainer still reads before it saves its
    checkpoint and exits."""
    import signal
    import threading

    from torch.utils.data import DataLoader

    worker_processes = isinstance(loader, DataLoader) and loader.num_workers > 0  # thread loaders need nothing
    if threading.current_thread() is not threading.main_thread() or not worker_processes:
        return iter(loader)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return iter(loader)  # workers fork here and inherit SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
