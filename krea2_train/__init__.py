"""krea2-train: LoRA fine-tuning for Krea 2. Train on Raw, deploy on Turbo.

Pipeline layout (one module per concern):
    data/     datasets, validation, aspect buckets, on-disk caches
    models/   loading (real formats), the tiny embedded Krea 2, text encoding, VAE
    inference.py  the shared sampling core (previews, `sample`, export verification)
    train/    config-driven LoRA training under Accelerate
    export/   LoRA file formats, Turbo verification, transfer report, LoRA tools
"""

__version__ = "0.1.0"
