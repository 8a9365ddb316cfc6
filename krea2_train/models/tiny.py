"""The tiny embedded Krea 2: same architecture and on-disk formats as the real model, small enough for CPU tests.

`make_tiny(dir)` writes, from a fixed seed:
    transformer_raw.safetensors    official single-file layout (original module names), bf16 matmuls, fp32 norms
    transformer_turbo.safetensors  Raw plus a deterministic perturbation, so Raw and Turbo differ as in life
    text_encoder/                  a Qwen3-VL checkpoint in Hugging Face layout, with a tokenizer built offline, the
                                   vision tokens, preprocessor_config.json and chat_template.json (so it captions)
    vae/                           a Qwen-Image VAE in diffusers layout

Nothing here downloads anything; the tokenizer is a byte-level BPE trained on a small built-in corpus so that the
Krea 2 system prefix is exactly 34 tokens and the suffix 5, as with the real Qwen tokenizer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from krea2_train import facts
from krea2_train.models.keys import diffusers_to_original_state_dict
from krea2_train.utils.io import DIR_MODE, atomic_dir, save_safetensors_atomic, write_text_atomic

SEED = 20260101
# 2: the text encoder captions (vision tokens, preprocessor_config.json, chat_template.json); an older folder is
# rewritten by make_tiny.
TINY_VERSION = 2

# Same class, smaller numbers. Head dim 32 gives rope axes (8, 12, 12): the real (32, 48, 48) scaled by 1/4.
TINY_TRANSFORMER = dict(
    in_channels=64,
    num_layers=2,
    attention_head_dim=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=256,
    timestep_embed_dim=64,
    text_hidden_dim=32,
    num_text_layers=12,
    text_num_attention_heads=2,
    text_num_key_value_heads=2,
    text_intermediate_size=64,
    num_layerwise_text_blocks=2,
    num_refiner_text_blocks=2,
    axes_dims_rope=(8, 12, 12),
)

TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=36,  # taps reach hidden_states[35], so 36 layers as in Qwen3-VL-4B
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True},
    rope_theta=5_000_000.0,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)
TINY_VISION = dict(
    depth=1,
    hidden_size=16,
    intermediate_size=32,
    num_heads=2,
    out_hidden_size=32,
    deepstack_visual_indexes=[0],
    num_position_embeddings=16,
)
TINY_VAE = dict(base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1)

# Words the tiny tokenizer learns as whole tokens: the template, and common caption vocabulary.
_CORPUS_WORDS = (
    "system user assistant Describe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background: a an of in on with and at under over near photo "
    "painting illustration style drawing portrait landscape red green blue yellow orange purple pink black white "
    "grey gray brown golden silver bright dark light soft warm cool circle square triangle stripes dots pattern "
    "gradient sky sea mountain tree flower cat dog person woman man car house city night day sun moon star "
    "watercolor oil sketch pixel art minimal abstract geometric colorful vivid pastel sharp blurry close up wide "
    "shot view small large big tiny round tall short one two three many several product bottle cup shoe logo "
    "character face smiling standing sitting walking trigger style demo krea"
)


def _build_tokenizer(extra_words: str = ""):
    """A byte-level BPE with Qwen2Tokenizer's pre-tokenisation and the Qwen chat special tokens. `extra_words` are
    learnt as whole tokens too (the micro model's caption grammar); the default keeps the tiny tokenizer as it was."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=1200,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    words = f"{_CORPUS_WORDS} {extra_words}".strip()
    lines = [facts.PROMPT_PREFIX + "a photo\n" + facts.PROMPT_SUFFIX] * 50 + [words] * 50
    lines += [" " + w for w in words.replace(",", " ").replace(":", " ").split()] * 20
    bpe.train_from_iterator(lines, trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    tok = Qwen2Tokenizer(vocab=state["vocab"], merges=merges)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.padding_side = "right"
    return tok


def build_tiny_transformer(seed: int = SEED):
    """A tiny `Krea2Transformer2DModel` with non-trivial weights (zero-init tables get small random values too)."""
    from diffusers import Krea2Transformer2DModel

    torch.manual_seed(seed)
    model = Krea2Transformer2DModel(**TINY_TRANSFORMER)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 or "scale_shift_table" in name:
                # Norm scales and modulation tables start at zero in diffusers; give them life so tests can see them.
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def turbo_from_raw(raw_state: dict, seed: int = SEED + 7) -> dict:
    """Tiny Turbo = Raw + a deterministic perturbation of every weight (about 10% of each tensor's scale)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(raw_state):
        value = raw_state[key]
        noise = torch.randn(value.shape, generator=gen) * (0.1 * value.float().std().clamp(min=1e-3))
        out[key] = (value.float() + noise).to(value.dtype)
    return out


def original_file_state(model) -> dict:
    """The diffusers state dict in the official single-file layout: bf16 matmuls, fp32 norms and modulations."""
    state = diffusers_to_original_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()})
    out = {}
    for key, value in state.items():
        is_norm_or_modulation = key.endswith((".scale", "mod.lin", "modulation.lin"))
        out[key] = value.to(torch.float32 if is_norm_or_modulation else torch.bfloat16).contiguous()
    return out


# The Qwen3-VL chat template, as in Qwen3-VL-4B-Instruct's chat_template.json, for what captioning sends: an
# optional system message, then user turns of images and text, then the assistant's turn.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' or 'image' in content %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif content['type'] == 'text' %}{{- content['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
# Qwen3-VL-4B-Instruct's preprocessor_config.json, with a smaller pixel budget (the tiny vision tower is random).
TINY_PREPROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessorFast", "processor_class": "Qwen3VLProcessor",
    "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "size": {"shortest_edge": 4096, "longest_edge": 65536},
}


def add_vision_tokens(model, tokenizer) -> None:
    """Give a text-only tiny tokenizer Qwen3-VL's vision tokens (appended, so no existing id moves) and point the
    model's config at them; the embedding grows by those rows only (the existing rows are unchanged)."""
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", *VISION_TOKENS]})
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    ids = dict(zip(VISION_TOKENS, tokenizer.convert_tokens_to_ids(list(VISION_TOKENS))))
    model.config.vision_start_token_id = ids["<|vision_start|>"]
    model.config.vision_end_token_id = ids["<|vision_end|>"]
    model.config.image_token_id = ids["<|image_pad|>"]
    model.config.video_token_id = ids["<|video_pad|>"]


def write_caption_files(folder, preprocessor: dict | None = None) -> None:
    """What a Qwen3-VL folder needs to caption besides weights and tokenizer, in Hugging Face's on-disk format:
    preprocessor_config.json (the image processor) and chat_template.json."""
    folder = Path(folder)
    write_text_atomic(folder / "preprocessor_config.json", json.dumps(preprocessor or TINY_PREPROCESSOR, indent=2))
    write_text_atomic(folder / "chat_template.json", json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2))


def enable_captioning(src, dst, seed: int = SEED + 4) -> Path:
    """A copy of the Qwen3-VL folder `src` that captions: the vision tokens added (add_vision_tokens) and the
    processor files written (write_caption_files). For a tiny folder built before the tiny model captioned, and for
    the micro model's text encoder, which ships without them; the language model's existing rows are unchanged."""
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(src, torch_dtype="auto")  # keep the stored dtype
    tokenizer = AutoTokenizer.from_pretrained(src)
    torch.manual_seed(seed)
    add_vision_tokens(model, tokenizer)
    with atomic_dir(dst) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_caption_files(tmp)
    return Path(dst)


def build_tiny_text_encoder(seed: int = SEED):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tokenizer = _build_tokenizer()
    text = dict(TINY_TEXT, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    config = Qwen3VLConfig(text_config=text, vision_config=TINY_VISION)
    torch.manual_seed(seed + 2)
    model = Qwen3VLForConditionalGeneration(config).eval()
    torch.manual_seed(seed + 4)  # the new rows draw from their own seed
    add_vision_tokens(model, tokenizer)
    return model, tokenizer


def build_tiny_vae(seed: int = SEED):
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed + 3)
    return AutoencoderKLQwenImage(**TINY_VAE).eval()


def make_tiny(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the tiny Raw/Turbo transformers, text encoder and VAE to `out_dir` (idempotent unless overwrite)."""
    out = Path(out_dir)
    marker = out / "tiny.json"
    if marker.exists() and not overwrite and json.loads(marker.read_text()).get("version", 1) >= TINY_VERSION:
        return out
    if not out.exists():
        out.mkdir(parents=True)
        os.chmod(out, DIR_MODE)  # a model folder other programs (ComfyUI, diffusers under another user) read
    raw = build_tiny_transformer()
    raw_state = original_file_state(raw)
    meta = {"krea2_variant": "raw", "krea2_note": "tiny random Krea 2 for tests"}
    save_safetensors_atomic(raw_state, out / "transformer_raw.safetensors", metadata=meta)
    turbo_state = turbo_from_raw(raw_state)
    save_safetensors_atomic(turbo_state, out / "transformer_turbo.safetensors", metadata={**meta, "krea2_variant": "turbo"})

    text_encoder, tokenizer = build_tiny_text_encoder()
    with atomic_dir(out / "text_encoder") as tmp:
        text_encoder.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_caption_files(tmp)

    vae = build_tiny_vae()
    with atomic_dir(out / "vae") as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)

    write_text_atomic(marker, json.dumps({"version": TINY_VERSION, "seed": SEED, "transformer": TINY_TRANSFORMER},
                                         indent=2))  # 0644
    return out


def ensure_tiny(cfg) -> None:
    """Write the tiny model to `cfg.make_tiny` if it is set and missing (main process; the others wait)."""
    if not cfg.make_tiny:
        return
    from accelerate import PartialState

    target = Path(cfg.make_tiny)
    state = PartialState()
    if not (target / "transformer_raw.safetensors").exists():
        if state.is_main_process:
            print(f"==> tiny model: writing {target}", flush=True)
            make_tiny(target)
    state.wait_for_everyone()
