"""The VAE as ComfyUI ships it (`qwen_image_vae.safetensors`: one file, Wan 2.1 module names, no config) read by
load_vae with the whole architecture taken from the tensors; checked against the diffusers-folder VAE and against
ComfyUI's own Wan 2.1 VAE module (comfy/ldm/wan/vae.py, tests/_comfy_wan_vae.py) run on CPU."""

from __future__ import annotations

import ast
import json
import re

import pytest
import torch
from safetensors.torch import save_file

from krea2_train.models.comfy_files import REAL_VAE, VaeFileError, vae_file_config, wan_vae_to_diffusers
from krea2_train.models.loading import load_vae
from krea2_train.models.micro import MICRO_VAE, WEIGHTS_DIR
from krea2_train.models.vae import VAE

ARCH = ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "temperal_downsample", "input_channels")
_RES = {"norm1.gamma": "residual.0.gamma", "conv1": "residual.2", "norm2.gamma": "residual.3.gamma",
        "conv2": "residual.6", "conv_shortcut": "shortcut"}


def diffusers_to_wan(state: dict, num_res_blocks: int) -> dict:
    """The test's own diffusers -> Wan 2.1 name map (checked against ComfyUI's WanVAE state_dict keys, and by
    ComfyUI's module decoding the result like diffusers' does)."""
    def res(rest):
        for a, b in _RES.items():
            if rest.startswith(a + ".") or rest == a:
                return b + rest[len(a):]
        return rest

    out = {}
    for k, v in state.items():
        if m := re.match(r"^(encoder|decoder)\.conv_in\.(.*)$", k):
            n = f"{m[1]}.conv1.{m[2]}"
        elif m := re.match(r"^(encoder|decoder)\.norm_out\.(.*)$", k):
            n = f"{m[1]}.head.0.{m[2]}"
        elif m := re.match(r"^(encoder|decoder)\.conv_out\.(.*)$", k):
            n = f"{m[1]}.head.2.{m[2]}"
        elif m := re.match(r"^(post_)?quant_conv\.(.*)$", k):
            n = f"conv{2 if m[1] else 1}.{m[2]}"
        elif m := re.match(r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.*)$", k):
            n = f"{m[1]}.middle.{2 * int(m[2])}.{res(m[3])}"
        elif m := re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.*)$", k):
            n = f"{m[1]}.middle.1.{m[2]}"
        elif m := re.match(r"^encoder\.down_blocks\.(\d+)\.(.*)$", k):
            n = f"encoder.downsamples.{m[1]}.{res(m[2])}"
        elif m := re.match(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$", k):
            n = f"decoder.upsamples.{int(m[1]) * (num_res_blocks + 2) + int(m[2])}.{res(m[3])}"
        elif m := re.match(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)$", k):
            n = f"decoder.upsamples.{int(m[1]) * (num_res_blocks + 2) + num_res_blocks + 1}.{m[2]}"
        else:
            raise AssertionError(k)
        out[n] = v
    return out


@pytest.fixture(scope="module")
def comfy():
    import _comfy_wan_vae

    ns = _comfy_wan_vae.load()
    if ns is None:
        pytest.skip("ComfyUI source not available (tests/_comfy_source.COMFYUI_GIT)")
    return ns


def comfy_wan_vae(comfy, cfg: dict):
    """ComfyUI's WanVAE for a diffusers config, built as comfy/sd.py builds the Wan 2.1 VAE (but with this
    config's depth: sd.py fixes dim_mult [1, 2, 4, 4] and 2 res blocks)."""
    return comfy.vae.WanVAE(dim=cfg["base_dim"], z_dim=cfg["z_dim"], dim_mult=list(cfg["dim_mult"]),
                            num_res_blocks=cfg["num_res_blocks"], attn_scales=[],
                            temperal_downsample=list(cfg["temperal_downsample"]),
                            image_channels=cfg.get("input_channels", 3), conv_out_channels=cfg.get("input_channels", 3),
                            dropout=0.0)


def shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.mark.parametrize("which", ["micro", "real"])
def test_wan_names_match_comfyui_module(comfy, which):
    """Both name maps against ComfyUI's module's own state_dict; for the real VAE also against diffusers'
    convert_wan_vae_to_diffusers (right for 2 res blocks, wrong for the micro VAE's 1)."""
    from diffusers import AutoencoderKLQwenImage
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    cfg = {**REAL_VAE} if which == "real" else {**REAL_VAE, **MICRO_VAE}
    with torch.device("meta"):
        ours = AutoencoderKLQwenImage(**{k: cfg[k] for k in ARCH}).state_dict()
        theirs = comfy_wan_vae(comfy, cfg).state_dict()
    assert shapes(diffusers_to_wan(ours, cfg["num_res_blocks"])) == shapes(theirs)
    arch = vae_file_config(theirs, {"config": json.dumps({"latents_mean": [0.0] * 16, "latents_std": [1.0] * 16})},
                           "x.safetensors")
    assert {k: arch[k] for k in REAL_VAE} == {k: cfg[k] for k in REAL_VAE}
    assert shapes(wan_vae_to_diffusers(theirs, arch, "x.safetensors")) == shapes(ours)
    diffusers_map = shapes(convert_wan_vae_to_diffusers(theirs))
    assert (diffusers_map == shapes(ours)) == (which == "real")


def test_real_vae_facts_match_comfyui(comfy):
    """comfy/sd.py's Wan 2.1 VAE config (what it builds for qwen_image_vae.safetensors) is REAL_VAE at width 96, and
    the normalisation ComfyUI applies to Krea 2 latents (supported_models.Krea2's latent_formats.Wan21, scale 1;
    nothing from the file) is diffusers' AutoencoderKLQwenImage default, which a config-less real-size file gets."""
    import inspect

    from _comfy_source import source
    from diffusers import AutoencoderKLQwenImage

    src = source("comfy/sd.py")
    line = next(x for x in src[src.index("# Wan 2.1 VAE"):].splitlines() if "ddconfig = " in x)
    sd_cfg = ast.literal_eval(re.sub(r"\b(dim|self\.\w+)\b(?=[,}])", "None", line.split("ddconfig = ", 1)[1]))
    assert sd_cfg["z_dim"] is None and "self.latent_channels = 16" in src[src.index("# Wan 2.1 VAE"):][:800]
    assert sd_cfg["dim_mult"] == REAL_VAE["dim_mult"] and sd_cfg["num_res_blocks"] == REAL_VAE["num_res_blocks"]
    assert sd_cfg["temperal_downsample"] == REAL_VAE["temperal_downsample"] and sd_cfg["attn_scales"] == []
    models = source("comfy/supported_models.py")
    krea2 = models[models.index("class Krea2("):]
    assert re.search(r"^    latent_format = latent_formats\.Wan21$", krea2.split("\nclass ", 1)[0], re.M)
    with torch.device("meta"):
        wan = comfy_wan_vae(comfy, REAL_VAE).state_dict()
    assert wan["decoder.head.0.gamma"].shape[0] == 96  # the width sd.py reads
    cfg = vae_file_config(wan, {}, "qwen_image_vae.safetensors")
    assert "latents_mean" not in cfg  # -> the class defaults
    defaults = inspect.signature(AutoencoderKLQwenImage.__init__).parameters
    fmt = comfy.Wan21()
    assert fmt.scale_factor == 1.0
    torch.testing.assert_close(fmt.latents_mean.flatten(), torch.tensor(defaults["latents_mean"].default),
                               rtol=0, atol=0)
    torch.testing.assert_close(fmt.latents_std.flatten(), torch.tensor(defaults["latents_std"].default),
                               rtol=0, atol=0)


def _diffusers_folder(which, tiny_dir):
    return WEIGHTS_DIR / "vae" if which == "micro" else tiny_dir / "vae"


def _wan_file(which, tiny_dir, tmp_path):
    """(diffusers-folder VAE, its config, its tensors in Wan names, the file of them + its latents stats header)."""
    folder = load_vae(_diffusers_folder(which, tiny_dir))
    cfg = dict(folder.config)
    wan = diffusers_to_wan({k: v.contiguous() for k, v in folder.state_dict().items()}, cfg["num_res_blocks"])
    path = tmp_path / "qwen_image_vae.safetensors"
    save_file(wan, path, metadata={"config": json.dumps({k: cfg[k] for k in ("latents_mean", "latents_std")})})
    return folder, cfg, wan, path


@pytest.mark.parametrize("which", ["micro", "tiny"])
def test_wan_file_reads_exactly(which, tiny_dir, tmp_path, one_torch_thread):
    """The micro/tiny VAE written in ComfyUI's names (+ its latents stats in the header) loads as the diffusers
    folder does: same weights, same encode/decode."""
    folder, cfg, wan, path = _wan_file(which, tiny_dir, tmp_path)
    single = load_vae(path)
    assert {k: single.config[k] for k in ARCH + ("latents_mean", "latents_std")} == \
        {k: cfg[k] for k in ARCH + ("latents_mean", "latents_std")}
    theirs = folder.state_dict()
    for k, v in single.state_dict().items():
        assert torch.equal(v, theirs[k]), k
    pixels = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    a, b = VAE(folder), VAE(single)
    z = a.encode(pixels)
    assert torch.equal(z, b.encode(pixels)) and torch.equal(a.decode(z), b.decode(z))


@pytest.mark.parametrize("which", ["micro", "tiny"])
def test_wan_file_is_what_comfyui_module_reads(comfy, which, tiny_dir, tmp_path, one_torch_thread):
    """ComfyUI's own WanVAE loads those Wan-named tensors strictly and encodes/decodes as the diffusers VAE does
    (so the names the file was written in are ComfyUI's)."""
    folder, cfg, wan, _ = _wan_file(which, tiny_dir, tmp_path)
    pixels = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ref = comfy_wan_vae(comfy, cfg).eval()
    ref.load_state_dict(wan, strict=True)
    with torch.no_grad():
        mu = folder.encode(pixels.unsqueeze(2)).latent_dist.mode()
        mu_c = ref.encode(pixels.unsqueeze(2))
        x = folder.decode(mu).sample
        x_c = ref.decode(mu)
    err_enc = float((mu - mu_c).abs().max() / mu.abs().max())
    err_dec = float((x - x_c).abs().max() / x.abs().max())
    print(f"{which}: ComfyUI WanVAE vs diffusers: encode rel err {err_enc:.2e}, decode rel err {err_dec:.2e}")
    assert mu_c.shape == mu.shape and x_c.shape == x.shape
    assert err_enc < 1e-5 and err_dec < 1e-5


def test_wan_file_without_normalisation_refused(tmp_path):
    """A config-less file of another size than the real VAE: the latents' mean/std are not in the tensors and Wan
    2.1's belong to the real VAE, so it is refused naming the file and the fix."""
    folder = load_vae(WEIGHTS_DIR / "vae")
    wan = diffusers_to_wan({k: v.contiguous() for k, v in folder.state_dict().items()}, 1)
    path = tmp_path / "small_vae.safetensors"
    save_file(wan, path)
    with pytest.raises(VaeFileError, match=r"small_vae\.safetensors.*latents_mean.*config"):
        load_vae(path)
    save_file({k: v for k, v in folder.state_dict().items()}, tmp_path / "diffusers_names.safetensors")
    with pytest.raises(VaeFileError, match="diffusers_names.safetensors"):  # diffusers names: the same rule
        load_vae(tmp_path / "diffusers_names.safetensors")


def test_damaged_wan_files_refused(tmp_path):
    folder = load_vae(WEIGHTS_DIR / "vae")
    cfg = dict(folder.config)
    stats = {k: cfg[k] for k in ("latents_mean", "latents_std")}
    wan = diffusers_to_wan({k: v.contiguous() for k, v in folder.state_dict().items()}, 1)
    cases = {
        "header_disagrees": (wan, {**stats, "dim_mult": [1, 2, 4, 4]}, r"dim_mult=\[1, 2, 4, 4\] in the header"),
        "missing_tensor": ({k: v for k, v in wan.items() if k != "decoder.upsamples.4.residual.6.bias"}, stats,
                           r"missing \['decoder.up_blocks.1.resnets.1.conv2.bias'\]"),
        "stray_tensor": ({**wan, "decoder.extra.weight": torch.zeros(1)}, stats, "decoder.extra.weight"),
        "one_stat": (wan, {"latents_mean": stats["latents_mean"]}, "latents_std"),
        "no_head": ({k: v for k, v in wan.items() if not k.startswith("encoder.head.2")}, stats, "not a complete"),
    }
    for name, (state, header, match) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(state, path, metadata={"config": json.dumps(header)})
        with pytest.raises(VaeFileError if name != "missing_tensor" else Exception, match=match):
            load_vae(path)
        with pytest.raises(Exception, match=re.escape(str(path))):
            load_vae(path)
