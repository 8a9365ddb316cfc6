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

    turbo_lora = _turbo_lora(args)  # checked before any model loads
    if turbo_lora is not None and args.variant == "turbo":
        raise UserError("--turbo-lora goes on Raw (it is Turbo minus Raw): drop --variant turbo, and give Raw as "
                        "--transformer (or --models DIR, whose Raw is used)")
    variant = args.variant or ("raw" if turbo_lora is not None else "turbo")
    models = model_set(args.models) if args.models else None  # `micro` (manifest-checked) or a make-tiny folder
    transformer = args.transformer or (str(getattr(models, f"transformer_{variant}")) if models else None)
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
    references = _references(args.reference)  # unreadable files before model loading
    args.reference_method = args.reference_method or _trained_method(args.lora, loras)
    device = args.device or ("cuda" if __import__("torch").cuda.is_available() else "cpu")
    strengths, why = _strengths(args, loras, on_turbo=variant == "turbo" and turbo_lora is None)
    model = load_transformer(transformer, dtype=args.dtype, device=device)
    names = []
    if loras and not sweep:
        names = apply_loras(model, list(zip(loras, strengths)))
    generator = Generator(model, TextEncoder.from_path(text_encoder, dtype=args.dtype, device=device,
                                                       tokenizer=getattr(args, "tokenizer", None)),
                          VAE.from_path(vae_path, device=device))
    preset = SampleSettings.turbo if variant == "turbo" else SampleSettings.raw
    overrides = {k: v for k, v in dict(steps=args.steps, guidance=args.guidance).items() if v is not None}
    if turbo_lora is not None:  # the shared recipe: Turbo's schedule (shift 1.15, no CFG) at 12 steps on Raw
        from krea2_train.lora.turbo import RECIPE_MU, RECIPE_STEPS

        preset = SampleSettings.turbo
        overrides = {"steps": RECIPE_STEPS, "mu": RECIPE_MU, **overrides}
    settings = preset(height=args.height, width=args.width, seed=args.seed, scheduler=args.scheduler, **overrides)
    out = Path(args.out)

    def generate():
        if turbo_lora is None:
            return generator(args.prompt, settings, negative_prompt=args.negative, progress=True,
                             references=references, reference_method=args.reference_method)
        from krea2_train.inference import stacked_lora
        from krea2_train.lora.turbo import TURBO_LORA_ADAPTER

        with stacked_lora(model, turbo_lora, args.turbo_lora_strength, TURBO_LORA_ADAPTER):
            return generator(args.prompt, settings, negative_prompt=args.negative, progress=True,
                             references=references, reference_method=args.reference_method)

    what = variant if turbo_lora is None else f"raw + turbo lora {args.turbo_lora_strength:g}"
    what += f", {args.scheduler}" if args.scheduler != "simple" else ""
    # what was used, in one place: a picture alone does not say its strength, steps or seed
    print(f"sample: {variant} {transformer}"
          + (f" + Turbo LoRA {args.turbo_lora} at {args.turbo_lora_strength:g}" if turbo_lora is not None else "")
          + f"; {settings.steps} steps, guidance {settings.guidance:g}, {settings.scheduler} schedule, "
          f"{settings.width}x{settings.height} px, seed {settings.seed} (each prompt)"
          + (f", references: {len(references)} ({args.reference_method})" if references else "") + f"; -> {out}/")
    for lora, s, note in zip(loras, strengths, why):
        print(f"  LoRA {lora} at " + (f"strengths {', '.join(f'{x:g}' for x in sweep)}" if sweep else
                                      f"{s:g} ({note})"))
    if sweep:
        from krea2_train.utils.grid import image_grid

        columns = []
        for s in sweep:  # one adapter, re-weighted per column; 0 = the base model
            name = apply_loras(model, [(loras[0], s)])[0]
            try:
                columns.append(generate())
            finally:
                model.delete_adapters([name])
        label = f"{what} {settings.steps} steps, seed {settings.seed}: {loras[0].stem} at "
        png = image_grid(columns, [label + f"{s:g}" if i == 0 else f"{s:g}" for i, s in enumerate(sweep)],
                         row_labels=list(args.prompt))
        print(write_bytes_atomic(_fresh(out / f"sweep_{loras[0].stem}_seed{settings.seed}.png"), png))
        return 0
    images = generate()
    tag = "".join(f"_{Path(lora).stem}@{s:g}" for lora, s in zip(loras, strengths)) if names else ""
    tag = (f"_turbolora@{args.turbo_lora_strength:g}" if turbo_lora is not None else "") + tag
    tag += f"_{args.scheduler}" if args.scheduler != "simple" else ""
    for prompt, image in zip(args.prompt, images):
        import io

        buf = io.BytesIO()
        image.save(buf, format="PNG")
        print(write_bytes_atomic(_fresh(out / f"{_slug(prompt)}_seed{settings.seed}{tag}.png"), buf.getvalue()))
    return 0


def _slug(prompt: str, limit: int = 48) -> str:
    """A file-name form of a prompt: lower-case words joined by '-', cut at a word near `limit` characters."""
    import re

    words = re.findall(r"[a-z0-9]+", prompt.lower())
    slug = ""
    for w in words:
        if slug and len(slug) + 1 + len(w) > limit:
            break
        slug = f"{slug}-{w}" if slug else w[:limit]
    return slug or "sample"


def _strengths(args, loras, on_turbo: bool) -> tuple[list[float], list[str]]:
    """Per --lora, the strength to apply and why: --strength when given (one for all, or one each); else, on the
    Turbo checkpoint, the suggested Turbo strength of a run folder's transfer report (a Raw-trained LoRA acts
    differently on Turbo), else 1.0."""
    from krea2_train.cli.export import suggested_strength
    from krea2_train.lora.tools import header_provenance

    if args.strength:
        given = args.strength * len(loras) if len(args.strength) == 1 else args.strength
        return list(given), ["--strength"] * len(loras)
    strengths, why = [], []
    for arg, path in zip(args.lora, loras):
        header = header_provenance(path)["suggested_turbo_strength"] if Path(path).is_file() else None
        suggested = suggested_strength(arg, header)
        if suggested is not None and on_turbo:
            strengths.append(suggested["value"])
            other = f" ({suggested['other']})" if suggested.get("other") else ""
            why.append(f"the suggested Turbo strength from {suggested['source']}{other}; --strength overrides")
        else:
            strengths.append(1.0)
            why.append("default" if suggested is None else
                       f"default off Turbo; the suggested {suggested['value']:g} of {suggested['source']} is for "
                       "the Turbo checkpoint")
    return strengths, why


def _trained_method(args_lora, loras) -> str:
    """The reference method the --lora LoRAs were trained with: an exported file's header (an edit LoRA's
    reference_method), else the train.reference_method of the run's config.yaml (the run folder, its adapter or
    export folder, or a file in them), else index; two that differ are refused (one sampling pass has one method)."""
    from krea2_train.errors import UserError
    from krea2_train.lora.tools import header_provenance

    found = set()
    for arg, path in zip(args_lora, loras):
        method = (header_provenance(path)["references"] or {}).get("method") if Path(path).is_file() else None
        found.update([method] if method else _config_method(Path(arg)))
    if len(found) > 1:
        raise UserError(f"the --lora LoRAs were trained with reference methods {sorted(found)}; pick one with "
                        "--reference-method")
    return found.pop() if found else "index"


def _config_method(arg: Path) -> list[str]:
    """[train.reference_method] of the run `arg` belongs to when its config.yaml trains with references, else []."""
    folder = arg.parent if arg.is_file() else arg
    folder = folder.parent if folder.name in ("adapter", "export") else folder
    cfg = folder / "config.yaml"
    if not cfg.exists():
        return []
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(OmegaConf.load(cfg))
    if not (data.get("data") or {}).get("reference"):
        return []
    return [(data.get("train") or {}).get("reference_method", "index")]


def _references(paths) -> list:
    """--reference files as RGB PIL images (an unreadable one is refused by name)."""
    from krea2_train.data.images import ImageProblem, open_image
    from krea2_train.errors import UserError

    images = []
    for p in paths or []:
        try:
            images.append(open_image(Path(p).read_bytes(), str(p)))
        except (OSError, ImageProblem) as exc:
            raise UserError(f"--reference {p}: cannot read the image ({exc})") from exc
    return images


def _turbo_lora(args):
    """The --turbo-lora file read as ComfyUI reads it (lora.turbo.TurboLora: LoRA factors + .diff/.diff_b deltas),
    or None; a checkpoint or an unclear file is refused by name."""
    if not args.turbo_lora:
        return None
    from krea2_train.errors import UserError
    from krea2_train.lora.turbo import read_turbo_lora, transformer_file_kind

    if transformer_file_kind(args.turbo_lora, "--turbo-lora") != "lora":
        raise UserError(f"--turbo-lora {args.turbo_lora} is a transformer checkpoint, not a LoRA: sample a Turbo "
                        "checkpoint with --transformer FILE --variant turbo, or give the Turbo LoRA file here")
    return read_turbo_lora(args.turbo_lora)


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
    p.add_argument("--reference", action="append", default=[], metavar="IMG",
                   help="reference image for an edit LoRA (repeatable: reference 1, 2, ...), resized and centre-"
                        "cropped to --width x --height, in context as ComfyUI's ReferenceLatent gives it")
    p.add_argument("--reference-method", choices=["index", "index_timestep_zero"], default=None,
                   help="how the references enter; default: train.reference_method of a --lora run folder, else index")
    p.add_argument("--negative", default="", help="negative prompt (used when guidance > 0; default none)")
    p.add_argument("--variant", choices=["raw", "turbo"], default=None,
                   help="schedule: turbo = 8 steps, mu 1.15, no guidance; raw = 28 steps, guidance 4.5, shifted "
                        "(default turbo; raw's file with --turbo-lora)")
    p.add_argument("--turbo-lora", help="Turbo LoRA (Turbo minus Raw, e.g. krea2_turbo_lora_rank_64_bf16.safetensors "
                   "or `krea2-train extract`) on Raw: the shared recipe, 12 steps, CFG 1 (guidance 0), Euler at "
                   "shift 1.15; --steps/--guidance override, --lora files stack on top")
    p.add_argument("--turbo-lora-strength", type=float, default=0.6,
                   help="strength of --turbo-lora (default 0.6, the recipe's; 1.0 is the whole Turbo - Raw delta)")
    p.add_argument("--scheduler", choices=["simple", "beta"], default="simple",
                   help="sigma schedule: simple (diffusers' Krea 2 schedule = ComfyUI's simple) or ComfyUI's beta "
                        "(alpha = beta = 0.6 over the model's sigmas); default simple")
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
                   help="strength per --lora, in order (one value applies to all; default: on Turbo, a run folder's "
                   "suggested Turbo strength from its transfer report, else 1.0)")
    p.add_argument("--dtype", default="bfloat16", help="weights dtype: bfloat16 (default), float16 or float32")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--out", default="samples", help="output folder for PNGs (default ./samples)")
    p.add_argument("--strengths", help="comma-separated strengths for one --lora, e.g. 0,0.5,1,1.5: writes one "
                   "labelled grid (a column per strength, a row per prompt)")
    p.set_defaults(func=_sample)
