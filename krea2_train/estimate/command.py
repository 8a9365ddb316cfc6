"""`krea2-train estimate CONFIG`: the estimate for every stage of a run config, the verdict against a card, and the
presets that would fit."""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from krea2_train.config.memory import resolve_memory_settings
from krea2_train.errors import UserError
from krea2_train.estimate.static import (
    GiB,
    apply_settings,
    build_meta_model,
    estimate_model,
    fsdp_layout,
    fsdp_totals,
    static_bytes,
)
from krea2_train.estimate.trace import trace_step
from krea2_train.runtime.sharding import check_fsdp_settings
from krea2_train.train.optim import optimizer_name

# --------------------------------------------------------------------------------------- a run config's stages
PRESET_GB = {"80gb": 80, "48gb": 48, "24gb": 24, "16gb": 16}  # largest first
DEFAULT_CARD_GB = 24
CAVEATS = ("an estimate on the meta device, not a measurement: allowance for CUDA context, workspaces and "
           "fragmentation included; torch.compile buffers, previews/validation and the optimiser step's own "
           "temporaries not modelled")


def _compute_dtype(mixed_precision: str):
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)


def estimate_config(cfg, memory_settings=None, *, gpus: int = 1, fsdp: bool | None = None, tiny: bool = False,
                    text_tokens: int | None = None, caption_tokens: int = 128, on_stage=None) -> dict:
    """Estimate every stage of `train.stages` with the config's own model dtype, mixed precision, LoRA, optimiser
    and memory settings (`memory_settings`: a MemorySettings to use instead of the config's `memory:`). `fsdp`
    (default train.fsdp): per-GPU FSDP figures over `gpus` processes. `tiny`: the tiny architecture whatever
    model.architecture says. `on_stage(i, stage)` is called before each stage's trace (progress).
    Returns dict(settings, optimizer, fsdp, gpus, architecture, stages=[row per stage])."""
    from krea2_train.facts import MAX_PROMPT_TOKENS
    from krea2_train.train import lora as lora_mod

    text_tokens = text_tokens or MAX_PROMPT_TOKENS
    if not 1 <= caption_tokens <= text_tokens:
        raise UserError(f"--caption-tokens={caption_tokens} must be between 1 and the text length {text_tokens}")
    if memory_settings is None:
        try:
            memory_settings = resolve_memory_settings(dataclasses.asdict(cfg.memory))
        except ValueError as exc:
            raise UserError(str(exc)) from exc
    settings = memory_settings
    fsdp = cfg.train.fsdp if fsdp is None else fsdp
    if gpus < 1:
        raise UserError(f"--gpus={gpus} must be at least 1")
    if fsdp:
        check_fsdp_settings(cfg, settings)
    optimizer = optimizer_name(cfg.optimizer, settings)  # the trainer's own choice
    architecture = "tiny" if tiny else cfg.model.architecture
    if architecture != "tiny" and cfg.model.models == "micro":  # the shipped micro model's sizes, not the 12.9B
        from krea2_train.models.micro import MICRO_TRANSFORMER as arch

        architecture = "micro"
    elif architecture == "tiny":
        from krea2_train.models.tiny import TINY_TRANSFORMER as arch
    else:  # krea2, or auto (no file is read): the full 12.9B model, diffusers' defaults
        arch = {}
    notes = []
    settings = _base_file_settings(cfg, settings, fsdp, notes)
    dtype = getattr(torch, cfg.model.dtype)
    compute = _compute_dtype(cfg.train.mixed_precision)
    model = build_meta_model(arch, dtype)
    lora_mod.add_lora(model, cfg.lora, seed=cfg.seed)  # the trainer's targets, PEFT config and fp32 adapter
    model.train()
    settings, _ = apply_settings(model, settings, fsdp=fsdp, compute_dtype=compute)
    st = static_bytes(model, offload=settings.offload_blocks, optimizer=optimizer)
    layout = fsdp_layout(model, gpus) if fsdp else None
    rows = []
    for i, stage in enumerate(cfg.train.stages):
        if on_stage:
            on_stage(i, stage)
        t0 = time.perf_counter()
        row = dict(stage=i, resolution=stage.resolution, batch=stage.batch_size,
                   image_tokens=(stage.resolution // 16) ** 2)
        if fsdp:
            tr = trace_step(model, settings, False, stage.resolution, text_tokens, caption_tokens, dtype=dtype,
                            batch=stage.batch_size, autocast_dtype=compute)
            t = fsdp_totals(layout, tr["peak_without_grads"], st["optimizer"] / max(st["trainable_numel"], 1))
            row.update(est_alloc_gib=t["alloc"] / GiB, est_card_gib=t["card"] / GiB,
                       parts_gib={k: v / GiB for k, v in t["parts"].items()})
        else:
            row.update(estimate_model(model, settings, False, stage.resolution, text_tokens, caption_tokens,
                                      batch=stage.batch_size, optimizer=optimizer, dtype=dtype,
                                      autocast_dtype=compute, static=st))
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
    return dict(settings=settings, optimizer=optimizer, fsdp=bool(fsdp), gpus=gpus, architecture=architecture,
                text_tokens=text_tokens, caption_tokens=caption_tokens, stages=rows, notes=notes)


def _base_file_settings(cfg, settings, fsdp: bool, notes: list):
    """The settings the trainer ends up with for the base *file* it will read: a ComfyUI fp8 / int8 file keeps its
    block weights 1 byte (train/trainer.py loads with keep_quantized unless FSDP), which costs what quantize=int8
    does; nvfp4 / mxfp8 files are expanded to model.dtype on load. Appends a line to `notes` saying which."""
    from pathlib import Path

    from krea2_train.models.inspect import block_weight_storage, is_transformer_checkpoint

    path = cfg.model.transformer
    if not path or not is_transformer_checkpoint(Path(str(path)).expanduser()):
        return settings
    storage, formats = block_weight_storage(Path(str(path)).expanduser())
    if storage == "one_byte" and settings.quantize == "none" and not fsdp:
        notes.append(f"base file {path} stores the block weights as {', '.join(formats)}: they stay 1 byte on the "
                     "GPU, estimated as memory.quantize: int8")
        return dataclasses.replace(settings, quantize="int8")
    if storage == "one_byte" and fsdp:
        notes.append(f"base file {path} ({', '.join(formats)}) is dequantised to {cfg.model.dtype} under FSDP")
    elif storage == "dequantised":
        notes.append(f"base file {path} ({', '.join(formats)}) is dequantised to {cfg.model.dtype} on load: it costs "
                     f"what a {cfg.model.dtype} base does (memory.quantize applies after)")
    return settings


def _explicit_memory_keys(cfg) -> list[str]:
    """memory.* keys the user set besides the preset (they would win over a suggested preset)."""
    from krea2_train.config.memory import MemorySettings

    default = MemorySettings()
    return [f.name for f in dataclasses.fields(MemorySettings)
            if f.name != "preset" and getattr(cfg.memory, f.name) != getattr(default, f.name)]


def smaller_presets(current: str | None, card_gb: float) -> list[str]:
    """Presets to try, largest first: those smaller than the current preset, or (none set) those for at most the
    card's size."""
    if current in PRESET_GB:
        return [p for p, gb in PRESET_GB.items() if gb < PRESET_GB[current]]
    return [p for p, gb in PRESET_GB.items() if gb <= card_gb]


def _a(gb: float) -> str:
    return f"an {gb:g}" if str(f"{gb:g}").startswith(("8", "11", "18")) else f"a {gb:g}"


def verdict(cfg, result: dict, card_gb: float, estimate_preset=None, estimate_all_checkpointed=None) -> list[str]:
    """Lines saying whether the largest stage fits `card_gb` (usable GiB taken = nominal GB, as BENCHMARKS.md does),
    and if not what would, found by re-estimating: first checkpointing every block (`estimate_all_checkpointed()`,
    when some are not), then the next smaller preset (`estimate_preset(name)` -> result)."""
    worst = max(result["stages"], key=lambda r: r["est_card_gib"])
    need = worst["est_card_gib"]
    where = "per GPU " if result["fsdp"] else ""
    if need <= card_gb:
        return [f"fits {_a(card_gb)} GB card {where}with {card_gb - need:.1f} GiB to spare "
                f"(largest: stage {worst['stage']}, {worst['resolution']} px x {worst['batch']})"]
    line = (f"needs ~{need:.1f} GiB {where}(stage {worst['stage']}, {worst['resolution']} px x {worst['batch']}): "
            f"more than {_a(card_gb)} GB card")
    s = result["settings"]
    if estimate_all_checkpointed is not None and not s.offload_blocks and (
            not s.gradient_checkpointing or s.checkpoint_blocks is not None):
        other = estimate_all_checkpointed()
        est = max(r["est_card_gib"] for r in other["stages"]) if other else None
        if est is not None and est <= card_gb:  # cheapest fix: recompute more, same precision
            return [line, f"try memory.gradient_checkpointing: true with memory.checkpoint_blocks: null (every "
                          f"block; est. {est:.1f} GiB {where}- slower per step)"]
    tried = []
    for preset in smaller_presets(result["settings"].preset, card_gb) if estimate_preset else []:
        other = estimate_preset(preset)
        if other is None:  # not possible with these settings (e.g. FSDP and a quantised preset)
            continue
        est = max(r["est_card_gib"] for r in other["stages"])
        tried.append(f"memory.preset: {preset} (est. {est:.1f} GiB)")
        if est <= card_gb:
            break
    if not tried:
        return [line + ("; lower the stage's resolution or batch_size" if not result["fsdp"]
                        else "; lower the resolution or batch_size, or shard over more GPUs (--gpus)")]
    extra = _explicit_memory_keys(cfg)
    note = f" (without the explicit memory keys {', '.join(extra)})" if extra else ""
    if est <= card_gb:
        return [line, f"try {tried[-1]}{note}"]
    return [line, f"smaller presets estimated: {', '.join(tried)}{note}; none fits: lower the stage's resolution "
                  "or batch_size"]


def _fmt_table(result: dict, card_gb: float) -> list[str]:
    worst = max(range(len(result["stages"])), key=lambda i: result["stages"][i]["est_card_gib"])
    head = f"{'stage':>5}  {'resolution':>10}  {'batch':>5}  {'img tokens':>10}  {'est. peak GiB':>13}  " \
           f"{'est. card GiB':>13}"
    out = [head, "-" * len(head)]
    for i, r in enumerate(result["stages"]):
        mark = "  <- largest" if i == worst and len(result["stages"]) > 1 else ""
        fits = "" if r["est_card_gib"] <= card_gb else "  (over)"
        out.append(f"{r['stage']:>5}  {str(r['resolution']) + ' px':>10}  {r['batch']:>5}  "
                   f"{r['batch'] * r['image_tokens']:>10}  {r['est_alloc_gib']:>13.2f}  {r['est_card_gib']:>13.2f}"
                   f"{mark}{fits}")
    return out


def estimate_command(args) -> int:
    """`krea2-train estimate CONFIG [key=value ...] [--gpus N] [--card GB] [--fsdp] [--caption-tokens N]`."""
    from rich.console import Console

    from krea2_train.config import load_config

    cfg = load_config(args.config, args.overrides, warn_paths=False)
    torch.set_num_threads(1)
    console = Console(stderr=True)
    fsdp = True if args.fsdp else None
    settings = resolve_memory_settings(dataclasses.asdict(cfg.memory))
    card_gb = args.card if args.card is not None else PRESET_GB.get(settings.preset, DEFAULT_CARD_GB)
    if card_gb <= 0:
        raise UserError(f"--card={card_gb} must be a positive number of GB")
    if (args.fsdp or cfg.train.fsdp) and args.gpus < 2:
        raise UserError("FSDP shards over several GPUs: pass --gpus N (N >= 2) to estimate the per-GPU figure")
    common = dict(gpus=args.gpus, fsdp=fsdp, tiny=args.tiny, caption_tokens=args.caption_tokens)
    # the re-estimates for suggestions build quantised layers; their INFO lines are not news to the user
    logging.getLogger("krea2_train.runtime.memory").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    with console.status("estimating ...") as status:
        def progress(what):
            return lambda i, st: status.update(f"{what}stage {i} ({st.resolution} px, batch {st.batch_size}): "
                                               "tracing forward + backward on the meta device ...")

        result = estimate_config(cfg, on_stage=progress(""), **common)

        def estimate_preset(preset):
            try:
                return estimate_config(cfg, resolve_memory_settings(dict(preset=preset)),
                                       on_stage=progress(f"memory.preset: {preset}, "), **common)
            except UserError:  # e.g. FSDP refuses a quantised preset
                return None

        def estimate_all_checkpointed():
            every = dataclasses.replace(settings, gradient_checkpointing=True, checkpoint_blocks=None)
            try:
                return estimate_config(cfg, every, on_stage=progress("every block checkpointed, "), **common)
            except UserError:
                return None

        lines = verdict(cfg, result, card_gb, estimate_preset, estimate_all_checkpointed)
    s = result["settings"]
    arch = {"tiny": "tiny test model", "micro": "micro model"}.get(result["architecture"], "full-size model")
    mem = f"memory.preset: {s.preset}" if s.preset else "memory: no preset"
    knobs = [f"quantize {s.quantize}", "offload" if s.offload_blocks else None,
             (f"checkpointing {'all' if s.checkpoint_blocks is None else s.checkpoint_blocks} blocks"
              if s.gradient_checkpointing or s.offload_blocks else "no checkpointing"),
             "fused q/k/v" if s.fuse_qkv and not result["fsdp"] and s.quantize == "none" and not s.offload_blocks
             else None]
    kind = {"lora": "LoRA", "dora": "DoRA", "lokr": "LoKr"}[cfg.lora.type]
    print(f"{args.config}: {arch} ({cfg.model.dtype}, mixed precision {cfg.train.mixed_precision}), {kind} rank "
          f"{cfg.lora.rank} on {cfg.lora.targets}, {result['optimizer']}, {mem} ({', '.join(k for k in knobs if k)})")
    if result["fsdp"]:
        print(f"FSDP over {result['gpus']} GPU(s): figures are per GPU (batch_size per GPU)")
    elif args.gpus > 1:
        print(f"DDP over {args.gpus} GPUs: every GPU needs the figures below (set train.fsdp or --fsdp to shard)")
    print(f"text: {result['caption_tokens']} valid caption tokens of {result['text_tokens']} (--caption-tokens); "
          "image tokens = (resolution/16)^2 per image; non-square buckets of the same area have the same count")
    print("\n".join(_fmt_table(result, card_gb)))
    for line in result.get("notes", []):
        print(line)
    for line in lines:
        print(line)
    print(f"note: {CAVEATS}. ({time.perf_counter() - t0:.0f} s)")
    return 0
