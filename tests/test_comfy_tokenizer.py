"""`model.tokenizer` pointed at ComfyUI's comfy/text_encoders/qwen25_tokenizer folder (copied out of the ComfyUI
checkout): the loader reads it, and Krea 2's prompt layout tokenizes to the ids ComfyUI's own Krea 2 text encoder
keeps (tests/_comfy_tokenizer.py runs comfy/text_encoders/krea2.py's tokenizer and prefix stripping). Prompts that
ComfyUI reads differently from diffusers are refused, named; past 512 tokens diffusers' truncation is kept, with a
warning."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from krea2_train import facts
from krea2_train.errors import ModelLoadError, UserError
from krea2_train.models.comfy_files import load_tokenizer
from krea2_train.models.text_encoder import TextEncoder

PROMPTS = ["a red circle", "", " leading space", "trailing space ", "A photo of 3 cats, 😀 ümlaut 東京 — «quoted»",
           "(red:1.2) [blue] {green} <angle>", "<think>x</think> <|vision_start|>", "two\n\nlines\ttab  spaces",
           "x embedding y", "xembedding:y", "x" * 3000, "a, b; c: d! e? f... 1234567890 100%"]


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    import _comfy_tokenizer

    ns = _comfy_tokenizer.load(tmp_path_factory.mktemp("comfy"))
    if ns is None:
        pytest.skip("ComfyUI source not available (tests/_comfy_source.COMFYUI_GIT)")
    ns.folder = _comfy_tokenizer.copy_tokenizer_folder(tmp_path_factory.mktemp("tok"))
    return ns


@pytest.fixture(scope="module")
def ours(comfy):
    return TextEncoder(SimpleNamespace(dtype=torch.float32), load_tokenizer(comfy.folder))


def kept(te: TextEncoder, prompt: str) -> list[int]:
    ids, mask = te.tokenize([prompt])
    return ids[0][mask[0]][facts.PREFIX_TOKENS:].tolist()


def test_template_and_taps_are_comfyuis(comfy):
    assert comfy.template == facts.PROMPT_PREFIX + "{}" + facts.PROMPT_SUFFIX
    assert tuple(comfy.taps) == tuple(facts.TEXT_TAP_LAYERS)


def test_same_ids_as_comfyui(comfy, ours, tmp_path):
    """ComfyUI's code run as ComfyUI runs it (with an embeddings folder)."""
    for p in PROMPTS:
        assert kept(ours, p) == comfy.kept_ids(p, embedding_directory=str(tmp_path)), p
        assert set(comfy.kept_mask(p, embedding_directory=str(tmp_path))) == {1}, p  # ComfyUI masks none of them
    # batched (padded in the middle, as training batches are): the valid ids are the same
    ids, mask = ours.tokenize(PROMPTS)
    for i, p in enumerate(PROMPTS):
        assert ids[i][mask[i]][facts.PREFIX_TOKENS:].tolist() == comfy.kept_ids(p), p
    assert ours.tokenizer.pad_token_id == 151643  # ComfyUI's pad token (it never pads a single prompt)


@pytest.mark.parametrize("prompt, why", [
    ("\nstarts with a line break", "merge with the end of Krea 2's template"),
    ("\\(escaped\\) parentheses", "escaped parentheses"),
    ("<|im_start|>user\nhi", "whole chat template"),
    ("embedding:foo bar", "textual-inversion embedding"),
    ("a embedding:foo", "textual-inversion embedding"),
    ("x embedding: y", "textual-inversion embedding"),
    ("a <|endoftext|> b", "masks every token from it on"),
])
def test_prompts_comfyui_reads_differently_are_refused(comfy, ours, prompt, why, tmp_path):
    """Each refused prompt really is read differently by ComfyUI's code (with an embeddings folder, as ComfyUI
    runs: other token ids, or tokens it masks), so the refusal is not a guess."""
    theirs = comfy.kept_ids(prompt, embedding_directory=str(tmp_path))
    body = ours.tokenizer(facts.PROMPT_PREFIX + prompt).input_ids[facts.PREFIX_TOKENS:]
    assert theirs != body + ours.tokenizer(facts.PROMPT_SUFFIX).input_ids or \
        0 in comfy.kept_mask(prompt, embedding_directory=str(tmp_path))
    with pytest.raises(UserError, match=why):
        ours.tokenize([prompt])


def test_long_prompt_truncated_like_diffusers_with_warning(comfy, ours, caplog):
    prompt = "word " * 600
    with caplog.at_level(logging.WARNING):
        ids = kept(ours, prompt)
    theirs = comfy.kept_ids(prompt)
    assert len(ids) == facts.MAX_PROMPT_TOKENS and len(theirs) == 606
    assert ids[:-facts.SUFFIX_TOKENS] == theirs[: facts.MAX_PROMPT_TOKENS - facts.SUFFIX_TOKENS]
    assert "ComfyUI reads all of it" in caplog.text


def test_single_file_text_encoder_with_comfyui_tokenizer_folder(comfy, tmp_path):
    """A ComfyUI-layout single-file Qwen3-VL (tiny widths, Qwen3-VL's vocabulary size) with `model.tokenizer` =
    the qwen25_tokenizer folder loads and encodes; a text encoder whose vocabulary is smaller than the tokenizer's
    is refused naming both."""
    from transformers import Qwen3VLConfig, Qwen3VLModel

    from krea2_train.models.tiny import TINY_TEXT, TINY_VISION

    n = len(load_tokenizer(comfy.folder))
    cfg = Qwen3VLConfig(text_config=dict(TINY_TEXT, vocab_size=n + 11, pad_token_id=151643), vision_config=TINY_VISION)
    torch.manual_seed(0)
    lm = Qwen3VLModel(cfg).language_model
    path = tmp_path / "qwen3vl_4b_tiny.safetensors"
    save_file({f"model.language_model.{k}": v.contiguous() for k, v in lm.state_dict().items()}, path)
    te = TextEncoder.from_path(path, tokenizer=comfy.folder)
    hidden = te.encode_one("a red circle")
    assert hidden.shape == (len(comfy.kept_ids("a red circle")), 12, TINY_TEXT["hidden_size"])
    assert torch.isfinite(hidden).all()
    small = Qwen3VLConfig(text_config=dict(TINY_TEXT, vocab_size=640), vision_config=TINY_VISION)
    save_file({f"model.language_model.{k}": v.contiguous() for k, v in Qwen3VLModel(small).language_model
               .state_dict().items()}, tmp_path / "small.safetensors")
    with pytest.raises(ModelLoadError, match=r"qwen25_tokenizer: the tokenizer has \d+ tokens but .*small"):
        TextEncoder.from_path(tmp_path / "small.safetensors", tokenizer=comfy.folder)


def test_refusals_without_comfyui_source():
    """The rule itself, for machines without the ComfyUI checkout (the test above shows ComfyUI reads these
    differently): a plain prompt passes, each case is named."""
    from krea2_train.models.text_encoder import comfyui_prompt_problem

    assert comfyui_prompt_problem("a red circle (big), 3 cats: embedding") is None
    assert "backslash" in comfyui_prompt_problem("a \\(b\\)")
    assert "chat template" in comfyui_prompt_problem("<|im_start|>system\nx")
    assert "textual-inversion" in comfyui_prompt_problem("x embedding:foo")
    assert "pad token" in comfyui_prompt_problem("x <|endoftext|>")
