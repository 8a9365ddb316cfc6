"""krea2-train: LoRA fine-tuning for Krea 2. Train on Raw, deploy on Turbo.

The folders follow the pipeline; imports only go down this list (the pipeline and the CLI use every stage):
    config/     the run config: one typed section per file, every check before any work
    models/     loading the real on-disk formats, key maps, the tiny model, text encoder and VAE wrappers
    runtime/    how the frozen base runs: quantised layers, checkpointing, offload, attention, fusion, FSDP, swaps
    lora/       LoRA file layouts (read and write) and LoRA tools
    inference.py  the shared sampler (previews, `sample`, verification)
    data/       datasets, checks, aspect buckets, on-disk caches, the batch loader
    train/      the training recipe and its parts
    export/     export for each tool, verification on Turbo, the Raw -> Turbo transfer report
    estimate/   peak GPU memory of a training step, estimated on the CPU
    pipeline.py the whole job; cli/ the `krea2-train` commands
"""

import logging as _logging

__version__ = "0.1.0"

# bitsandbytes warns at import, on every command, that an optional CPU speed-up for 4-bit matmuls (the `kernels`
# package) is missing: nothing a LoRA run needs. Set before any submodule imports bitsandbytes.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
