"""An edit LoRA exported here runs in ComfyUI's native Krea 2 graph as `sample --reference` runs it (issue 17's "done
means"): the exported ComfyUI file, patched onto the micro Turbo by ComfyUI's own LoRA code (comfy/lora.py, as
LoraLoaderModelOnly does), run by ComfyUI's own Krea 2 model (comfy/ldm/krea2/model.py, SingleStreamDiT) with
`ref_latents` (ReferenceLatent) and `ref_latents_method` (FluxKontextMultiReferenceLatentMethod), gives at every
step of our 8-step Turbo sampler the velocity our reference forward gives, and Euler over those velocities ends on
our sample's latents. The micro transformer's sizes are ones ComfyUI builds, so the whole model is ComfyUI's here,
text fusion included. (ComfyUI's VAEEncode + latent format giving our normalised latents, and its simple schedule
giving our sigmas, are pinned in test_comfy_vae.py and test_schedule*.py.) Skips without the ComfyUI source.
"""

from __future__ import annotations

import types

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def comfy():
    import _comfy_krea2
    import _comfy_source

    krea2, lora_code = _comfy_krea2.load(), _comfy_source.load()
    if krea2 is None or lora_code is None:
        pytest.skip("ComfyUI source not available")
    return krea2, lora_code


@pytest.fixture(scope="module")
def edit_lora(tmp_path_factory):
    """A LoRA on the micro model (random factors, as after training) in the ComfyUI layout the export writes."""
    from test_export_helpers import trained_transformer

    from krea2_train.lora.formats import TrainedAdapter
    from krea2_train.lora.writers import write_lora_file
    from krea2_train.models.micro import WEIGHTS_DIR

    adapter = TrainedAdapter.from_model(trained_transformer(WEIGHTS_DIR, r=4, alpha=1, seed=3))
    return write_lora_file(adapter, tmp_path_factory.mktemp("edit") / "edit_comfyui.safetensors", "comfyui",
                           dtype="float32")


def _comfy_turbo(comfy, lora_file):
    """ComfyUI's SingleStreamDiT with the micro Turbo's weights, the LoRA patched in by ComfyUI's own code."""
    from _comfy_source import patch
    from safetensors import safe_open
    from safetensors.torch import load_file
    from test_export_helpers import comfyui_key_map

    from krea2_train.models.micro import MICRO_TRANSFORMER as M
    from krea2_train.models.micro import WEIGHTS_DIR

    krea2, lora_code = comfy
    turbo_file = WEIGHTS_DIR / "transformer_turbo.safetensors"
    with safe_open(str(turbo_file), "pt") as f:
        weights = {"diffusion_model." + k: f.get_tensor(k).float() for k in f.keys()}
    patched, not_loaded, errors = patch(lora_code, load_file(str(lora_file)), comfyui_key_map(turbo_file), weights)
    assert patched and not not_loaded and not errors, (not_loaded, errors)
    weights.update(patched)
    # what comfy/model_detection.py reads off the file; the rest (tdim, multiplier, text heads) are ComfyUI's
    # defaults, which the micro sizes were chosen to fit
    model = krea2.SingleStreamDiT(
        features=M["num_attention_heads"] * M["attention_head_dim"], txtdim=M["text_hidden_dim"],
        heads=M["num_attention_heads"], kvheads=M["num_key_value_heads"], layers=M["num_layers"],
        txtlayers=M["num_text_layers"], operations=types.SimpleNamespace(Linear=torch.nn.Linear))
    missing, unexpected = model.load_state_dict({k[len("diffusion_model."):]: v for k, v in weights.items()},
                                                strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model.float().eval()


@pytest.mark.parametrize("method", ["index", "index_timestep_zero"])
@torch.no_grad()
def test_edit_lora_in_comfyui_graph_samples_as_ours(comfy, edit_lora, method):
    import krea2_train.inference as inference
    from krea2_train.data import world
    from krea2_train.inference import SampleSettings, apply_lora, sample_latents
    from krea2_train.models.micro import load_micro
    from krea2_train.schedule import pack_latents, unpack_latents

    turbo, text_encoder, vae = load_micro("turbo")
    image, _, _ = world.world_item(5, 0)
    ref = vae.encode(world.to_tensor([image]))  # (1, 16, 16, 16) normalised, as ComfyUI's model gets VAEEncode's
    embeds, mask = text_encoder.encode(["make the shape red"])
    settings = SampleSettings.turbo(height=128, width=128, seed=4)

    calls, real = [], inference.predict_velocity

    def record(transformer, packed, sigma, *a, **kw):
        v = real(transformer, packed, sigma, *a, **kw)
        calls.append((packed.clone(), sigma.clone(), v.float().clone()))
        return v

    name = apply_lora(turbo, str(edit_lora), strength=1.0, adapter_name="edit")
    inference.predict_velocity = record
    try:
        ours = sample_latents(turbo, embeds, mask, settings, references=[ref], reference_method=method)
        turbo.disable_adapters()
        plain = sample_latents(turbo, embeds, mask, settings, references=[ref], reference_method=method)
    finally:
        inference.predict_velocity = real
        turbo.delete_adapters([name])
    steps = calls[:len(calls) // 2]
    assert len(steps) == settings.steps

    model = _comfy_turbo(comfy, edit_lora)
    context = embeds.flatten(2).float()  # ComfyUI carries the 12 taps flattened: (B, L, 12 * D)
    x = steps[0][0]
    for k, (packed, sigma, v_ours) in enumerate(steps):
        v_theirs = model(unpack_latents(packed, 16, 16), sigma, context, ref_latents=[ref],
                         ref_latents_method=method)
        torch.testing.assert_close(v_theirs, unpack_latents(v_ours, 16, 16), rtol=1e-4, atol=1e-4)
        v = model(unpack_latents(x, 16, 16), sigma, context, ref_latents=[ref], ref_latents_method=method)
        sigma_next = steps[k + 1][1] if k + 1 < len(steps) else torch.zeros_like(sigma)
        x = x + (sigma_next - sigma).view(-1, 1, 1) * pack_latents(v)  # Euler, as ComfyUI's sampler steps
    theirs = unpack_latents(x, 16, 16)
    torch.testing.assert_close(theirs, ours, rtol=1e-3, atol=1e-3)
    assert (plain - ours).abs().max() > 0.05  # the LoRA changes the sample: the comparison can fail
