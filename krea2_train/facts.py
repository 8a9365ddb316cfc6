"""Krea 2 facts the trainer must match (see shared FACTS.md). Each is pinned by a test in tests/test_facts.py."""

# Text encoder contract (Qwen3-VL-4B, text only).
PROMPT_PREFIX = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n"
)
PROMPT_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
PREFIX_TOKENS = 34
SUFFIX_TOKENS = 5
MAX_PROMPT_TOKENS = 512
TEXT_TAP_LAYERS = (2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32, 35)

# Latents: f8 VAE, 16 channels, packed 2x2 -> 64 channels; pixel sides must be multiples of 16.
VAE_SCALE = 8
PATCH = 2
PIXEL_MULTIPLE = VAE_SCALE * PATCH

# Flow-matching schedule: Raw uses a resolution-aware shift, Turbo a fixed one.
BASE_SHIFT, MAX_SHIFT = 0.5, 1.15
BASE_SEQ_LEN, MAX_SEQ_LEN = 256, 6400
TURBO_MU = 1.15
TURBO_STEPS = 8
RAW_STEPS = 28
RAW_GUIDANCE = 4.5

# The key whose presence identifies a Krea 2 transformer checkpoint (original names).
KREA2_MARKER = "txtfusion.projector.weight"
ORIGINAL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
