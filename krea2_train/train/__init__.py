"""Training: LoRA on Raw with Accelerate (config in krea2_train/config.py)."""
