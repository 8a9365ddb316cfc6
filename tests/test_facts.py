"""Pin each FACTS.md fact the project relies on, against diffusers' Krea 2 code where it can serve as reference."""

import math

import pytest
import torch

from krea2_train import facts
from krea2_train.schedule import (
    image_seq_len,
    make_scheduler,
    pack_latents,
    position_ids,
    raw_mu,
    sampling_sigmas,
    time_shift,
    unpack_latents,
)


def test_prompt_template_matches_pipeline():
    from diffusers.pipelines.krea2.pipeline_krea2 import Krea2Pipeline

    pipe = Krea2Pipeline.__new__(Krea2Pipeline)
    # the template strings are set in __init__; read them from the source of truth without building models
    import inspect

    src = inspect.getsource(Krea2Pipeline.__init__)
    assert "prompt_template_encode_start_idx = 34" in src and "prompt_template_encode_num_suffix_tokens = 5" in src
    assert facts.PREFIX_TOKENS == 34 and facts.SUFFIX_TOKENS == 5
    assert "Describe the image by detailing the color, shape, size" in facts.PROMPT_PREFIX
    assert facts.TEXT_TAP_LAYERS == (2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32, 35)
    del pipe


def test_tiny_tokenizer_template_lengths(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir / "text_encoder")
    assert len(tok(facts.PROMPT_PREFIX).input_ids) == facts.PREFIX_TOKENS
    assert len(tok(facts.PROMPT_SUFFIX).input_ids) == facts.SUFFIX_TOKENS


def test_raw_shift_endpoints():
    assert raw_mu(256) == pytest.approx(0.5)
    assert raw_mu(6400) == pytest.approx(1.15)
    assert raw_mu(image_seq_len(1024, 1024)) == pytest.approx(0.91, abs=0.01)


def test_time_shift_matches_diffusers_scheduler():
    for steps, mu in [(28, raw_mu(4096)), (8, facts.TURBO_MU)]:
        sched = make_scheduler()
        sched.set_timesteps(sigmas=torch.linspace(1, 1 / steps, steps).tolist(), mu=mu)
        torch.testing.assert_close(sched.sigmas[:-1].float(), sampling_sigmas(steps, mu), atol=1e-6, rtol=0)
    assert time_shift(0.0, 0.3) == pytest.approx(0.3)
    assert time_shift(1.15, 0.5) == pytest.approx(math.exp(1.15) / (math.exp(1.15) + 1))


def test_pack_and_positions_match_pipeline():
    from diffusers import Krea2Pipeline

    pipe = Krea2Pipeline.__new__(Krea2Pipeline)
    pipe.patch_size = 2
    x = torch.randn(2, 16, 6, 10)
    torch.testing.assert_close(pack_latents(x), pipe._pack_latents(x, 2, 16, 6, 10))
    torch.testing.assert_close(unpack_latents(pack_latents(x), 6, 10), x)
    torch.testing.assert_close(position_ids(7, 3, 5), Krea2Pipeline.prepare_position_ids(7, 3, 5, "cpu"))


def test_real_architecture_defaults():
    from diffusers import Krea2Transformer2DModel

    from krea2_train.models.loading import FULL_ARCHITECTURE

    sig = Krea2Transformer2DModel.__init__.__wrapped__ if hasattr(Krea2Transformer2DModel.__init__, "__wrapped__") \
        else Krea2Transformer2DModel.__init__
    import inspect

    defaults = {k: v.default for k, v in inspect.signature(sig).parameters.items() if k != "self"}
    for k, v in FULL_ARCHITECTURE.items():
        assert tuple(v) == tuple(defaults[k]) if isinstance(v, tuple) else v == defaults[k], k
    assert FULL_ARCHITECTURE["num_layers"] == 28 and FULL_ARCHITECTURE["num_attention_heads"] * 128 == 6144
