"""scripts/estimate_memory.py: static bytes match real (quantised) tiny models; the traced activation peak on meta,
under the estimator's emulated bf16 autocast, matches a real CPU bf16-autocast step measured by the torch profiler's
allocator events (memory.share_lora_input on and off); the FSDP arithmetic matches the module tree and a real
2-process CPU fully_shard; the full-size path runs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("_estimate_memory", ROOT / "scripts" / "estimate_memory.py")
em = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = em
_spec.loader.exec_module(em)

from krea2_train.config.memory import resolve_memory_settings  # noqa: E402
from krea2_train.runtime import memory  # noqa: E402
from krea2_train.train.step import flow_matching_loss  # noqa: E402

MARK = 123457  # odd allocation size marking the end of the forward in the profiler's event stream


def _real_frozen_bytes(model) -> int:
    """Bytes of the frozen weights as really stored, bitsandbytes NF4 side tensors included."""
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.requires_grad:
            continue
        total += t.numel() * t.element_size()
        qs = getattr(t, "quant_state", None)
        if qs is not None:
            parts = [qs.absmax, qs.code, qs.offset]
            if qs.nested:
                parts += [qs.state2.absmax, qs.state2.code]
            total += sum(p.numel() * p.element_size() for p in parts)
    return total


@pytest.mark.parametrize("mode", ["none", "int8", "nf4", "fp8"])
def test_static_bytes_match_real_tiny(mode):
    real = em.bench.build_model(True, torch.device("cpu"), torch.bfloat16)
    em.bench.add_lora(real, 32)
    memory.quantize_base(real, mode, device="cpu", compute_dtype=torch.bfloat16)
    meta = em.build_meta(True, 32)
    em.quantize_standins(meta, mode)
    if mode in ("int8", "fp8"):
        memory.quantize_base(meta, mode, device="meta")
    st = em.static_bytes(meta)
    assert st["weights"] == _real_frozen_bytes(real)
    lora = [p for p in real.parameters() if p.requires_grad]
    assert st["lora_params"] == sum(p.numel() * p.element_size() for p in lora)
    assert st["trainable_numel"] == sum(p.numel() for p in lora)
    assert st["optimizer"] == 8 * st["trainable_numel"]


def test_offload_keeps_two_blocks_of_frozen_weights():
    meta = em.build_meta(True, 32)
    em.quantize_standins(meta, "nf4")
    on, off = em.static_bytes(meta), em.static_bytes(meta, offload=True)
    per_block = [sum(p.numel() * p.element_size() for p in b.parameters() if not p.requires_grad)
                 for b in meta.transformer_blocks]
    n = len(per_block)
    assert off["weights"] == on["weights"] - sum(sorted(per_block)[: n - em.OFFLOAD_RESIDENT_BLOCKS])
    assert off["weights_all_on_gpu"] == on["weights"]


def _real_step(name, resolution, dtype=torch.bfloat16, share=True):
    """One real CPU step of the tiny model set up as bench_step does and run by the trainer's own loss (the forward
    under bf16 autocast, real torch.autocast on CPU); peak / after-forward / after-backward bytes from the profiler's
    allocator events (independent of the estimator's counting). `share`: memory.share_lora_input."""
    from torch.profiler import ProfilerActivity, profile

    bench = em.bench
    model = bench.build_model(True, torch.device("cpu"), dtype)
    bench.add_lora(model, 32)
    overrides, is_baseline = bench.CONFIGS[name]
    settings = resolve_memory_settings(dict(overrides, share_lora_input=share))
    if is_baseline:
        from krea2_train.runtime import speed
        speed.set_plain_attention(model)
        memory.enable_checkpointing(model, None)
    else:
        settings.compile = False
        memory.apply_memory_settings(model, settings, "cpu", compute_dtype=dtype)
    batch = bench.make_batch(model, resolution, 512, 128, "cpu", dtype)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        x0, noise, text, pos, mask = (batch[k].clone() for k in ("x0", "noise", "text", "pos", "mask"))
        sigma = torch.rand(1)
        loss = flow_matching_loss(model, x0, noise, sigma, text, pos, mask, dtype=dtype,
                                  autocast=torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)).mean()
        marker = torch.empty(MARK, dtype=torch.uint8)
        del marker
        loss.backward()
        del loss, x0, noise, text, pos, mask, sigma
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    cur = peak = 0
    fwd = None
    for _, n in events:
        if n == MARK and fwd is None:
            fwd = cur
        cur += n
        peak = max(peak, cur)
    ops = {e.name for e in prof.events()}
    return dict(peak=peak, after_forward=fwd, after_backward=cur, ops=ops)


def _estimated_step(name, resolution, dtype=torch.bfloat16, share=True):
    model = em.build_meta(True, 32, dtype)
    settings, is_baseline = em.prepare(model, name, memory_overrides=dict(share_lora_input=share))
    # CPU flash attention has no fp32 dQ accumulator / GQA expansion: compare without the CUDA workspace terms
    tr = em.trace_step(model, settings, is_baseline, resolution, 512, 128, dtype=dtype, workspace=False)
    # CPU autocast's fp32 list differs from CUDA's (emulated): the comparison holds as long as no fp32-list op met a
    # non-fp32 input (the model upcasts before its norms); the LoRA matmuls were cast
    assert tr["autocast_casts"]["fp32"] == tr["autocast_casts"]["fp32_out"] == 0, tr["autocast_casts"]
    assert tr["autocast_casts"]["lower"] > 0
    return tr


@pytest.mark.parametrize("name", ["bf16_ckpt_nofuse", "preset_80gb", "int8"])
def test_activation_estimate_matches_real_cpu_step(name):
    torch.set_num_threads(1)
    real = _real_step(name, 512)
    est = _estimated_step(name, 512)
    # the real run took the flash path (what the estimate's attention model stands for), not the L x L math path
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in real["ops"]
    # measured on this CPU (both under bf16 autocast): estimate/real = 0.935 (bf16_ckpt), 0.965 (80gb), 0.935 (int8);
    # the rest is CPU kernel scratch and the untrimmed input copy the real trim hook keeps
    assert 0.88 <= est["peak"] / real["peak"] <= 1.08, (est, real["peak"])
    assert est["after_backward"] == real["after_backward"]  # the LoRA grads, exactly
    assert abs(est["after_forward"] - real["after_forward"]) <= 0.25 * real["after_forward"]


@pytest.mark.parametrize("name", ["bf16_ckpt_nofuse", "bf16_ckpt", "preset_80gb"])
def test_share_lora_input_on_and_off_match_real_autocast_step(name):
    """memory.share_lora_input under autocast: with it off, PEFT's fp32 copy of each LoRA input is re-cast to bf16 by
    autocast and that copy is saved (per projection unfused, per projection from one shared fp32 copy fused). The
    estimate with it on and off each matches a real CPU bf16-autocast step, and so does the difference (measured:
    equal to the byte; 80gb keeps the copies past the forward, the checkpointed configs only at the recompute peak)."""
    torch.set_num_threads(1)
    real = {sh: _real_step(name, 512, share=sh) for sh in (True, False)}
    est = {sh: _estimated_step(name, 512, share=sh) for sh in (True, False)}
    for sh in (True, False):
        assert 0.88 <= est[sh]["peak"] / real[sh]["peak"] <= 1.08, (sh, est[sh], real[sh])
        assert est[sh]["after_backward"] == real[sh]["after_backward"]
    for key in ("peak", "after_forward"):
        d_real = real[False][key] - real[True][key]
        d_est = est[False][key] - est[True][key]
        assert abs(d_est - d_real) <= 0.02 * real[True][key], (key, d_est, d_real)
    assert real[False]["peak"] > real[True]["peak"] and est[False]["peak"] > est[True]["peak"]
    if name == "preset_80gb":  # nothing checkpointed: the copies are still saved after the forward
        assert est[False]["after_forward"] - est[True]["after_forward"] > 0.05 * est[True]["after_forward"]


def test_emulated_autocast_lists_are_cuda_autocast_ops():
    """Every op name the emulation casts has a CUDA autocast kernel in the installed torch; and a LoRA-like step on
    meta gets bf16 matmuls, the cached bf16 weight copy, and speed's autocast hook answering bf16 only inside."""
    from krea2_train.runtime import speed

    registered = {r.split("::")[1].split(".")[0]
                  for r in torch._C._dispatch_get_registrations_for_dispatch_key("AutocastCUDA")}
    alias = {"__matmul__": "matmul", "__rmatmul__": "matmul", "__pow__": "pow", "__rpow__": "pow"}
    for names in (em.AUTOCAST_LOWER, em.AUTOCAST_FP32, em.AUTOCAST_FP32_OUT):
        assert {alias.get(n, n) for n in names} <= registered
    x = torch.empty(4, 8, dtype=torch.bfloat16, device="meta")
    w = torch.nn.Parameter(torch.empty(3, 8, device="meta"))  # fp32 leaf, like a LoRA weight
    real = (torch.is_autocast_enabled, torch.get_autocast_dtype, torch.autocast, torch.amp.autocast,
            torch.nn.functional.scaled_dot_product_attention)
    with em.traced_kernels() as emu:
        assert speed._autocast_dtype("meta") is None and not torch.is_autocast_enabled("meta")
        with torch.autocast("meta", dtype=torch.bfloat16):
            assert speed._autocast_dtype("meta") == torch.bfloat16 == torch.get_autocast_dtype("meta")
            y1 = torch.nn.functional.linear(x.float(), w)
            y2 = x @ w.t()
            assert y1.dtype == y2.dtype == torch.bfloat16
            assert y1.grad_fn.next_functions[1][0] is not None and len(emu.cache) == 1  # one cached weight cast
            assert torch.exp(x).dtype == torch.float32 and x.sum().dtype == torch.float32
            with torch.autocast("meta", enabled=False):
                assert torch.nn.functional.linear(x.float(), w).dtype == torch.float32
        assert not emu.cache and torch.nn.functional.linear(x.float(), w).dtype == torch.float32
    assert real == (torch.is_autocast_enabled, torch.get_autocast_dtype, torch.autocast, torch.amp.autocast,
                    torch.nn.functional.scaled_dot_product_attention)  # restored


def test_int8_keeps_what_bf16_keeps_through_checkpointing():
    """memory.Int8Linear saves only its 1-byte weight: after a checkpointed forward the int8 step holds what the bf16
    one holds, byte for byte (measured: equal), real and estimated alike. bnb's MatMul8bitLt, used before, kept
    every layer input as a ctx attribute that checkpointing cannot drop: more than +50% here."""
    torch.set_num_threads(1)
    real_i8, real_bf = _real_step("int8", 256), _real_step("bf16_ckpt_nofuse", 256)
    est_i8, est_bf = _estimated_step("int8", 256), _estimated_step("bf16_ckpt_nofuse", 256)
    assert abs(real_i8["after_forward"] - real_bf["after_forward"]) <= 0.01 * real_bf["after_forward"]
    assert est_i8["after_forward"] == est_bf["after_forward"]


# ------------------------------------------------------------------------------------------------------------ FSDP
def _tiny_fsdp_meta():
    model = em.build_meta(True, 32)
    settings, is_baseline = em.prepare(model, "bf16_ckpt_nofuse", fsdp=True)
    assert not settings.fuse_qkv and not is_baseline
    return model, settings


def _bytes(params):
    return sum(p.numel() * p.element_size() for p in params)


def test_fsdp_layout_matches_module_tree():
    model, _ = _tiny_fsdp_meta()
    st = em.static_bytes(model)
    blocks = list(model.transformer_blocks)
    in_block = {id(p) for b in blocks for p in b.parameters()}
    root = [p for p in model.parameters() if id(p) not in in_block]
    for n in (1, 2, 3, 4, 8):
        lay = em.fsdp_layout(model, n)
        assert len(lay["blocks"]) == len(blocks)
        # the shards add back up to the unsharded groups exactly, and the groups to the whole model
        for g in lay["groups"]:
            assert sum(g["shard"]) == g["bytes"] and len(g["shard"]) == n
            assert g["shard_padded"] == g["shard"][0] == max(g["shard"])  # rank 0 holds the padded size
        assert sum(g["bytes"] for g in lay["groups"]) == st["weights"] + st["lora_params"]
        assert sum(g["trainable"] for g in lay["groups"]) == st["trainable_numel"]
        # gathered = the group's real parameters as stored (shard_transformer has no dtype policy); with a bf16
        # policy, as it would all-gather them
        cast = em.fsdp_layout(model, n, param_dtype=torch.bfloat16)
        for b, g, g16 in zip(blocks, lay["blocks"], cast["blocks"]):
            assert g["bytes"] == g["gathered"] == _bytes(b.parameters())
            assert g16["gathered"] == _bytes(p.to(torch.bfloat16) for p in b.parameters())
            assert g["ag_buffer"] >= g["gathered"] and g["trainable"] == sum(p.numel() for p in b.parameters()
                                                                            if p.requires_grad)
        assert lay["root"]["gathered"] == _bytes(root)
        assert cast["root"]["gathered"] == 2 * sum(p.numel() for p in root)
        if n == 1:
            assert all(g["ag_buffer"] == g["gathered"] for g in lay["groups"])


def test_fsdp_one_process_is_single_gpu_plus_gathered_overhead():
    model, settings = _tiny_fsdp_meta()
    st = em.static_bytes(model)
    tr = em.trace_step(model, settings, False, 256)
    assert tr["grads_after_backward"] == tr["after_backward"] == st["lora_grads"]  # the grad marking sees them all
    act = tr["peak_without_grads"]
    one = em.fsdp_bytes(em.fsdp_layout(model, 1), act)
    assert one["sharded"] == st["weights"] + st["lora_params"]
    assert one["grads"] == st["lora_grads"] and one["optimizer"] == st["optimizer"]
    lay = em.fsdp_layout(model, 1)
    block = max(g["gathered"] for g in lay["blocks"])
    assert one["blocks"] == em.FSDP_GATHERED_BLOCKS * block and one["root"] == lay["root"]["gathered"]
    overhead = one["root"] + one["blocks"] + one["rs"]
    single = st["weights"] + st["lora_params"] + st["optimizer"] + tr["peak"]
    assert one["total"] == st["weights"] + st["lora_params"] + st["optimizer"] + st["lora_grads"] + act + overhead
    assert single <= one["total"] - overhead <= single + st["lora_grads"]  # grads counted whole, wherever the peak
    two = em.fsdp_bytes(em.fsdp_layout(model, 2), act)
    assert two["total"] - two["activations"] - overhead < one["total"] - one["activations"] - overhead


def test_fsdp_activations_are_the_single_gpu_trace_with_share_lora_input():
    """FSDP gathers the stored dtypes and computes under the same bf16 autocast as a single GPU: its activations are
    the single-GPU trace's peak without grads, and memory.share_lora_input changes them as it does there."""
    rows = {sh: em.estimate_fsdp("fsdp_ckpt", [2], tiny=True, memory_overrides=dict(share_lora_input=sh))[0]
            for sh in (True, False)}
    for sh in (True, False):
        model, settings = _tiny_fsdp_meta()
        if not sh:
            from krea2_train.runtime import speed
            speed.unshare_lora_input(model)
        tr = em.trace_step(model, settings, False, 256)
        assert rows[sh]["activations_gib"] * 2**30 == tr["peak_without_grads"]
    assert rows[False]["activations_gib"] > rows[True]["activations_gib"]


SHARD_SCRIPT = textwrap.dedent('''
    import importlib.util, json, os, sys
    import torch, torch.distributed as dist
    root, out = sys.argv[1], sys.argv[2]
    sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location("_em", os.path.join(root, "scripts", "estimate_memory.py"))
    em = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(em)
    from krea2_train.runtime import sharding
    dist.init_process_group("gloo")
    model = em.bench.build_model(True, torch.device("cpu"), torch.bfloat16)
    em.bench.add_lora(model, 32)
    sharding.shard_transformer(model, sharding.make_mesh(torch.device("cpu")))
    blocks = list(model.transformer_blocks)
    in_block = {id(p) for b in blocks for p in b.parameters()}
    groups = [(b, list(b.parameters())) for b in blocks]
    groups.append((model, [p for p in model.parameters() if id(p) not in in_block]))
    res = dict(shard=[], gathered=[], types=[])
    for mod, params in groups:
        res["shard"].append(sum(p.to_local().numel() * p.to_local().element_size() for p in params))
        mod.unshard()  # this group's all-gather only
        params = list(mod.parameters()) if mod is not model else [
            p for p in model.parameters() if id(p) not in {id(q) for b in blocks for q in b.parameters()}]
        res["gathered"].append(sum(p.numel() * p.element_size() for p in params))
        res["types"].append(sorted({f"{type(p).__name__} {p.dtype}" for p in params}))
        mod.reshard()
    json.dump(res, open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w"))
    dist.destroy_process_group()
''')


def test_fsdp_shards_match_real_two_process_fully_shard(tmp_path):
    """torch fully_shard of the tiny model on 2 CPU processes (gloo), as sharding.shard_transformer does: each rank's
    local shard bytes per group and each group's all-gathered bytes (stored dtypes) equal the estimator's (~10 s)."""
    script = tmp_path / "shard.py"
    script.write_text(SHARD_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--standalone", str(script), str(ROOT), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    model, _ = _tiny_fsdp_meta()
    lay = em.fsdp_layout(model, 2)
    for rank in (0, 1):
        real = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert real["shard"] == [g["shard"][rank] for g in lay["groups"]]
        assert real["gathered"] == [g["gathered"] for g in lay["groups"]]
        # unsharded in the stored dtypes: bf16 base, fp32 LoRA and norm scales (every block has all three)
        assert all(t == ["Parameter torch.bfloat16", "Parameter torch.float32"] for t in real["types"]), real["types"]
    # the root's split is uneven on the tiny model (odd rows): rank 0 holds the padded size
    assert lay["root"]["shard"][0] > lay["root"]["shard"][1]


def test_full_size_script_runs(tmp_path):
    out = tmp_path / "est.json"
    rows, fsdp_rows = em.main(["--configs", "nf4_offload,bf16_ckpt", "--fsdp", "2,4,8", "--json", str(out)])
    data = json.loads(out.read_text())
    assert [r["config"] for r in data["rows"]] == ["nf4_offload", "bf16_ckpt"]
    assert [(r["config"], r["processes"]) for r in data["fsdp_rows"]] == [
        (c, n) for c in ("fsdp_ckpt", "fsdp_48gb") for n in (2, 4, 8)]
    nf4, bf16 = rows
    # 12.8B params: bf16 base ~23.9 GiB; NF4 + offload keeps only non-block bf16 weights, stats and 2 blocks
    assert 23.5 < bf16["weights_gib"] < 24.2
    assert nf4["weights_gib"] < 0.1 * bf16["weights_gib"]
    assert 5.5 < nf4["weights_all_on_gpu_gib"] < 8.0
    assert bf16["trainable_params"] == 28 * 32 * (3 * 2 * 6144 + 2 * (6144 + 1536))
    for r in rows:
        assert r["checkpoint_blocks"] == 28 and r["fits"] == (r["est_card_gib"] <= r["target_gib"])
        total = r["weights_gib"] + r["lora_grads_optim_gib"] + r["activation_peak_gib"]
        assert total == pytest.approx(r["est_alloc_gib"], rel=1e-9)
        # checkpointed: one 4224 x 6144 bf16 hidden state kept per block, plus the bf16 copies of the block's LoRA
        # weights that autocast's weight cache holds until the forward ends; a few GiB at peak
        assert r["saved_per_block_gib"] == pytest.approx((4224 * 6144 + 32 * 52224) * 2 / 2**30, rel=0.01)
        assert 1.5 < r["activation_peak_gib"] < 6
    # FSDP: 1/N of the bf16 base + LoRA; root (~0.66B params) + 2 blocks (~0.44B each) gathered in bf16
    for r in fsdp_rows:
        n = r["processes"]
        assert r["sharded_gib"] == pytest.approx((bf16["weights_gib"] + bf16["lora_params_gib"]) / n, rel=1e-3)
        assert 2.7 < r["gathered_gib"] < 3.0 and r["rs_gib"] < 0.05
        parts = ("sharded", "grads", "optimizer", "root", "blocks", "rs", "activations")
        assert sum(r[f"{k}_gib"] for k in parts) == pytest.approx(r["est_alloc_gib"], rel=1e-9)
    ckpt = [r for r in fsdp_rows if r["config"] == "fsdp_ckpt"]
    part = [r for r in fsdp_rows if r["config"] == "fsdp_48gb"]
    assert all(r["checkpoint_blocks"] == 28 for r in ckpt) and all(r["checkpoint_blocks"] == 16 for r in part)
    # the same trace (fsdp_ckpt = bf16_ckpt_nofuse): FSDP's non-grad peak lies within the single-GPU dynamic peak,
    # which holds some fp32 grads (its "act peak" subtracts all of them)
    assert bf16["activation_peak_gib"] < ckpt[0]["activations_gib"] <= bf16["activation_peak_gib"] + bf16["grads_gib"]
    assert all(p["activations_gib"] > 3 * c["activations_gib"] for c, p in zip(ckpt, part))
    assert [r["est_card_gib"] for r in ckpt] == sorted((r["est_card_gib"] for r in ckpt), reverse=True)
