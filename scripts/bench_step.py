#!/usr/bin/env python
"""Time LoRA training steps of the Krea 2 transformer under each memory/speed preset.

GPU (the real figures): builds the full 12.9B `Krea2Transformer2DModel()` with random weights directly on the device
(meta -> to_empty -> init; no download, no 26 GB CPU copy), LoRA rank 32 on the attention projections, batch 1,
1024 px (4096 image tokens), a 512-token padded text stack with `--caption-tokens` valid tokens, and prints per
configuration: s/step, peak allocated/reserved GiB, MFU and the speed-up over the baseline.

    python scripts/bench_step.py                       # all configurations, on CUDA if present
    python scripts/bench_step.py --configs baseline,bf16_ckpt --steps 10 --json out.json

Baseline = the plain loop diffusers' Krea 2 LoRA example runs: stock attention processor (k/v heads repeated, mask
always passed), text padded to 512 tokens, checkpointing on every block, no compile, no fusion.

CPU: with no CUDA device the same script runs the tiny model for a couple of steps (`--tiny` forces it), so CI
exercises every code path; compile uses the aot_eager backend there (no C++ build on CI), and MFU is not printed.

FLOPs: counted from the architecture (matmuls + attention, 2 FLOPs per MAC). Training = forward x (2 + fraction of
blocks checkpointed), since the frozen base needs input gradients only; at 1024 px this gives ~2.5e14 without and
~3.6e14 with full checkpointing (FACTS.md). MFU uses the useful work (valid text + image tokens, no recompute);
HFU counts what ran (padding, recompute). Peak device throughput: --peak-tflops (default 790, bf16 matmul on H100).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from krea2_train.config.memory import resolve_memory_settings  # noqa: E402
from krea2_train.runtime import (
    memory,  # noqa: E402
    speed,  # noqa: E402
)
from krea2_train.train.step import flow_matching_loss  # noqa: E402

LORA_TARGETS = r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|to_gate)"

# name -> (memory settings, baseline?)
CONFIGS = {
    "baseline": (dict(quantize="none", gradient_checkpointing=True, attention_backend="torch", trim_text_padding=False),
                 True),
    "bf16_ckpt_nofuse": (dict(quantize="none", gradient_checkpointing=True, fuse_qkv=False), False),
    "bf16_ckpt": (dict(quantize="none", gradient_checkpointing=True, fuse_qkv=True), False),
    "bf16_ckpt_compile": (dict(quantize="none", gradient_checkpointing=True, fuse_qkv=True, compile=True), False),
    # the issue's target (bf16 + checkpointing, <= 33 GiB): skip recompute on as many blocks as fit (estimate_memory)
    "bf16_33gb": (dict(quantize="none", gradient_checkpointing=True, checkpoint_blocks=24, fuse_qkv=True, compile=True),
                  False),
    "int8": (dict(preset="24gb"), False),
    "fp8": (dict(preset="24gb", quantize="fp8"), False),
    "fp8_mm": (dict(preset="24gb", quantize="fp8", fp8_matmul=True), False),
    "nf4_offload": (dict(preset="16gb"), False),
    "preset_48gb": (dict(preset="48gb"), False),
    "preset_80gb": (dict(preset="80gb"), False),
}
DEFAULT_GPU = "baseline,bf16_ckpt_nofuse,bf16_ckpt,bf16_ckpt_compile,int8,nf4_offload"
DEFAULT_CPU = "baseline,bf16_ckpt_nofuse,bf16_ckpt,bf16_ckpt_compile,int8,fp8,fp8_mm,nf4_offload"


# ------------------------------------------------------------------------------------------------------- model
def build_model(tiny: bool, device: torch.device, dtype: torch.dtype):
    from diffusers import Krea2Transformer2DModel

    # Full architecture: the class defaults are the real config. Build on meta in the target dtype, then allocate on
    # the device and initialise there. The tiny model goes through the same code so CI covers it.
    if tiny:
        from krea2_train.models.tiny import TINY_TRANSFORMER as config
    else:
        config = {}
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = Krea2Transformer2DModel(**config)
    finally:
        torch.set_default_dtype(old)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and "scale_shift_table" not in name:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]), generator=gen)
            else:
                p.zero_()
    # diffusers keeps the RMSNorm scales in fp32 (_keep_in_fp32_modules)
    for mname, mod in model.named_modules():
        if type(mod).__name__ == "Krea2RMSNorm":
            mod.float()
    return model.eval()


def add_lora(model, rank: int):
    from peft import LoraConfig

    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, init_lora_weights=True))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # LoRA weights train in fp32, as diffusers' examples cast them
    return model


def make_batch(model, resolution: int, text_tokens: int, caption_tokens: int, device, dtype, seed=0):
    cfg = model.config
    side = resolution // 16
    n_img = side * side
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x0 = torch.randn(1, n_img, cfg.in_channels, generator=gen).to(device, dtype)
    noise = torch.randn(1, n_img, cfg.in_channels, generator=gen).to(device, dtype)
    text = torch.randn(1, text_tokens, cfg.num_text_layers, cfg.text_hidden_dim, generator=gen).to(device, dtype)
    mask = torch.zeros(1, text_tokens, dtype=torch.bool)
    mask[:, :caption_tokens] = True
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_pos = torch.stack([torch.zeros(n_img, dtype=torch.long), rows.flatten(), cols.flatten()], dim=1)
    pos = torch.cat([torch.zeros(text_tokens, 3, dtype=torch.long), img_pos]).to(device)
    return dict(x0=x0, noise=noise, text=text, mask=mask.to(device), pos=pos, n_img=n_img)


# ------------------------------------------------------------------------------------------------------- flops
def forward_flops(cfg, n_text: int, n_img: int) -> float:
    """Matmul + attention FLOPs of one forward of the transformer blocks (text fusion and embedders add <1%)."""
    d = cfg.attention_head_dim * cfg.num_attention_heads
    kv = cfg.attention_head_dim * cfg.num_key_value_heads
    s = n_text + n_img
    linear = 2 * s * d * (d + 2 * kv + d + d) + 2 * s * 3 * d * cfg.intermediate_size
    attention = 2 * 2 * s * s * d
    return cfg.num_layers * (linear + attention)


def step_flops(cfg, n_text, n_img, ckpt_fraction):
    return forward_flops(cfg, n_text, n_img) * (2.0 + ckpt_fraction)


# ------------------------------------------------------------------------------------------------------- bench
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_config(name, args, device, dtype):
    overrides, is_baseline = CONFIGS[name]
    settings = resolve_memory_settings(dict(overrides))
    if args.attention_backend and not is_baseline:
        settings.attention_backend = args.attention_backend
    compile_kwargs = {} if device.type == "cuda" else dict(backend="aot_eager")

    torch._dynamo.reset()
    model = build_model(args.tiny, device, dtype)
    add_lora(model, args.rank)
    if is_baseline:
        speed.set_plain_attention(model)
        memory.enable_checkpointing(model, None)
    else:
        memory.apply_memory_settings(model, settings, device, compute_dtype=dtype, compile_kwargs=compile_kwargs)
    params = [p for p in model.parameters() if p.requires_grad]
    if settings.optimizer_8bit and device.type == "cuda" and not is_baseline:
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(params, lr=1e-5)
    else:
        opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    batch = make_batch(model, args.resolution, args.text_tokens, args.caption_tokens, device, dtype)

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    gen = torch.Generator(device="cpu").manual_seed(1)

    # bf16 runs compute under autocast, as the trainer (and the diffusers example, through accelerate) does: the fp32
    # LoRA weights then run bf16 matmuls
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step():  # the trainer's own loss (train/step.py), so the figures are training's
        sigma = torch.rand(1, generator=gen).to(device)
        loss = flow_matching_loss(model, batch["x0"], batch["noise"], sigma, batch["text"], batch["pos"],
                                  batch["mask"], dtype=dtype, autocast=autocast).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        loss = step()
    sync(device)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync(device)
    s_per_step = (time.perf_counter() - t0) / args.steps

    cfg = model.config
    ckpt = getattr(model, "_krea2_checkpoint_blocks", 0) if model.gradient_checkpointing else 0
    frac = ckpt / cfg.num_layers
    trimmed = settings.trim_text_padding and not is_baseline
    ran_text = args.caption_tokens if trimmed else args.text_tokens
    model_flops = step_flops(cfg, args.caption_tokens, batch["n_img"], 0.0)
    hw_flops = step_flops(cfg, ran_text, batch["n_img"], frac)
    row = dict(config=name, s_per_step=s_per_step, warmup_s=warm_s, loss=float(loss.detach()), checkpointed_blocks=ckpt,
               quantize=settings.quantize, offload=settings.offload_blocks, compile=settings.compile,
               fuse_qkv=settings.fuse_qkv and not is_baseline, text_tokens_run=ran_text,
               model_flops=model_flops, executed_flops=hw_flops)
    if device.type == "cuda":
        row["peak_alloc_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        row["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        peak = args.peak_tflops * 1e12
        row["mfu"] = model_flops / s_per_step / peak
        row["hfu"] = hw_flops / s_per_step / peak
    model = opt = params = batch = None  # free the GPU before the next configuration
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--tiny", action="store_true", help="tiny model (default on CPU)")
    ap.add_argument("--configs", default=None, help=f"comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (GPU 10, CPU 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (GPU 3, CPU 1)")
    ap.add_argument("--resolution", type=int, default=None, help="pixels (GPU 1024, tiny 256)")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--text-tokens", type=int, default=512, help="padded text length (max prompt length)")
    ap.add_argument("--caption-tokens", type=int, default=128, help="valid caption tokens in the padded text")
    ap.add_argument("--attention-backend", default=None, help=f"one of {speed.SDPA_BACKENDS} for non-baseline runs")
    ap.add_argument("--peak-tflops", type=float, default=790.0)
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default 1 on CPU: the tiny model gains "
                    "nothing from more, and shared CI cores make multi-threaded timings noise)")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        args.tiny = True
        torch.set_num_threads(args.threads or 1)
    elif args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.steps = args.steps or (10 if device.type == "cuda" else 2)
    args.warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 1)
    args.resolution = args.resolution or (256 if args.tiny else 1024)
    names = (args.configs or (DEFAULT_GPU if device.type == "cuda" else DEFAULT_CPU)).split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown configs {unknown}; known: {list(CONFIGS)}")
    if args.caption_tokens > args.text_tokens:
        ap.error("--caption-tokens must be <= --text-tokens")

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    header = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), device=where,
                  torch=torch.__version__, model="tiny" if args.tiny else "full 12.9B", resolution=args.resolution,
                  batch=1, rank=args.rank, text_tokens=args.text_tokens, caption_tokens=args.caption_tokens,
                  steps=args.steps, warmup=args.warmup, command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]))
    print("# " + json.dumps(header))
    rows = []
    cols = f"{'config':<20}{'s/step':>10}{'peak GiB':>10}{'rsv GiB':>10}{'MFU':>8}{'HFU':>8}{'speed-up':>10}"
    print(cols)
    for name in names:
        row = bench_config(name, args, device, dtype)
        rows.append(row)
        base = next((r for r in rows if r["config"] == "baseline"), None)
        row["speedup_vs_baseline"] = base["s_per_step"] / row["s_per_step"] if base else None

        def fmt(key, spec):
            return format(row[key], spec) if row.get(key) is not None else "n/a"

        print(f"{name:<20}{row['s_per_step']:>10.4f}{fmt('peak_alloc_gib', '.2f'):>10}"
              f"{fmt('peak_reserved_gib', '.2f'):>10}{fmt('mfu', '.1%'):>8}{fmt('hfu', '.1%'):>8}"
              f"{fmt('speedup_vs_baseline', '.2f'):>10}", flush=True)
        if not math.isfinite(row["loss"]):
            print(f"  warning: non-finite loss in {name}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(header=header, rows=rows), indent=2))
    return rows


if __name__ == "__main__":
    main()
