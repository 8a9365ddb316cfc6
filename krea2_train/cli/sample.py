"""`krea2-train sample`: images from the command line through the shared inference core."""

from __future__ import annotations

from pathlib import Path


def _sample(args) -> int:
    from krea2_train.errors import UserError
    from krea2_train.inference import Generator, SampleSettings, apply_loras, initial_noise
    from krea2_train.models.loading import load_transformer
    from krea2_train.models.micro import model_set
    from krea2_train.models.text_encoder import TextEncoder
    from krea2_train.models.vae import VAE
    from krea2_train.utils.io import write_bytes_atomic

    models = model_set(args.models) if args.models else None  # `micro` (manifest-checked) or a make-tiny folder
    transformer = args.transformer or (str(getattr(models, f"transformer_{args.variant}")) if models else None)
    text_encoder = args.text_encoder or (str(models.text_encoder) if models else None)
    vae_path = args.vae or (str(models.vae) if models else None)
    if not (transformer and text_encoder and vae_path):
        raise UserError("sample needs the model files: give --models DIR (a folder laid out like `make-tiny` "
                        "writes), or all of --transformer, --text-encoder and --vae")
    if args.strength and len(args.strength) not in (1, len(args.lora)):
        raise UserError(f"{len(args.strength)} --strength values for {len(args.lora)} --lora files: give one per "
                        "LoRA, or one for all")
    from krea2_train.cli.export import resolve_lora

    loras = [resolve_lora(x) for x in args.lora]  # files or run folders, read before any model loads
    sweep = _parse_strengths(args.strengths) if args.strengths else None
    if sweep and len(loras) != 1:
        raise UserError("--strengths sweeps one LoRA: give exactly one --lora")
    initial_noise(1, args.height, args.width, 0)  # size errors before minutes of model loading
    device = args.device or ("cuda" if __import__("torch").cuda.is_available() else "cpu")
    model = load_transformer(transformer, dtype=args.dtype, device=device)
    strengths = (args.strength * len(loras) if len(args.strength) == 1 else args.strength) or [1.0] * len(loras)
    names = []
    if loras and not sweep:
        names = apply_loras(model, list(zip(loras, strengths)))
    generator = Generator(model, TextEncoder.from_path(text_encoder, dtype=args.dtype, device=device,
                                                       tokenizer=getattr(args, "tokenizer", None)),
                          VAE.from_path(vae_path, device=device))
    preset = SampleSettings.turbo if args.variant == "turbo" else SampleSettings.raw
    overrides = {k: v for k, v in dict(steps=args.steps, guidance=args.guidance).items() if v is not None}
    settings = preset(height=args.height, width=args.width, seed=args.seed, **overrides)
    out = Path(args.out)
    if sweep:
        from krea2_train.utils.grid import image_grid

        columns = []
        for s in sweep:  # one adapter, re-weighted per column; 0 = the base model
            name = apply_loras(model, [(loras[0], s)])[0]
            try:
                columns.append(generator(args.prompt, settings, negative_prompt=args.negative, progress=True))
            finally:
                model.delete_adapters([name])
        label = f"{args.variant} {settings.steps} steps, seed {settings.seed}: {loras[0].stem} at "
        png = image_grid(columns, [label + f"{s:g}" if i == 0 else f"{s:g}" for i, s in enumerate(sweep)],
                         row_labels=list(args.prompt))
        print(write_bytes_atomic(_fresh(out / f"sweep_{loras[0].stem}_seed{settings.seed}.png"), png))
        return 0
    images = generator(args.prompt, settings, negative_prompt=args.negative, progress=True)
    tag = "".join(f"_{Path(lora).stem}@{s:g}" for lora, s in zip(loras, strengths)) if names else ""
    for i, image in enumerate(images):
        import io

        buf = io.BytesIO()
        image.save(buf, format="PNG")
        print(write_bytes_atomic(_fresh(out / f"sample_{settings.seed}_{i}{tag}.png"), buf.getvalue()))
    return 0


def _parse_strengths(text: str) -> list[float]:
    from krea2_train.errors import UserError

    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--strengths {text!r}: give numbers separated by commas, e.g. 0,0.5,1,1.5") from None


def _fresh(path: Path) -> Path:
    """`path`, or path-2, path-3 ... when it exists: sampling never overwrites an earlier picture."""
    k = 2
    candidate = path
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{k}{path.suffix}")
        k += 1
    return candidate


def register(sub) -> None:
    p = sub.add_parser("sample", help="generate images with Raw or Turbo, optionally with LoRAs")
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeat for several images)")
    p.add_argument("--negative", default="", help="negative prompt (used when guidance > 0)")
    p.add_argument("--variant", choices=["raw", "turbo"], default="turbo",
                   help="schedule: turbo = 8 steps, mu 1.15, no guidance; raw = 28 steps, guidance 4.5, shifted")
    p.add_argument("--models", help="`micro` (the shipped micro Krea 2), or a folder with "
                   "transformer_{raw,turbo}.safetensors, text_encoder/, vae/ (as written by make-tiny)")
    p.add_argument("--transformer", help="transformer checkpoint (single file or diffusers folder)")
    p.add_argument("--text-encoder", help="Qwen3-VL folder, or ComfyUI's qwen3vl_4b_*.safetensors (with --tokenizer)")
    p.add_argument("--tokenizer", help="tokenizer folder for a single-file text encoder (Hugging Face Qwen3-VL "
                                       "folder or ComfyUI's comfy/text_encoders/qwen25_tokenizer)")
    p.add_argument("--vae", help="Qwen-Image VAE folder or file")
    p.add_argument("--height", type=int, default=1024, help="image height in px, a multiple of 16 (default 1024)")
    p.add_argument("--width", type=int, default=1024, help="image width in px, a multiple of 16 (default 1024)")
    p.add_argument("--steps", type=int, help="default: 8 for turbo, 28 for raw")
    p.add_argument("--guidance", type=float, help="Krea 2 convention: v = cond + g (cond - uncond); default 0 "
                   "for turbo, 4.5 for raw")
    p.add_argument("--seed", type=int, default=0, help="noise seed (the same seed gives the same image on any device)")
    p.add_argument("--lora", action="append", default=[], help="LoRA file or training run folder runs/NAME (repeatable)")
    p.add_argument("--strength", action="append", type=float, default=[],
                   help="strength per --lora, in order (one value applies to all; default 1.0)")
    p.add_argument("--dtype", default="bfloat16", help="weights dtype: bfloat16 (default), float16 or float32")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--out", default="samples", help="output folder for PNGs (default ./samples)")
    p.add_argument("--strengths", help="comma-separated strengths for one --lora, e.g. 0,0.5,1,1.5: writes one "
                   "labelled grid (a column per strength, a row per prompt)")
    p.set_defaults(func=_sample)
