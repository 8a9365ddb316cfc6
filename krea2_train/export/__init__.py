"""Shipping a trained adapter: export.py writes the configured LoRA layouts (lora/writers.py) for a run, verify.py
proves each file loads and acts on Turbo, transfer.py measures the Raw -> Turbo effect and suggests a Turbo strength."""
