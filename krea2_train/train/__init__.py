"""Training: the recipe (trainer.py) over its parts: LoRA injection (lora.py), the flow-matching loss (step.py) and
timesteps (timesteps.py), optimiser and schedule (optim.py), the process strategy (strategy.py: single/DDP or FSDP),
checkpoints (checkpoint.py) with the resume checks (resume.py), tracking (tracking.py) and previews (preview.py)."""
