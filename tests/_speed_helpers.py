"""Shared set-up for the speed/memory tests: the tiny Krea 2 with a LoRA, inputs, and a loss that touches the
LoRA and the inputs so gradients can be compared."""

from __future__ import annotations

import copy

import torch

TARGETS = r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|to_gate)|ff\.(gate|up|down))"


def tiny_model(dtype=torch.float32):
    from krea2_train.models.tiny import build_tiny_transformer

    return build_tiny_transformer().to(dtype)


def add_lora(model, rank: int = 4, seed: int = 0):
    """LoRA on attention + MLP of the blocks, with non-zero B so the adapter changes the output from step 0."""
    from peft import LoraConfig

    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights="gaussian"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen).to(p.dtype))
    return model


def inputs(batch=2, text_len=10, lengths=(10, 6), hw=(4, 4), seed=0, dtype=torch.float32):
    """Packed latents, text states, sigma, position ids and a right-padded text mask."""
    gen = torch.Generator().manual_seed(seed)
    h, w = hw
    img = h * w
    hidden = torch.randn(batch, img, 64, generator=gen).to(dtype)
    text = torch.randn(batch, text_len, 12, 32, generator=gen).to(dtype)
    sigma = torch.rand(batch, generator=gen)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    img_pos = torch.stack([torch.zeros(img, dtype=torch.long), rows.flatten(), cols.flatten()], dim=1)
    pos = torch.cat([torch.zeros(text_len, 3, dtype=torch.long), img_pos], dim=0)
    mask = torch.zeros(batch, text_len, dtype=torch.bool)
    for i, n in enumerate(lengths[:batch]):
        mask[i, :n] = True
    return dict(hidden_states=hidden, encoder_hidden_states=text, timestep=sigma, position_ids=pos,
                encoder_attention_mask=mask)


def run(model, batch, target_seed=1):
    """Forward + MSE loss against a fixed target; returns (output, {trainable name: grad}, input grad)."""
    batch = dict(batch)
    batch["hidden_states"] = batch["hidden_states"].clone().requires_grad_(True)
    for p in model.parameters():
        p.grad = None
    out = model(**batch, return_dict=False)[0]
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(target_seed)).to(out.device, out.dtype)
    loss = ((out.float() - target.float()) ** 2).mean()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), grads, batch["hidden_states"].grad.detach().clone()


def twin(model):
    return copy.deepcopy(model)


def assert_close_grads(a, b, atol, rtol):
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")
