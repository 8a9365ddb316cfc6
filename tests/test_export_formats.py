"""Export formats: each layout written from a trained tiny adapter loads back (our reader, the inference core and,
where it accepts the layout, diffusers' own Krea2Pipeline.load_lora_weights) with the trained deltas; peer layouts
round-trip; bad files get clear errors."""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_export_helpers import (
    PEER_LAYOUTS,
    loaded_deltas,
    max_delta_error,
    max_loaded_error,
    peer_state,
    trained_adapter,
    trained_transformer,
)

from krea2_train.lora.formats import FORMATS, LoraFormatError, TrainedAdapter, read_lora_file, read_lora_state
from krea2_train.lora.writers import write_lora_file


@pytest.fixture(scope="module")
def adapter(tiny_dir):
    # Mixed ranks and alphas, rsLoRA: the cases where a scale gets lost or doubled.
    return trained_adapter(tiny_dir, use_rslora=True, r=4, alpha=8, rank_pattern={"ff.down": 2},
                           alpha_pattern={"to_gate": 3})


@pytest.fixture(scope="module")
def turbo(tiny_dir):
    from krea2_train.models.loading import load_transformer

    return load_transformer(tiny_dir / "transformer_turbo.safetensors", dtype="float32")


def _diffusers_pipe(transformer):
    from diffusers import FlowMatchEulerDiscreteScheduler, Krea2Pipeline

    return Krea2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                         transformer=transformer)


@pytest.mark.parametrize("rslora", [False, True])
def test_adapter_delta_equals_peft_delta(tiny_dir, rslora):
    model = trained_transformer(tiny_dir, use_rslora=rslora, rank_pattern={"ff.down": 2}, alpha_pattern={"to_q": 5})
    adapter = TrainedAdapter.from_model(model)
    assert max_loaded_error(adapter, model, "default") < 1e-6
    assert adapter.rank("transformer_blocks.0.ff.down") == 2 and adapter.alpha["transformer_blocks.1.attn.to_q"] == 5


@pytest.mark.parametrize("fmt", FORMATS)
def test_format_roundtrip_and_loaders(adapter, turbo, tmp_path, fmt):
    from krea2_train.inference import apply_lora

    path = write_lora_file(adapter, tmp_path / f"lora_{fmt}.safetensors", fmt, dtype="float32")
    with safe_open(str(path), "pt") as f:
        keys, header = list(f.keys()), f.metadata()
    assert not any("qkv" in k for k in keys)  # q/k/v are never fused
    alpha_tensors = [k for k in keys if k.endswith(".alpha")]
    if fmt == "diffusers":
        assert all(k.startswith("transformer.transformer_blocks.") or k.startswith("transformer.") for k in keys)
        # scale baked (ComfyUI reads these keys and ignores the header): the header says alpha = rank, no rsLoRA
        cfg = json.loads(header["lora_adapter_metadata"])
        assert not alpha_tensors and cfg["transformer.use_rslora"] is False
        assert cfg["transformer.lora_alpha"] == cfg["transformer.r"]
    elif fmt in ("comfyui", "civitai"):
        assert all(k.startswith("diffusion_model.") for k in keys)
        assert "diffusion_model.blocks.0.attn.wq.lora_down.weight" in keys and alpha_tensors
        assert "lora_adapter_metadata" not in header  # scale carried once: in the .alpha tensors
    elif fmt == "original":
        assert not alpha_tensors and "lora_adapter_metadata" not in header  # baked
    elif fmt == "musubi":
        assert "lora_unet_blocks_0_attn_wq.alpha" in keys

    lora = read_lora_file(path)
    assert max_delta_error(adapter, lora.adapter) < 1e-6

    # The inference core's loader (what `sample` and `verify` use).
    name = apply_lora(turbo, path, adapter_name=f"ours_{fmt}")
    try:
        assert max_loaded_error(adapter, turbo, name) < 1e-5
    finally:
        turbo.delete_adapters([name])

    # diffusers' own pipeline loader: accepts diffusers/original layouts with the same effect, rejects .alpha ones.
    pipe = _diffusers_pipe(turbo)
    if lora.diffusers_problem is None:
        pipe.load_lora_weights(str(path), adapter_name=f"d_{fmt}")
        try:
            assert max_loaded_error(adapter, turbo, f"d_{fmt}") < 1e-5
        finally:
            turbo.delete_adapters([f"d_{fmt}"])
    else:
        assert fmt in ("comfyui", "civitai", "musubi")
        try:  # diffusers raises on .alpha/lora_down under diffusion_model.; lora_unet_ keys it silently skips
            pipe.load_lora_weights(str(path), adapter_name=f"d_{fmt}")
            assert fmt == "musubi" and not loaded_deltas(turbo, f"d_{fmt}")
        except ValueError:
            assert fmt != "musubi"
        for n in list(getattr(turbo, "peft_config", {})):
            turbo.delete_adapters([n])


def test_comfyui_baked_loads_in_diffusers_too(adapter, turbo, tmp_path):
    path = write_lora_file(adapter, tmp_path / "baked.safetensors", "comfyui", dtype="float32", comfyui_style="baked")
    with safe_open(str(path), "pt") as f:
        assert not [k for k in f.keys() if k.endswith(".alpha")]
    lora = read_lora_file(path)
    assert lora.layout == "original" and lora.diffusers_problem is None
    _diffusers_pipe(turbo).load_lora_weights(str(path), adapter_name="baked")
    try:
        assert max_loaded_error(adapter, turbo, "baked") < 1e-5
    finally:
        turbo.delete_adapters(["baked"])


@pytest.mark.parametrize("layout", PEER_LAYOUTS)
def test_peer_layouts_read_and_convert(adapter, tmp_path, layout):
    state, header = peer_state(adapter, layout)
    src = tmp_path / f"{layout}.safetensors"
    save_file(state, str(src), metadata=header or None)
    lora = read_lora_file(src)
    assert max_delta_error(adapter, lora.adapter) < 1e-5
    for fmt in FORMATS:  # convert to every format and back
        out = write_lora_file(lora.adapter, tmp_path / f"{layout}_{fmt}.safetensors", fmt, dtype="float32")
        assert max_delta_error(adapter, read_lora_file(out).adapter) < 1e-5


def test_peft_folder_with_adapter_config(adapter, tmp_path):
    """PEFT's save_pretrained layout: base_model.model.<diffusers> keys, alpha in a sibling adapter_config.json."""
    folder = tmp_path / "peft"
    folder.mkdir()
    state = {f"base_model.model.{k}": v.contiguous() for k, v in adapter.peft_state_dict().items()}
    save_file(state, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(adapter.lora_config_dict()))
    lora = read_lora_file(folder)
    assert lora.layout == "peft" and lora.alpha_source == "adapter_config.json"
    assert max_delta_error(adapter, lora.adapter) < 1e-6


def test_diffusers_layout_loads_through_diffusers_from_dict(adapter, turbo):
    """read_lora_for_diffusers gives what load_lora_adapter takes, with the scale in its metadata."""
    from krea2_train.lora.writers import read_lora_for_diffusers

    state, meta = read_lora_for_diffusers(peer_state(adapter, "musubi")[0])
    turbo.load_lora_adapter(state, prefix="transformer", adapter_name="dict", metadata=meta)
    try:
        assert max_loaded_error(adapter, turbo, "dict") < 1e-5
    finally:
        turbo.delete_adapters(["dict"])


def test_civitai_header(adapter, tmp_path):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (640, 320), (200, 30, 30)).save(buf, format="PNG")
    info = dict(name="red_style", trigger_words=["r3d style"], resolution=1024, steps=1500, dataset_size=24,
                turbo_strength=1.25)
    path = write_lora_file(adapter, tmp_path / "c.safetensors", "civitai", metadata=info, preview_png=buf.getvalue())
    with safe_open(str(path), "pt") as f:
        h = f.metadata()
        alpha = f.get_tensor("diffusion_model.blocks.0.attn.wq.alpha").item()
    assert h["modelspec.sai_model_spec"] == "1.0.0" and h["modelspec.architecture"] == "Krea-2/lora"
    assert h["modelspec.trigger_phrase"] == "r3d style" and h["modelspec.resolution"] == "1024x1024"
    assert h["ss_max_train_steps"] == "1500" and h["ss_num_train_images"] == "24"
    assert "Turbo" in h["modelspec.usage_hint"] and "1.25" in h["modelspec.usage_hint"]
    assert float(h["ss_network_alpha"]) == pytest.approx(alpha, rel=1e-5)  # informational, equals the tensors
    assert h["ss_network_dim"] == "4"
    png = base64.b64decode(h["modelspec.thumbnail"].split(",", 1)[1])
    assert Image.open(io.BytesIO(png)).size == (256, 128)  # shrunk to a thumbnail
    assert json.loads(h["krea2_train.info"])["trigger_words"] == ["r3d style"]


# ----------------------------------------------------------------------------------------------- errors
def test_error_wrong_model(tmp_path):
    flux = {"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(4, 8),
            "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(24, 4)}
    save_file(flux, str(tmp_path / "flux.safetensors"))
    with pytest.raises(LoraFormatError, match=r"flux\.safetensors.*do not map to a Krea 2.*fused q/k/v"):
        read_lora_file(tmp_path / "flux.safetensors")
    sdxl = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)}
    with pytest.raises(LoraFormatError, match="another model"):
        read_lora_state(sdxl, source="sdxl.safetensors")


def test_error_not_a_lora(tiny_dir):
    with pytest.raises(LoraFormatError, match="not LoRA weights.*full checkpoint"):
        read_lora_file(tiny_dir / "transformer_turbo.safetensors")


def test_error_missing_tensors(adapter):
    state, _ = peer_state(adapter, "comfyui")
    del state["diffusion_model.blocks.1.mlp.up.lora_up.weight"]
    with pytest.raises(LoraFormatError, match=r"missing tensors.*blocks\.1\.ff\.up|missing tensors"):
        read_lora_state(state, source="x.safetensors")
    state, _ = peer_state(adapter, "musubi")
    del state["lora_unet_blocks_0_attn_wq.alpha"]
    with pytest.raises(LoraFormatError, match="alpha for some modules"):
        read_lora_state(state, source="x.safetensors")


def test_error_mismatched_shapes(adapter):
    state, _ = peer_state(adapter, "comfyui")
    state["diffusion_model.blocks.0.attn.wq.lora_up.weight"] = torch.zeros(128, 3)
    with pytest.raises(LoraFormatError, match=r"mismatched shapes at diffusion_model\.blocks\.0\.attn\.wq"):
        read_lora_state(state, source="x.safetensors")


def test_error_alpha_where_diffusers_rejects_it(adapter, turbo, tmp_path):
    """A diffusers-named file with .alpha tensors: diffusers' loader fails; we name the problem and the fix."""
    state = {k: v.contiguous() for k, v in adapter.peft_state_dict("transformer.").items()}
    for m in adapter.modules:
        state[f"transformer.{m}.alpha"] = torch.tensor(adapter.kohya_alphas()[m])
    save_file(state, str(tmp_path / "bad.safetensors"))
    lora = read_lora_file(tmp_path / "bad.safetensors")
    assert max_delta_error(adapter, lora.adapter) < 1e-5  # we still read it right (alpha = kohya semantics)
    assert "alpha" in lora.diffusers_problem and "convert" in lora.diffusers_problem
    with pytest.raises(Exception):
        _diffusers_pipe(turbo).load_lora_weights(str(tmp_path / "bad.safetensors"), adapter_name="bad")
    for n in list(getattr(turbo, "peft_config", {})):
        turbo.delete_adapters([n])


def test_error_unsupported_adapter_types():
    with pytest.raises(LoraFormatError, match="DoRA"):
        read_lora_state({"transformer.img_in.lora_magnitude_vector": torch.zeros(3)}, source="d.safetensors")
    with pytest.raises(LoraFormatError, match="LoKr"):
        read_lora_state({"lora_unet_blocks_0_attn_wq.lokr_w1": torch.zeros(3)}, source="k.safetensors")
    with pytest.raises(LoraFormatError, match="sample --turbo-lora.*without --deltas"):  # a Turbo LoRA's deltas
        read_lora_state({"diffusion_model.blocks.0.attn.wq.lora_down.weight": torch.zeros(2, 4),
                         "diffusion_model.blocks.0.attn.q_norm.weight.diff": torch.zeros(4)}, source="t.safetensors")



def test_model_diffusion_model_prefix_is_not_a_diff(adapter, tmp_path):
    """ComfyUI's `model.diffusion_model.` prefix holds ".diff": a plain LoRA under it reads as the LoRA it is."""
    path = write_lora_file(adapter, tmp_path / "c.safetensors", "comfyui", dtype="float32")
    with safe_open(str(path), framework="pt") as h:
        state = {"model." + k: h.get_tensor(k) for k in h.keys()}
    lora = read_lora_state(state, source="m.safetensors").adapter
    assert lora.modules == adapter.modules
    for name in adapter.modules:
        assert torch.allclose(lora.delta(name), adapter.delta(name), atol=1e-6), name


def test_reads_what_diffusers_save_lora_weights_writes(tiny_dir, tmp_path):
    """The reference diffusers layout: Krea2Pipeline.save_lora_weights with the PEFT config as adapter metadata."""
    from diffusers import Krea2Pipeline
    from peft import get_peft_model_state_dict

    model = trained_transformer(tiny_dir, seed=3, r=4, alpha=2, use_rslora=True, alpha_pattern={"ff.up": 7})
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in model.peft_config["default"].to_dict().items()}
    Krea2Pipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(model),
                                    transformer_lora_adapter_metadata=config)
    lora = read_lora_file(tmp_path)  # the folder: pytorch_lora_weights.safetensors inside
    assert lora.layout == "diffusers" and lora.alpha_source == "header"
    assert max_loaded_error(lora.adapter, model, "default") < 1e-6


def test_lora_for_a_deeper_model_is_rejected_on_verify(adapter, turbo, tmp_path):
    from krea2_train.export.verify import LoraVerifyError, verify_lora_file

    m = "transformer_blocks.0.attn.to_q"
    deep = TrainedAdapter({"transformer_blocks.27.attn.to_q": adapter.down[m]},
                          {"transformer_blocks.27.attn.to_q": adapter.up[m]}, {"transformer_blocks.27.attn.to_q": 4.0})
    path = write_lora_file(deep, tmp_path / "deep.safetensors", "comfyui")
    with pytest.raises(LoraVerifyError, match=r"deep\.safetensors: modules \['transformer_blocks\.27.*another"):
        verify_lora_file(path, transformer=turbo)


@pytest.mark.parametrize("fmt", ["comfyui", "civitai", "original", "musubi"])
def test_comfyui_side_names_are_checkpoint_weights(adapter, tiny_dir, tmp_path, fmt):
    """ComfyUI maps a LoRA key `diffusion_model.<name>` (or `lora_unet_<name with _>`) to checkpoint weight
    `<name>.weight`: every module in these files must be a weight of the official single-file checkpoint."""
    with safe_open(str(tiny_dir / "transformer_turbo.safetensors"), "pt") as f:
        weights = {k[: -len(".weight")] for k in f.keys() if k.endswith(".weight")}
    flat = {w.replace(".", "_"): w for w in weights}
    path = write_lora_file(adapter, tmp_path / "x.safetensors", fmt)
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    modules = {k.rsplit(".", 2 if k.endswith(".weight") else 1)[0] for k in keys}
    for m in modules:
        if fmt == "musubi":
            assert m.startswith("lora_unet_") and m[len("lora_unet_"):] in flat, m
        else:
            assert m.startswith("diffusion_model.") and m[len("diffusion_model."):] in weights, m
    assert len(modules) == len(adapter.modules)


def test_civitai_baked_header_describes_the_file(adapter, tmp_path):
    path = write_lora_file(adapter, tmp_path / "b.safetensors", "civitai", comfyui_style="baked")
    with safe_open(str(path), "pt") as f:
        h, keys = f.metadata(), list(f.keys())
    assert not [k for k in keys if k.endswith(".alpha")] and h["ss_network_alpha"] == h["ss_network_dim"]
    assert max_delta_error(adapter, read_lora_file(path).adapter) < 2e-2


@pytest.mark.parametrize("fmt", ["original", "comfyui", "diffusers"])
def test_sidecar_adapter_config_does_not_rescale_other_files(tiny_dir, tmp_path, fmt):
    """A file written next to a PEFT adapter_config.json (e.g. converted into RUN/adapter) keeps its own scale."""
    import json

    from test_export_helpers import max_delta_error, trained_adapter

    from krea2_train.lora.formats import read_lora_file
    from krea2_train.lora.writers import write_lora_file

    adapter = trained_adapter(tiny_dir, r=4, alpha=8)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 1, "peft_type": "LORA"}))
    path = write_lora_file(adapter, tmp_path / f"lora_{fmt}.safetensors", fmt, dtype="float32")
    assert max_delta_error(adapter, read_lora_file(path).adapter) < 1e-6
