"""LoRA files: formats.py (the one in-memory form, `TrainedAdapter`, and readers for every peer layout), writers.py
(each layout users load: diffusers, ComfyUI, Civitai, original, musubi) and tools.py (inspect, convert, resize, merge,
extract)."""
