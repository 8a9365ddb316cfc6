#!/usr/bin/env python
"""Estimate the peak GPU memory of one Krea 2 LoRA training step per memory preset, on a CPU, without allocating.

Same set-up as scripts/bench_step.py (its CONFIGS, LoRA targets and batch): the FULL 12.9B `Krea2Transformer2DModel()`
built on the `meta` device (no bytes allocated), LoRA rank 32 (fp32) on the attention projections of all 28 blocks,
batch 1, 1024 px (4096 image tokens), text padded to 512 tokens with 128 valid. Runs in ~10 s per config, < 2 GiB RAM.

    python scripts/estimate_memory.py                      # every bench_step config, one table
    python scripts/estimate_memory.py --configs int8 --json out.json
    python scripts/estimate_memory.py --configs '' --fsdp 2,4,8   # FSDP rows only (per GPU, N processes)

What is modelled
  * Static, from the real module tree (after PEFT and the config's memory settings):
      base weights as stored: bf16 2 B/param (RMSNorm scales fp32, as diffusers keeps them); int8 / fp8 =
      memory.Int8Linear / memory.Fp8Linear as they are (1 B/param + fp32 row scale); NF4 = bitsandbytes Params4bit
      (0.5 B/param + uint8 absmax per 64 + fp32 absmax per 256 absmax + codes). Only the block Linears are
      quantised (as memory.quantize_base does). The byte formulas are checked against the real quantised layers of
      the tiny model (tests/test_estimate_memory.py).
      Block offload (`16gb`): non-block weights, LoRA and quantisation statistics stay resident; of the offloaded
      frozen block weights, BlockOffloader keeps the running block plus one prefetched neighbour: 2 blocks.
      LoRA params fp32, grads fp32 (set_to_none: they appear during backward, so they are counted inside the
      traced dynamic peak), AdamW 2 x fp32 states, or bitsandbytes AdamW8bit 2 x (1 B + fp32 absmax per 256).
  * Dynamic (activations, saved tensors, transients, grads): the real forward + backward of the meta model (real
    PEFT layers, attention processors, checkpointing hooks of memory.enable_checkpointing, fused q/k/v), counting the
    bytes of every tensor a dispatched op allocates (a TorchDispatchMode; views and in-place ops allocate nothing)
    until its storage dies, like torch.cuda.max_memory_allocated counts the caching allocator's live blocks.
    The 28 blocks are all traced (no extrapolation).
      - bf16 autocast, as bench_step's step() and the trainer (accelerate, mixed_precision bf16) run the forward:
        real torch.autocast does not act on meta tensors, so EmulatedAutocast (a TorchFunctionMode, i.e. above
        autograd like the real Autocast key) applies CUDA autocast's casts: linear / matmul / bmm / baddbmm / SDPA
        (the AUTOCAST_LOWER list) get their floating args in bf16, the AUTOCAST_FP32 ops (norms, pow, exp, losses...)
        in fp32. A cast is a differentiable .to(), so its copy is counted, saved and freed as autograd does; the bf16
        copies of the fp32 LoRA weights are cached until the autocast region exits, as autocast's weight cache is.
        `torch.autocast` / `torch.amp.autocast` on meta enter the emulated region (so checkpoint recomputation, which
        re-enters the autocast state it recorded, is cast too), and torch.is_autocast_enabled / get_autocast_dtype
        answer "on, bf16" inside it: memory.share_lora_input (default on) then feeds the
        bf16 layer input to lora_A, and memory.QuantLinear dequantises straight to bf16, as on the GPU. With
        `memory.share_lora_input` off (`--no-share-lora-input`), PEFT's fp32 copy of each LoRA input is made and
        autocast's bf16 re-cast of it is what lora_A saves: allocated +0.14 GiB (bf16_ckpt, int8: only at the
        recompute peak), +1.74 GiB (48gb), +4.06 GiB (80gb).
        FSDP (sharding.shard_transformer) gathers the stored dtypes, no bf16 param policy, and computes under the
        same autocast: its activations are the single-GPU trace's and its gathered blocks/root hold fp32 LoRA and
        norm scales.
        tests/test_estimate_memory.py compares the emulated trace with real CPU bf16-autocast steps of the tiny
        model (CPU autocast casts the same matmul ops; the trace asserts no op of CUDA's fp32 list met a bf16
        input there), share_lora_input on and off: the on/off difference matches to the byte.
      - Attention: on meta/CPU SDPA would take the math path and materialise L x L scores that flash attention on an
        H100 never stores. SDPA is replaced during the trace by a cost model of the CUDA kernels: the forward saves
        q, k, v, out and an fp32 logsumexp; the backward holds an fp32 dQ accumulator and (GQA) k/v-head-expanded
        dK/dV before reducing. The masked path (baseline: no trim) is costed the same way (memory-efficient kernel).
      - Text-padding trim: fed as the trimmed batch (128 text tokens, no mask) since the trim hook needs real data.
      - NF4 (bitsandbytes cannot run on meta): the block Linears are replaced by stand-ins with the same stored
        bytes and the same autograd memory pattern as bitsandbytes 0.50 on CUDA (MatMul4Bit at M=4224 on sm90:
        dequantise + F.linear): a transient bf16 weight in forward and again in backward; keeps nothing.
      - int8 / fp8 / fp8_mm: the real memory.Int8Linear / Fp8Linear code runs on meta (a transient bf16 weight per
        matmul; only the 1-byte weight and its scale saved). Not bitsandbytes'
        Linear8bitLt, which keeps each layer's input outside save_for_backward (see runtime/memory.py).
      - RMSNorm runs as torch's composite on meta (CUDA has a fused kernel): same saved tensors (input + rstd), one
        extra fp32 transient (x**2) per norm in forward: a slight over-estimate.
  * Total allocated peak = resident weights + LoRA params + optimiser states + traced dynamic peak (the optimiser step
    itself, fused AdamW / AdamW8bit, needs only the grads, which the dynamic peak already covers).

What is NOT modelled (covered by the stated allowance, `--allowance` terms)
  * CUDA context + kernels (~0.5 GiB on an H100, outside torch's allocator): +0.5 GiB.
  * cuBLAS/cuBLASLt/cuDNN workspaces (tens of MiB per stream): +0.25 GiB.
  * Allocator fragmentation (reserved minus allocated; activations of varied sizes): +10% of the dynamic peak.
  * torch.compile (inductor buffers, fusions that drop intermediates, cudagraph pools): the `*_compile`, `48gb` and
    `80gb` rows are the eager estimate. Kernel-internal scratch not visible as tensors. Text encoder / VAE on the
    GPU (bench_step feeds random embeddings; the trainer caches them). One-off set-up peaks: bench_step builds the
    bf16 model on the GPU before quantising, and memory._block_linears keeps every original Linear alive until the
    quantisation loop ends.
The "est. card" column = allocated peak + allowance, and the fit verdict uses it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the estimator itself (tracing, static bytes, FSDP arithmetic) lives in the package, shared with `krea2-train
# estimate`; its names are re-exported here for the tests and for interactive use
from krea2_train.config.memory import resolve_memory_settings  # noqa: E402
from krea2_train.estimate.static import (  # noqa: E402,F401
    CARDS_GIB,
    CONTEXT_GIB,
    FRAGMENTATION,
    FSDP_GATHERED_BLOCKS,
    FSDP_RS_BUFFERS,
    NCCL_GIB,
    OFFLOAD_RESIDENT_BLOCKS,
    WORKSPACE_GIB,
    GiB,
    apply_settings,
    build_meta_model,
    estimate_model,
    fsdp_bytes,
    fsdp_layout,
    fsdp_totals,
    static_bytes,
)
from krea2_train.estimate.trace import (  # noqa: E402,F401
    AUTOCAST_FP32,
    AUTOCAST_FP32_OUT,
    AUTOCAST_LOWER,
    BNB8_BLOCK,
    NF4_BLOCK,
    NF4_BLOCK2,
    EmulatedAutocast,
    LiveBytes,
    Nf4StandIn,
    nf4_bytes,
    quantize_standins,
    trace_step,
    traced_kernels,
)
from krea2_train.runtime import memory  # noqa: E402,F401

# config -> (target GiB, what the target is)
TARGETS = {
    "baseline": (None, "reference (SimpleTuner 33.3)"),
    "bf16_ckpt_nofuse": (33.0, "bf16+ckpt <= 33"),
    "bf16_ckpt": (33.0, "bf16+ckpt <= 33"),
    "bf16_ckpt_compile": (33.0, "bf16+ckpt <= 33"),
    "bf16_33gb": (33.0, "bf16+ckpt <= 33"),
    "int8": (20.0, "8-bit <= 20"),
    "fp8": (20.0, "8-bit <= 20"),
    "fp8_mm": (20.0, "8-bit <= 20"),
    "nf4_offload": (14.0, "NF4+offload <= 14"),
    "preset_48gb": (48.0, "48 GB card"),
    "preset_80gb": (80.0, "80 GB card"),
}


def _load_bench():
    spec = importlib.util.spec_from_file_location("_krea2_bench_step", ROOT / "scripts" / "bench_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bench = _load_bench()


# ------------------------------------------------------------------------------------------------- building
def build_meta(tiny: bool, rank: int, dtype=torch.bfloat16):
    """bench_step's model on meta: the full (or tiny) Krea 2 with bench_step's LoRA (rank `rank`, fp32)."""
    if tiny:
        from krea2_train.models.tiny import TINY_TRANSFORMER as config
    else:
        config = {}
    model = build_meta_model(config, dtype)
    bench.add_lora(model, rank)
    return model.eval()


def prepare(model, name, fsdp=False, memory_overrides=None):
    """bench_step.bench_config's set-up on meta. Returns (effective settings, is_baseline). `fsdp`: as the trainer's
    _build_model under FSDP (q/k/v fusion and compile off). `memory_overrides`: memory settings put over the config's
    (e.g. share_lora_input=False)."""
    overrides, is_baseline = bench.CONFIGS[name]
    settings = resolve_memory_settings({**overrides, **(memory_overrides or {})})
    return apply_settings(model, settings, is_baseline, fsdp=fsdp, compute_dtype=torch.bfloat16, what=name)


def estimate(name, tiny=False, rank=32, resolution=None, text_tokens=512, caption_tokens=128,
             memory_overrides=None) -> dict:
    resolution = resolution or (256 if tiny else 1024)
    t0 = time.perf_counter()
    model = build_meta(tiny, rank)
    settings, is_baseline = prepare(model, name, memory_overrides=memory_overrides)
    row = dict(config=name, **estimate_model(model, settings, is_baseline, resolution, text_tokens, caption_tokens))
    tail = {k: row.pop(k) for k in ("trainable_params", "traced_ops")}
    target, what = TARGETS.get(name, (None, ""))
    row.update(target_gib=target, target=what, fits=None if target is None else row["est_card_gib"] <= target,
               **tail, seconds=time.perf_counter() - t0)
    return row


# ------------------------------------------------------------------------------------------------------- FSDP
# FSDP row -> the bench_step config whose memory settings it trains with (fuse_qkv and compile off, as the trainer's
# _build_model does under FSDP; no quantisation / offload / 8-bit optimiser: sharding.check_fsdp_settings refuses them)
FSDP_CONFIGS = {"fsdp_ckpt": "bf16_ckpt_nofuse", "fsdp_48gb": "preset_48gb"}


def estimate_fsdp(name, ns, tiny=False, rank=32, resolution=None, text_tokens=512, caption_tokens=128,
                  memory_overrides=None) -> list[dict]:
    """FSDP rows of FSDP_CONFIGS[name] for each process count in `ns` (one trace: activations do not depend on n)."""
    resolution = resolution or (256 if tiny else 1024)
    t0 = time.perf_counter()
    base_name = FSDP_CONFIGS[name]
    model = build_meta(tiny, rank)
    settings, is_baseline = prepare(model, base_name, fsdp=True, memory_overrides=memory_overrides)
    layouts = {n: fsdp_layout(model, n) for n in ns}
    # sharding.shard_transformer gathers the stored dtypes (bf16 base, fp32 LoRA and norm scales) and the trainer
    # computes under the same bf16 autocast as DDP: the blocks run what a single GPU runs, so that is what is traced
    tr = trace_step(model, settings, is_baseline, resolution, text_tokens, caption_tokens)
    act = tr["peak_without_grads"]
    rows = []
    for n in ns:
        t = fsdp_totals(layouts[n], act)
        b, card = t["parts"], t["card"]
        rows.append(dict(config=name, base_config=base_name, processes=n,
                         checkpoint_blocks=getattr(model, "_krea2_checkpoint_blocks", 0)
                         if model.gradient_checkpointing else 0,
                         **{f"{k}_gib": v / GiB for k, v in b.items() if k != "total"},
                         gathered_gib=(b["root"] + b["blocks"]) / GiB,
                         est_alloc_gib=b["total"] / GiB, allowance_gib=t["allowance"] / GiB, est_card_gib=card / GiB,
                         fits={f"{c}gb": card <= c * GiB for c in CARDS_GIB},
                         seconds=time.perf_counter() - t0))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(bench.CONFIGS), help=f"comma list of {', '.join(bench.CONFIGS)}")
    ap.add_argument("--tiny", action="store_true", help="the tiny model (wiring check)")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--resolution", type=int, default=None, help="pixels (default 1024, tiny 256)")
    ap.add_argument("--text-tokens", type=int, default=512)
    ap.add_argument("--caption-tokens", type=int, default=128)
    ap.add_argument("--fsdp", default=None, help="also FSDP rows (per GPU) for these process counts, e.g. 2,4,8")
    ap.add_argument("--fsdp-configs", default=",".join(FSDP_CONFIGS),
                    help=f"comma list of {', '.join(f'{k} (= {v})' for k, v in FSDP_CONFIGS.items())}")
    ap.add_argument("--no-share-lora-input", action="store_true",
                    help="memory.share_lora_input off (PEFT's fp32 copy of each LoRA input, re-cast by autocast)")
    ap.add_argument("--json", default=None, help="also write the rows here ('-' = stdout only JSON)")
    args = ap.parse_args(argv)
    names = [n for n in args.configs.split(",") if n]  # --configs '' : FSDP rows only
    unknown = [n for n in names if n not in bench.CONFIGS]
    if unknown:
        ap.error(f"unknown configs {unknown}; known: {list(bench.CONFIGS)}")
    ns = [int(x) for x in args.fsdp.split(",")] if args.fsdp else []
    fsdp_names = [n for n in args.fsdp_configs.split(",") if n] if ns else []
    unknown = [n for n in fsdp_names if n not in FSDP_CONFIGS]
    if unknown or any(n < 1 for n in ns):
        ap.error(f"unknown FSDP configs {unknown} (known: {list(FSDP_CONFIGS)}) or a process count < 1")
    torch.set_num_threads(1)
    mem = dict(share_lora_input=False) if args.no_share_lora_input else None
    rows = [estimate(n, args.tiny, args.rank, args.resolution, args.text_tokens, args.caption_tokens, mem)
            for n in names]
    fsdp_rows = [r for n in fsdp_names
                 for r in estimate_fsdp(n, ns, args.tiny, args.rank, args.resolution, args.text_tokens,
                                        args.caption_tokens, mem)]
    header = dict(model="tiny" if args.tiny else "full 12.9B", resolution=args.resolution or (256 if args.tiny else 1024),
                  batch=1, rank=args.rank, text_tokens=args.text_tokens, caption_tokens=args.caption_tokens,
                  autocast="bf16 (CUDA op lists, emulated on meta)", share_lora_input=not args.no_share_lora_input,
                  allowance=f"{CONTEXT_GIB} GiB context + {WORKSPACE_GIB} GiB workspaces + "
                            f"{FRAGMENTATION:.0%} of dynamic peak", torch=torch.__version__)
    if fsdp_rows:
        header["fsdp_allowance"] = f"{header['allowance']} + {NCCL_GIB} GiB NCCL (fragmentation on activations + " \
                                   "gathered params + reduce-scatter buffers)"
    result = dict(header=header, rows=rows, fsdp_rows=fsdp_rows) if fsdp_rows else dict(header=header, rows=rows)
    if args.json == "-":
        print(json.dumps(result, indent=2))
        return (rows, fsdp_rows) if ns else rows
    print("# " + json.dumps(header))
    if rows:
        _print_rows(rows)
    if fsdp_rows:
        _print_fsdp_rows(fsdp_rows)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return (rows, fsdp_rows) if ns else rows


def _print_rows(rows):
    print(f"{'config':<18}{'base W':>8}{'LoRA+g+opt':>11}{'act peak':>9}{'est alloc':>10}{'est card':>9}"
          f"  {'target':<28}{'fits?':>5}")
    for r in rows:
        fits = "n/a" if r["fits"] is None else ("yes" if r["fits"] else "NO")
        print(f"{r['config']:<18}{r['weights_gib']:>8.2f}{r['lora_grads_optim_gib']:>11.2f}"
              f"{r['activation_peak_gib']:>9.2f}{r['est_alloc_gib']:>10.2f}{r['est_card_gib']:>9.2f}"
              f"  {r['target']:<28}{fits:>5}")
    print("GiB. act peak = traced dynamic peak (bf16 autocast) minus the LoRA grads; est alloc ~ "
          "torch.cuda.max_memory_allocated; est card = alloc + allowance (see docstring). "
          "compile rows: eager estimate.")


def _print_fsdp_rows(rows):
    print("\nFSDP, per GPU (bf16 base + fp32 LoRA sharded, AdamW; q/k/v fusion and compile off; batch 1 per GPU)")
    print(f"{'config':<11}{'N':>3}{'ckpt':>5}{'shards':>8}{'g+opt':>7}{'gathered':>9}{'rs':>6}{'act':>7}"
          f"{'est alloc':>10}{'est card':>9}  " + " ".join(f"{c}GB" for c in CARDS_GIB))
    for r in rows:
        fits = " ".join(f"{'yes' if r['fits'][f'{c}gb'] else 'NO':>4}" for c in CARDS_GIB)
        print(f"{r['config']:<11}{r['processes']:>3}{r['checkpoint_blocks']:>5}{r['sharded_gib']:>8.2f}"
              f"{r['grads_gib'] + r['optimizer_gib']:>7.2f}{r['gathered_gib']:>9.2f}{r['rs_gib']:>6.2f}"
              f"{r['activations_gib']:>7.2f}{r['est_alloc_gib']:>10.2f}{r['est_card_gib']:>9.2f}  {fits}")
    print("GiB. shards = this GPU's 1/N of base + LoRA; g+opt = its fp32 LoRA grads + AdamW states; gathered = root "
          f"(kept gathered) + {FSDP_GATHERED_BLOCKS} blocks, stored dtypes; rs = unsharded block LoRA grads + fp32 "
          "reduce-scatter buffers; act = traced peak (bf16 autocast) without grads; est card adds the allowance "
          f"(+{NCCL_GIB} GiB NCCL). Cards: usable GiB = nominal GB.")


if __name__ == "__main__":
    main()
