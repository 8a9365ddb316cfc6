"""The shipped micro Krea 2 (krea2_train/models/micro_weights): files, loaders, sizes, and that it has learnt.

Nothing is pretrained here; the figures come from sampling the committed files. Prompt following is checked on 8
seeded prompts against thresholds (background colour 5 of 8, shape colour 4 of 8) that a model ignoring the prompt
fails: the same check run on a random micro transformer and on the shipped one fed the wrong prompts must fall below
them (asserted below). The issue's figure over 64 prompts (shape colour, target 80% Raw / 75% Turbo) is measured by
scripts/measure_micro.py and recorded in the manifest: this build reaches 67% / 64%.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from krea2_train.data import world
from krea2_train.evaluate.prompt_following import prompt_following, read_image, sample_images
from krea2_train.inference import SampleSettings
from krea2_train.models import micro
from krea2_train.models.loading import ModelLoadError, load_text_encoder, load_transformer, load_vae
from krea2_train.models.text_encoder import TextEncoder
from krea2_train.models.vae import VAE

ROOT = Path(__file__).resolve().parents[1]
FOLLOW_PROMPTS = 8
FOLLOW_THRESHOLD = 5 / 8
SHAPE_COLOUR_THRESHOLD = 5 / 8  # measured on this subset: Raw 6/8, Turbo 6/8 (64 prompts: 92%); ignoring the text ~1/8

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def paths():
    return micro.micro_paths()


@pytest.fixture(scope="module")
def parts(paths):
    text = TextEncoder.from_path(paths.text_encoder)
    vae = VAE.from_path(paths.vae)
    raw = load_transformer(paths.transformer_raw, dtype="float32", expect="raw")
    turbo = load_transformer(paths.transformer_turbo, dtype="float32")
    return {"raw": raw, "turbo": turbo, "text": text, "vae": vae}


# ------------------------------------------------------------------------------------------------- files
def test_files_match_manifest(paths, tmp_path):
    manifest = micro.verify_manifest(paths.root)
    assert manifest["total_bytes"] <= 32 * 2**20
    assert manifest["seed"] == micro.SEED and "pretrain_micro.py" in manifest["command"]
    for variant in ("raw", "turbo"):
        assert 0.0 <= manifest["figures"][variant]["colour_accuracy"] <= 1.0
    # a changed byte is caught
    copy = tmp_path / "micro"
    shutil.copytree(paths.root, copy)
    target = copy / "transformer_turbo.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 1
    target.write_bytes(bytes(data))
    with pytest.raises(micro.MicroModelError, match="differ"):
        micro.micro_paths(copy)
    assert micro.resolve_models("micro") == paths and micro.resolve_models("some/dir") is None


def test_storage_dtypes_as_the_real_release(paths):
    from safetensors import safe_open

    with safe_open(str(paths.transformer_raw), framework="pt") as h:
        meta = h.metadata()
        for key in h.keys():
            want = torch.float32 if key.endswith((".scale", "mod.lin", "modulation.lin")) else torch.bfloat16
            assert h.get_tensor(key).dtype == want, key
    assert meta["krea2_variant"] == "raw"
    for folder in (paths.text_encoder, paths.vae):
        for f in folder.glob("*.safetensors"):
            with safe_open(str(f), framework="pt") as h:
                assert {h.get_tensor(k).dtype for k in h.keys()} == {torch.bfloat16}, f


def test_comfyui_can_infer_the_architecture(paths):
    """ComfyUI's Krea 2 detection (model_detection.py) and builder (ldm/krea2/model.py), restated on the shapes."""
    from safetensors import safe_open

    with safe_open(str(paths.transformer_turbo), framework="pt") as h:
        shape = {k: tuple(h.get_slice(k).get_shape()) for k in h.keys()}
    features = shape["first.weight"][0]
    heads = shape["blocks.0.attn.wq.weight"][0] // 128  # Comfy assumes head dim 128
    txtdim = shape["txtfusion.layerwise_blocks.0.prenorm.scale"][0]

    def comfy_mlp(dim):  # SwiGLU(features, multiplier=4, multiple=128)
        w = int(2 * dim / 3) * 4
        return 128 * ((w + 127) // 128)

    assert heads * 128 == features and shape["blocks.0.attn.qknorm.qnorm.scale"] == (128,)
    assert shape["blocks.0.mlp.gate.weight"][0] == comfy_mlp(features)
    assert shape["txtfusion.refiner_blocks.0.mlp.gate.weight"][0] == comfy_mlp(txtdim)
    assert shape["txtfusion.refiner_blocks.0.attn.qknorm.qnorm.scale"] == (txtdim // 20,)  # 20 text heads
    assert shape["txtfusion.refiner_blocks.0.attn.wk.weight"][0] == txtdim  # 20 text kv heads
    assert shape["tmlp.0.weight"][1] == 256  # Comfy's fixed timestep embedding width
    assert shape["txtfusion.projector.weight"] == (1, 12)


def test_tokenizer_keeps_the_template_and_whole_words(paths):
    _, tokenizer = load_text_encoder(paths.text_encoder, dtype="float32")
    micro.check_tokenizer(tokenizer, world.WORDS)  # 34 + 5 template tokens; every caption word one token


# ------------------------------------------------------------------------------------------------ loaders
def test_project_loaders_and_variants(paths, parts):
    assert parts["raw"].krea2_variant == "raw" and parts["turbo"].krea2_variant == "turbo"
    with pytest.raises(ModelLoadError, match="Turbo"):
        load_transformer(paths.transformer_turbo, expect="raw")  # the trainer refuses to train on Turbo
    assert load_vae(paths.vae).config.z_dim == 16
    cfg = dict(parts["raw"].config)
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k in micro.MICRO_TRANSFORMER} == \
        {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in micro.MICRO_TRANSFORMER.items()}
    raw_w, turbo_w = parts["raw"].img_in.weight, parts["turbo"].img_in.weight
    assert not torch.equal(raw_w, turbo_w)  # Turbo is distilled, not a copy


def test_diffusers_classes_load_the_same_weights(paths, parts, tmp_path):
    from diffusers import AutoencoderKLQwenImage, Krea2Transformer2DModel
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

    config_dir = tmp_path / "transformer"
    Krea2Transformer2DModel.from_config(dict(micro.MICRO_TRANSFORMER)).save_config(config_dir)
    ref = Krea2Transformer2DModel.from_single_file(str(paths.transformer_raw), config=str(config_dir),
                                                   torch_dtype=torch.float32)
    mine = parts["raw"].state_dict()
    for key, value in ref.state_dict().items():
        assert torch.equal(value.float(), mine[key].float()), key
    vae = AutoencoderKLQwenImage.from_pretrained(paths.vae)
    assert vae.config.latents_std == parts["vae"].vae.config.latents_std
    Qwen3VLForConditionalGeneration.from_pretrained(paths.text_encoder)
    AutoTokenizer.from_pretrained(paths.text_encoder)


# ------------------------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("size", [64, 128, 256])
def test_turbo_samples_at_sizes(parts, size):
    settings = SampleSettings.turbo(height=size, width=size)
    (image,) = sample_images(parts["turbo"], parts["text"], parts["vae"], ["a red circle on a blue background"],
                             settings, [1])
    import numpy as np

    assert image.size == (size, size)
    assert np.asarray(image, dtype=np.float32).std() > 5  # a picture, not a flat field (or NaNs decoded as black)


def test_raw_samples_with_guidance(parts):
    settings = SampleSettings.raw(height=128, width=128, steps=12)
    images = sample_images(parts["raw"], parts["text"], parts["vae"], ["a red circle on a blue background"] * 4,
                           settings, [1, 2, 3, 4])
    readings = [read_image(im) for im in images]
    assert all(im.size == (128, 128) for im in images)
    assert sum(r.foreground == "red" and r.background == "blue" for r in readings) >= 3, readings


def test_text_encoder_keeps_captions_apart(parts):
    """The text encoder tells the colours apart, and is causal (roles: the next test)."""
    a, b = (parts["text"].encode_one(p) for p in ("a red circle on a blue background",
                                                   "a blue circle on a red background"))
    rel = ((a - b).norm(dim=-1) / a.norm(dim=-1))[:, -1]  # deepest tap, per token
    assert rel[1] > 0.5 and rel[5] > 0.5  # the two colour tokens
    assert rel[0] < 1e-4  # the same first word in the same place: the same state (causal)


def test_text_encoder_says_which_colour_is_the_shape(parts):
    """Krea 2's transformer sees every text token at one position, so a word's role must be in its own hidden
    state: "red" as the shape colour and "red" as the background colour differ at the deepest tap, by more than
    the random encoder managed (cosine 0.986); and the two colours still differ from each other in each role."""
    import itertools

    cos = torch.nn.functional.cosine_similarity
    colours = list(world.COLOURS)
    shape_role, ground_role = {c: [] for c in colours}, {c: [] for c in colours}
    for c, b in itertools.permutations(colours, 2):
        h = parts["text"].encode_one(f"a {c} circle on a {b} background")[:, -1]
        shape_role[c].append(h[1])
        ground_role[b].append(h[5])
    means = {c: (torch.stack(shape_role[c]).mean(0), torch.stack(ground_role[c]).mean(0)) for c in colours}
    same_word_other_role = sum(cos(f, g, 0) for f, g in means.values()) / len(colours)
    other_word_same_role = sum(cos(means[a][0], means[b][0], 0) for a, b in itertools.combinations(colours, 2)) / 28
    assert same_word_other_role < 0.8 and other_word_same_role < 0.9, (same_word_other_role, other_word_same_role)


# ---------------------------------------------------------------------------------------------- learnt
@pytest.mark.parametrize("variant", ["turbo", "raw"])
def test_prompt_following_subset(parts, variant):
    settings = SampleSettings.turbo(height=128, width=128) if variant == "turbo" else \
        SampleSettings.raw(height=128, width=128)
    result = prompt_following(parts[variant], parts["text"], parts["vae"], settings, count=FOLLOW_PROMPTS, seed=1)
    result.pop("images")
    assert result["background_accuracy"] >= FOLLOW_THRESHOLD, result
    assert result["colour_accuracy"] >= SHAPE_COLOUR_THRESHOLD, result


def test_prompt_following_check_can_fail(parts):
    """The same check on a model that does not read the prompt: a random micro transformer, and the shipped Turbo
    given another prompt's text (its colours shifted by one place in the palette)."""
    settings = SampleSettings.turbo(height=128, width=128)
    random_model = micro.build_transformer(seed=123)
    with torch.no_grad():
        for p in random_model.parameters():
            if p.ndim == 1 or p.abs().sum() == 0:
                p.copy_(0.1 * torch.randn_like(p))  # zero-initialised tables would make it output nothing
    result = prompt_following(random_model.eval(), parts["text"], parts["vae"], settings, count=FOLLOW_PROMPTS,
                              seed=1)
    result.pop("images")
    assert result["background_accuracy"] < FOLLOW_THRESHOLD, result
    assert result["colour_accuracy"] < SHAPE_COLOUR_THRESHOLD, result

    class ShiftedText:  # encodes each prompt with every colour replaced by the next palette colour
        names = list(world.COLOURS)

        def encode(self, prompts):
            def shift(p):
                return " ".join(self.names[(self.names.index(w) + 1) % len(self.names)] if w in self.names else w
                                for w in p.split())

            return parts["text"].encode([shift(p) for p in prompts])

    result = prompt_following(parts["turbo"], ShiftedText(), parts["vae"], settings, count=FOLLOW_PROMPTS, seed=1)
    result.pop("images")
    assert result["background_accuracy"] < FOLLOW_THRESHOLD, result
    assert result["colour_accuracy"] < SHAPE_COLOUR_THRESHOLD, result


# ------------------------------------------------------------------------------------------------ world
def test_world_is_seeded_and_read_back_exactly():
    a, cap_a, scene = world.world_item(3, 7)
    b, cap_b, _ = world.world_item(3, 7)
    assert cap_a == cap_b == scene.caption() and a.tobytes() == b.tobytes() and a.size == (128, 128)
    for i in range(40):
        image, _, scene = world.world_item(11, i)
        r = read_image(image)
        assert (r.background, r.foreground, r.shape) == (scene.background, scene.colour, scene.shape)
    assert len(set(world.all_captions())) == 8 * 7 * 3 * 3 * 6


def test_world_lacks_the_demo_style():
    """The demo posters (datasets/demo) have thick black outlines and cream paper; the world has neither."""
    import numpy as np

    cream = np.array([240, 230, 210], dtype=np.float32)
    for i in range(20):
        image, caption, scene = world.world_item(5, i)
        arr = np.asarray(image, dtype=np.float32)
        assert np.abs(arr - cream).sum(-1).min() > 30  # no cream pixel
        if "black" not in (scene.colour, scene.background):
            assert (arr.max(-1) < 60).mean() < 0.002  # no dark outline
        assert "poster" not in caption and "outline" not in caption


def test_vae_training_images_are_not_the_posters():
    """The VAE's broader images (broad_image, graphic_image) are drawn from their own rules, not the demo posters:
    as a set they sit as far from the posters' style as the world does (several times the posters' own spread)."""
    from krea2_train.evaluate.style import StyleReference

    ref = StyleReference.from_folder(ROOT / "datasets" / "demo")
    for images in ([world.graphic_image(5, i) for i in range(32)], [world.broad_image(5, i) for i in range(32)]):
        assert ref.distance(images) > 4 * ref.spread
    a, b = world.graphic_image(2, 3), world.graphic_image(2, 3)
    assert a.tobytes() == b.tobytes() and a.tobytes() != world.graphic_image(2, 4).tobytes()


def test_vae_keeps_the_poster_style(parts):
    """A LoRA can only show a style its VAE can decode: the posters' round trip through the shipped VAE stays close
    to the posters (the world, another style, is far)."""
    from krea2_train.evaluate.prompt_following import style_roundtrip

    got = style_roundtrip(parts["vae"], ROOT / "datasets" / "demo")
    assert got["distance_roundtrip"] < 0.25 * got["distance_world"], got


def test_single_frame_vae_path_is_exact():
    from krea2_train.models.fast_vae import single_frame_convs

    vae = micro.build_vae(base_dim=8).eval()
    pixels, _, _ = world.world_batch(0, 0, 2, size=32)
    with torch.no_grad():
        slow = vae.decode(vae.encode(pixels.unsqueeze(2)).latent_dist.mode()).sample
        with single_frame_convs():
            fast = vae.decode(vae.encode(pixels.unsqueeze(2)).latent_dist.mode()).sample
    assert torch.allclose(slow, fast, atol=1e-5)


def test_pretrain_checkpoint_round_trip(tmp_path):
    from krea2_train.train.micro_pretrain import _load_ckpt, _save_ckpt

    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    _save_ckpt(tmp_path / "c.safetensors", 5, model, opt)
    other = torch.nn.Linear(4, 3)
    opt2 = torch.optim.AdamW(other.parameters(), lr=0.1)
    assert _load_ckpt(tmp_path / "c.safetensors", other, opt2) == 5
    assert torch.equal(other.weight, model.weight)
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(opt.state[p]["exp_avg_sq"], opt2.state[q]["exp_avg_sq"])
