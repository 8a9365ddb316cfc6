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


def assert_same_run(a, b):
    """Two `run` results (output, LoRA grads, input grad) equal bit for bit."""
    torch.testing.assert_close(a[0], b[0], atol=0, rtol=0)
    assert_close_grads(a[1], b[1], atol=0, rtol=0)
    torch.testing.assert_close(a[2], b[2], atol=0, rtol=0)


def assert_close_grads(a, b, atol, rtol):
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------------------------------- bf16 autocast training
def trainer_like(model):
    """bf16 base with fp32 LoRA weights, as krea2_train.train.lora.add_lora leaves it for training."""
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


def bf16_inputs(**kwargs):
    """`inputs(...)` with the float tensors the trainer feeds a bf16 model (sigma stays fp32, as the trainer's)."""
    return {k: (v.bfloat16() if v.is_floating_point() and k != "timestep" else v) for k, v in inputs(**kwargs).items()}


def autocast_run(model, batch, enabled=True):
    """`run` under CPU bf16 autocast, as the trainer runs its forward (accelerate's autocast)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
        return run(model, batch)


def saved_for_backward(model, batch, autocast=True):
    """What autograd saves in one forward. Returns (total bytes, {module name: set of storages}): storages are
    counted once however many ops save them (what the allocator really holds); the dict maps each attention and each
    LoRA `lora_A` Linear to the storages of its input (attention) or of what its matmul saved (lora_A)."""
    saved, owners, current, alive = {}, {}, [], []

    def pack(t):
        alive.append(t)  # held until the end: a freed storage's address reused by a later one would count once
        ptr = t.untyped_storage().data_ptr()
        saved[ptr] = t.untyped_storage().nbytes()
        if current:
            owners.setdefault(current[-1], set()).add(ptr)
        return t

    handles = []
    for name, mod in model.named_modules():
        if name.endswith("lora_A.default"):
            handles.append(mod.register_forward_pre_hook(lambda m, a, n=name: current.append(n)))
            handles.append(mod.register_forward_hook(lambda m, a, o: current.pop() and None))
        elif type(mod).__name__ == "Krea2Attention":
            handles.append(mod.register_forward_pre_hook(
                lambda m, a, n=name: owners.setdefault(n, set()).add(a[0].untyped_storage().data_ptr())))
    batch = dict(batch, hidden_states=batch["hidden_states"].clone().requires_grad_(True))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(**batch, return_dict=False)[0]
    finally:
        for h in handles:
            h.remove()
    del out
    return sum(saved.values()), owners
