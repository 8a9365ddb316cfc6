"""The reference-latent forward (models/reference.py) against independent computations of ComfyUI's Krea 2 rules."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from krea2_train.models.loading import load_transformer
from krea2_train.models.reference import reference_forward
from krea2_train.schedule import pack_latents, position_ids


@pytest.fixture(scope="module")
def model(tiny_dir):
    torch.set_num_threads(1)
    m = load_transformer(tiny_dir / "transformer_raw.safetensors", dtype="float32")
    # the tiny file's modulation tables may be small: make t and t=0 modulations clearly differ per block
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for blk in m.transformer_blocks:
            blk.scale_shift_table.add_(0.1 * torch.randn(blk.scale_shift_table.shape, generator=g))
    return m.eval()


def _inputs(b=2, txt=5, h=8, w=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 16, h, w, generator=g)
    text = torch.randn(b, txt, 12, 32, generator=g)
    sig = torch.tensor([0.7, 0.3])[:b]
    refs = [torch.randn(b, 16, 6, 4, generator=g), torch.randn(1, 16, 4, 8, generator=g)]
    return pack_latents(x), text, sig, position_ids(txt, h // 2, w // 2), refs


def _comfy_ids(txt, grids):
    """ComfyUI process_img: img_ids[..., 0] = index, [..., 1] = row, [..., 2] = col; text zeros."""
    rows = [torch.zeros(txt, 3)]
    for index, (gh, gw) in enumerate(grids):
        ids = torch.zeros(gh, gw, 3)
        ids[..., 0] = index
        ids[..., 1] = torch.arange(gh, dtype=torch.float32)[:, None]
        ids[..., 2] = torch.arange(gw, dtype=torch.float32)[None, :]
        rows.append(ids.reshape(gh * gw, 3))
    return torch.cat(rows)


def _seq(x, refs, b):
    return torch.cat([x] + [pack_latents(r.expand(b, -1, -1, -1)) for r in refs], dim=1)


@torch.no_grad()
def test_no_references_is_the_plain_forward(model):
    x, text, sig, pos, _ = _inputs()
    plain = model(hidden_states=x, encoder_hidden_states=text, timestep=sig, position_ids=pos, return_dict=False)[0]
    assert torch.equal(reference_forward(model, x, text, sig, pos, None), plain)
    assert torch.equal(reference_forward(model, x, text, sig, pos, []), plain)


@torch.no_grad()
def test_index_equals_the_concatenated_sequence(model):
    """`index`: the model's own forward on [image, ref1, ref2] with ComfyUI's ids, output sliced to the image."""
    x, text, sig, pos, refs = _inputs()
    ids = _comfy_ids(5, [(4, 3), (3, 2), (2, 4)])
    full = model(hidden_states=_seq(x, refs, 2), encoder_hidden_states=text, timestep=sig, position_ids=ids,
                 return_dict=False)[0][:, :x.shape[1]]
    out = reference_forward(model, x, text, sig, pos, refs, "index")
    assert out.shape == x.shape
    torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-5)
    # the references matter, and their order matters (axis-0 index follows the list)
    plain = reference_forward(model, x, text, sig, pos, None)
    assert (out - plain).abs().max() > 1e-3
    swapped = reference_forward(model, x, text, sig, pos, refs[::-1], "index")
    assert (out - swapped).abs().max() > 1e-4


def _comfy_block(blk, x, vec, vec0, rope, k):
    """ComfyUI SingleStreamBlock.forward with timestep_zero_index=k, written out from its code."""
    mod = vec.unflatten(-1, (6, -1)) + blk.scale_shift_table
    mod0 = vec0.unflatten(-1, (6, -1)) + blk.scale_shift_table
    ps, psh, pg, qs, qsh, qg = mod.unbind(-2)
    rps, rpsh, rpg, rqs, rqsh, rqg = mod0.unbind(-2)
    pre = blk.norm1(x).clone()
    pre[:, :k] = pre[:, :k] * (1 + ps) + psh
    pre[:, k:] = pre[:, k:] * (1 + rps) + rpsh
    attn = blk.attn(pre, image_rotary_emb=rope).clone()
    attn[:, :k] *= pg
    attn[:, k:] *= rpg
    x = x + attn
    post = blk.norm2(x).clone()
    post[:, :k] = post[:, :k] * (1 + qs) + qsh
    post[:, k:] = post[:, k:] * (1 + rqs) + rqsh
    mlp = blk.ff(post).clone()
    mlp[:, :k] *= qg
    mlp[:, k:] *= rqg
    return x + mlp


@torch.no_grad()
def test_index_timestep_zero_matches_comfy_rules(model):
    x, text, sig, pos, refs = _inputs()
    n_img = x.shape[1]
    ids = _comfy_ids(5, [(4, 3), (3, 2), (2, 4)])
    t = model.time_embed(sig, dtype=torch.float32)
    vec = model.time_mod_proj(F.gelu(t, approximate="tanh"))
    vec0 = model.time_mod_proj(F.gelu(model.time_embed(torch.zeros_like(sig), dtype=torch.float32),
                                      approximate="tanh"))
    ctx = model.txt_in(model.text_fusion(text))
    h = torch.cat([ctx, model.img_in(_seq(x, refs, 2))], dim=1)
    rope = model.rotary_emb(ids)
    for blk in model.transformer_blocks:
        h = _comfy_block(blk, h, vec, vec0, rope, 5 + n_img)
    want = model.final_layer(h, t)[:, 5:5 + n_img]
    out = reference_forward(model, x, text, sig, pos, refs, "index_timestep_zero")
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert (out - reference_forward(model, x, text, sig, pos, refs, "index")).abs().max() > 1e-4


def test_masked_text_and_gradients_reach_lora(model):
    """A padded text mask gives the unpadded answer; gradients flow through the wrapper."""
    x, text, sig, pos, refs = _inputs()
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    with torch.no_grad():
        a = reference_forward(model, x, text, sig, pos, refs, "index_timestep_zero", encoder_attention_mask=mask)
        b = reference_forward(model, x[1:], text[1:, :3], sig[1:], position_ids(3, 4, 3),
                              [r[-1:] for r in refs], "index_timestep_zero")
    torch.testing.assert_close(a[1:], b, rtol=1e-5, atol=1e-5)
    w = model.transformer_blocks[0].attn.to_q.weight
    w.requires_grad_(True)
    reference_forward(model, x, text, sig, pos, refs, "index").square().mean().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    w.grad = None


def test_sample_with_reference(tiny_dir, tmp_path, one_torch_thread, capsys):
    """`sample --reference IMG`: the reference changes the image (same seed); a bad file is refused by name."""
    from pathlib import Path

    from PIL import Image

    from krea2_train.cli import main
    demo = sorted((Path(__file__).resolve().parents[1] / "datasets" / "demo").glob("*.png"))
    common = ["sample", "--models", str(tiny_dir), "--prompt", "a red circle", "--height", "64", "--width", "64",
              "--steps", "2", "--dtype", "float32", "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert main([*common, "--reference", str(demo[0]), "--out", str(tmp_path / "ref")]) == 0
    assert main([*common, "--reference", str(demo[0]), "--reference", str(demo[1]),
                 "--reference-method", "index_timestep_zero", "--out", str(tmp_path / "ref2")]) == 0
    imgs = [torch.tensor(list(Image.open(next((tmp_path / d).glob("*.png"))).getdata()), dtype=torch.float32)
            for d in ("plain", "ref", "ref2")]
    assert (imgs[0] - imgs[1]).abs().max() > 0 and (imgs[1] - imgs[2]).abs().max() > 0
    (tmp_path / "bad.png").write_bytes(b"nope")
    assert main([*common, "--reference", str(tmp_path / "bad.png"), "--out", str(tmp_path / "bad")]) != 0
    assert "--reference" in capsys.readouterr().err and not (tmp_path / "bad").exists()


@pytest.fixture(scope="module")
def comfy_model(model):
    """ComfyUI's SingleStreamDiT (its own code, tests/_comfy_krea2.py) with the tiny model's weights. ComfyUI's
    text-fusion MLP widths are rounded to 128 (FACTS.md), which the tiny text fusion is not: its text path is the
    diffusers one (references never enter it); every block, modulation, RoPE and the final layer are ComfyUI's."""
    import types

    import _comfy_krea2

    from krea2_train.models.keys import diffusers_to_original_state_dict

    krea2 = _comfy_krea2.load()
    if krea2 is None:
        pytest.skip("ComfyUI source not available")
    cm = krea2.SingleStreamDiT(features=128, tdim=64, txtdim=32, heads=4, kvheads=2, multiplier=3, layers=2,
                               txtlayers=12, txtheads=2, txtkvheads=2, operations=types.SimpleNamespace(
                                   Linear=torch.nn.Linear))
    sd = diffusers_to_original_state_dict(model.state_dict())
    sd = {k: v for k, v in sd.items() if not k.startswith(("txtfusion.", "txtmlp."))}
    missing, unexpected = cm.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith(("txtfusion.", "txtmlp.")) for k in missing), (missing, unexpected)

    class _Fusion(torch.nn.Module):
        def forward(self, x, mask=None, transformer_options=None):
            return model.text_fusion(x)

    cm.txtfusion, cm.txtmlp = _Fusion(), model.txt_in
    return cm.float().eval()


@pytest.mark.parametrize("method", ["index", "index_timestep_zero", None])
@torch.no_grad()
def test_matches_comfyui_own_model(model, comfy_model, method):
    """ComfyUI's Krea 2 model with ref_latents (ReferenceLatent) and ref_latents_method gives our velocity; with no
    method (the graph lacks FluxKontextMultiReferenceLatentMethod) it ignores the references, as the plain forward."""
    from krea2_train.schedule import unpack_latents

    x, text, sig, pos, refs = _inputs()
    kw = {} if method is None else {"ref_latents_method": method}
    comfy = comfy_model(unpack_latents(x, 8, 6), sig, text.flatten(2), ref_latents=refs, **kw)
    ours = reference_forward(model, x, text, sig, pos, refs if method else None, method or "index")
    other = reference_forward(model, x, text, sig, pos, refs, "index" if method != "index" else "index_timestep_zero")
    assert (unpack_latents(other, 8, 6) - comfy).abs().max() > 1e-3  # the comparison can fail
    torch.testing.assert_close(comfy, unpack_latents(ours, 8, 6), rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_call_goes_through_the_model_and_its_hooks(model):
    """The reference call is `model(...)` (so DDP / FSDP / forward hooks see it), with forward restored after."""
    import copy

    from krea2_train.runtime.speed import enable_text_padding_trim

    x, text, sig, pos, refs = _inputs()
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[:, 4:] = False  # one padded token in both rows: the trim hook drops it
    want = reference_forward(model, x, text, sig, pos, refs, "index_timestep_zero", encoder_attention_mask=mask)
    m = copy.deepcopy(model)
    calls = []
    m.register_forward_pre_hook(lambda mod, a, kw: calls.append(kw["encoder_hidden_states"].shape[1]),
                                with_kwargs=True)
    enable_text_padding_trim(m)
    got = reference_forward(m, x, text, sig, pos, refs, "index_timestep_zero", encoder_attention_mask=mask)
    assert calls == [5] and "forward" not in m.__dict__
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_sample_takes_the_method_a_run_trained(tmp_path):
    """`sample --lora RUN_DIR` without --reference-method uses the run's train.reference_method (a different one
    would sample what the LoRA was not trained on); two runs that differ are refused."""
    from krea2_train.cli.sample import _trained_method
    from krea2_train.errors import UserError

    def run(name, method, reference=True):
        d = tmp_path / name
        d.mkdir()
        (d / "config.yaml").write_text(f"data:\n  reference: {str(reference).lower()}\n"
                                       f"train:\n  reference_method: {method}\n")
        return str(d)

    def method(*args):
        return _trained_method(list(args), list(args))

    a, b = run("a", "index_timestep_zero"), run("b", "index")
    assert method(a) == "index_timestep_zero"
    assert method(str(tmp_path / "x.safetensors")) == "index"
    assert method(run("c", "index_timestep_zero", reference=False)) == "index"
    (Path(a) / "adapter").mkdir()
    assert method(str(Path(a) / "adapter")) == "index_timestep_zero"  # the run's adapter folder: its config
    with pytest.raises(UserError, match="--reference-method"):
        method(a, b)


def test_sample_takes_the_method_an_exported_file_was_trained_with(tiny_dir, tmp_path):
    """An exported edit LoRA, given as a file (in its run's export folder or downloaded alone), samples with the
    reference_method its header records, not index (BENCHMARKS: index gives 34% edits where the trained method gives
    75-80%); the file's header wins over a run config that says otherwise."""
    from test_export_helpers import trained_adapter

    from krea2_train.cli.sample import _trained_method
    from krea2_train.lora.writers import write_lora_file

    alone = write_lora_file(trained_adapter(tiny_dir, r=4, alpha=4), tmp_path / "dl" / "edit.safetensors", "civitai",
                            metadata={"reference_method": "index_timestep_zero", "reference_count": 1})
    assert _trained_method([str(alone)], [alone]) == "index_timestep_zero"
    plain = write_lora_file(trained_adapter(tiny_dir, r=4, alpha=4), tmp_path / "dl" / "plain.safetensors", "civitai")
    assert _trained_method([str(plain)], [plain]) == "index"
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    (run / "config.yaml").write_text("data:\n  reference: true\ntrain:\n  reference_method: index_timestep_zero\n")
    inside = write_lora_file(trained_adapter(tiny_dir, r=4, alpha=4), run / "export" / "e.safetensors", "civitai",
                             metadata={"reference_method": "index", "reference_count": 1})
    assert _trained_method([str(inside)], [inside]) == "index"  # its own header, not the run's config
    bare = write_lora_file(trained_adapter(tiny_dir, r=4, alpha=4), run / "export" / "bare.safetensors", "comfyui")
    assert _trained_method([str(bare)], [bare]) == "index_timestep_zero"  # no header: the run's config


def test_gradient_checkpointing_gives_the_same_gradients(model):
    """Memory presets turn on diffusers' gradient checkpointing: the reference path uses it with equal results."""
    import copy

    x, text, sig, pos, refs = _inputs()
    grads = []
    for ckpt in (False, True):
        m = copy.deepcopy(model).train()
        if ckpt:
            m.enable_gradient_checkpointing()
        w = m.transformer_blocks[1].ff.up.weight
        w.requires_grad_(True)
        out = reference_forward(m, x, text, sig, pos, refs, "index_timestep_zero")
        out.square().mean().backward()
        grads.append((out.detach(), w.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
