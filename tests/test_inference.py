"""The shared inference core and text encoding match diffusers' own Krea2Pipeline on the tiny models."""

import pytest
import torch

from krea2_train import facts
from krea2_train.inference import SampleSettings, sample_latents
from krea2_train.models.loading import load_transformer
from krea2_train.models.text_encoder import TextEncoder
from krea2_train.models.vae import VAE
from krea2_train.schedule import make_scheduler, pack_latents

PROMPTS = ["a red circle on a blue background", "pastel stripes"]


@pytest.fixture(scope="module")
def parts(tiny_dir):
    te = TextEncoder.from_path(tiny_dir / "text_encoder")
    vae = VAE.from_path(tiny_dir / "vae")
    raw = load_transformer(tiny_dir / "transformer_raw.safetensors", dtype="float32")
    turbo = load_transformer(tiny_dir / "transformer_turbo.safetensors", dtype="float32")
    return te, vae, raw, turbo


def make_pipeline(te, vae, transformer, distilled):
    from diffusers import Krea2Pipeline

    return Krea2Pipeline(scheduler=make_scheduler(), vae=vae.vae, text_encoder=te.model, tokenizer=te.tokenizer,
                         transformer=transformer, is_distilled=distilled)


def test_text_encoding_matches_diffusers(parts):
    te, vae, raw, _ = parts
    pipe = make_pipeline(te, vae, raw, False)
    ref, ref_mask = pipe.get_text_hidden_states(PROMPTS, device="cpu")
    assert ref.shape[1] == facts.MAX_PROMPT_TOKENS and ref.shape[2] == len(facts.TEXT_TAP_LAYERS)
    ours, mask = te.encode(PROMPTS)
    assert ours.shape[1] < ref.shape[1]  # trimmed to the longest caption, not padded to 512
    for i in range(len(PROMPTS)):
        torch.testing.assert_close(ours[i][mask[i]], ref[i][ref_mask[i]], atol=1e-5, rtol=1e-5)
    # the cache form: valid tokens only
    one = te.encode_one(PROMPTS[1])
    torch.testing.assert_close(one, ref[1][ref_mask[1]], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["raw", "turbo"])
def test_sampler_matches_pipeline(parts, variant):
    te, vae, raw, turbo = parts
    transformer = raw if variant == "raw" else turbo
    settings = (SampleSettings.raw(height=64, width=96, steps=6, guidance=3.5, seed=7) if variant == "raw"
                else SampleSettings.turbo(height=64, width=96, seed=7))
    pipe = make_pipeline(te, vae, transformer, variant == "turbo")
    ref = pipe(PROMPTS[0], negative_prompt="", height=settings.height, width=settings.width,
               num_inference_steps=settings.steps, guidance_scale=settings.guidance,
               generator=torch.Generator("cpu").manual_seed(settings.seed), output_type="latent").images
    embeds, mask = te.encode([PROMPTS[0]])
    neg = te.encode([""]) if settings.guidance > 0 else (None, None)
    ours = sample_latents(transformer, embeds, mask, settings, *neg)
    # Stated tolerance: text unpadded vs padded to 512 changes float summation order only.
    torch.testing.assert_close(pack_latents(ours), ref.float(), atol=2e-4, rtol=1e-4)
    assert ours.abs().mean() > 0.1  # it produced something, not zeros


def test_raw_and_turbo_differ(parts):
    _, _, raw, turbo = parts
    a, b = raw.state_dict(), turbo.state_dict()
    assert all(a[k].shape == b[k].shape for k in a)
    assert sum(not torch.equal(a[k], b[k]) for k in a) == len(a)


def test_text_encoding_ignores_tokenizer_padding_side(parts):
    """Krea 2's layout puts padding between the prompt and the suffix; a tokenizer saved with left padding must not
    change the embeddings."""
    te = parts[0]
    right, right_mask = te.encode(PROMPTS)
    te.tokenizer.padding_side = "left"
    try:
        left, left_mask = te.encode(PROMPTS)
    finally:
        te.tokenizer.padding_side = "right"
    assert torch.equal(left_mask, right_mask)
    torch.testing.assert_close(left, right, rtol=0, atol=0)
