"""Measures of what a model or a LoRA does to pictures: the style score (style.py) and the check of the suggested
Turbo strength against a strength sweep (strength.py)."""
