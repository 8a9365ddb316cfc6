"""Transfer report: how a LoRA trained on Raw behaves on Turbo.

For each prompt and sigma, the LoRA's effect on a model is the velocity delta d = v(x_t; W + LoRA) - v(x_t; W).
Raw is sampled with CFG, so the effect a user sees from Raw + LoRA is the guided delta
d_raw = d_cond + g (d_cond - d_uncond) (g: Raw's guidance, d_uncond: the delta on the empty prompt); Turbo was
distilled from Raw's guided trajectories and runs without CFG, so its plain delta stands for that one. Fitting Turbo
to the conditional delta alone ignores the (1 + g) amplification of whatever the LoRA ties to the prompt (measured on
the micro model: a suggestion several times too low). We compare Turbo's delta with the guided Raw delta: ratio
|d_turbo| / |d_raw| (below 1: the LoRA acts weaker on Turbo) and their cosine (low: it pushes somewhere else, which
users see as noise). The velocity fit is the least-squares s of s * d_turbo(s) to d_raw, refined once at the fitted
strength since the effect is not exactly linear. Without a text encoder (random embeddings, no empty prompt) the
conditional delta is used, and the velocity fit is the suggestion.

With the text encoder and the VAE the suggested Turbo strength comes from samples instead (evaluate/strength.py
`look_fit`): Raw's sampled effect under CFG is not linear in its velocity delta (micro demo: velocity fit 0.89,
pictures 0.60), so Raw with and without the LoRA and Turbo over a sweep of strengths are sampled (same prompts,
LOOK_IMAGES images at seeds other than the grid's) and the strength at which the LoRA changes Turbo's samples most
like it changes Raw's is suggested.
Turbo samples without the LoRA, at strength 1 and at s are rendered side by side, with Raw + LoRA (28 steps, CFG)
for reference and the prompt above each row.

With a `style_reference` (the training images' style statistics, evaluate/style.py) the suggestion is also checked
against pictures: Turbo is sampled over a sweep of strengths, and the strength at which its style distance to the
training set equals Raw + LoRA's is reported beside the suggestion (evaluate/strength.py).

With `slider` (a concept slider's targets, train.mode: slider) the report also measures the slider's effect along
its own direction on Turbo and on Raw over negative and positive strengths (export/slider_transfer.py): monotonic,
symmetric, how strong against Raw, and the Turbo strength range to use; with pictures, slider_grid.png shows Turbo
at strengths -2 .. 2.

With `references` (an edit LoRA, data.reference) every measurement runs what the user runs: the prompts' clean
reference latents are in context (models/reference.py, the run's train.reference_method) for Turbo's clean samples,
every delta (conditional and unconditional: ComfyUI's ConditioningZeroOut keeps the reference latents) and every
picture; the grid's first column shows the references. The style check does not apply there (EDIT_STYLE_NOTE): its
numbers go to `edit_style_distance`, the reading says so and points to the edit rate. Without references the report
is the text-to-image one, unchanged.

The grid samples each prompt with the noise it gets alone (`sample_seeds`), as previews do: same prompt and seed,
same picture.

Writes transfer_report.json and transfer_grid.png into the output folder.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = ("a photo of a cat sitting on a red chair", "a portrait of a woman in soft light",
                   "a watercolor landscape with mountains")
DEFAULT_SIGMAS = (0.9, 0.7, 0.5, 0.3, 0.1)
STRENGTH_RANGE = (0.25, 3.0)
LOOK_IMAGES = 8  # images per strength for the look fit (prompts x seeds): fewer and one image's layout dominates


def _transformer(obj, dtype, device):
    from krea2_train.models.loading import load_transformer

    if obj is None or isinstance(obj, torch.nn.Module):
        return obj
    return load_transformer(obj, dtype=dtype, device=device)


def _noisy_inputs(x0: torch.Tensor, sigmas, seed: int):
    """x_t = (1 - sigma) x0 + sigma * noise for every sigma; returns a list of (x_t, sigma tensor)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=gen)
    return [((1 - s) * x0 + s * noise, torch.full((x0.shape[0],), float(s))) for s in sigmas]


@torch.no_grad()
def _deltas(transformer, lora, strengths, inputs, embeds, mask, grid, references=None,
            reference_method: str = "index") -> dict[float, list[torch.Tensor]]:
    """{strength: [velocity delta per sigma]} for `transformer` with `lora` at each strength (`references`: clean
    reference latents in context, as predict_velocity takes them)."""
    from krea2_train.inference import apply_lora, predict_velocity

    device = next(transformer.parameters()).device
    if references:
        refs = [r.to(device) for r in references]

        def run():
            return [predict_velocity(transformer, x, s, embeds, mask, grid, refs, reference_method).float().cpu()
                    for x, s in inputs]
    else:
        def run():
            return [predict_velocity(transformer, x, s, embeds, mask, grid).float().cpu() for x, s in inputs]

    inputs = [(x.to(device), s.to(device)) for x, s in inputs]
    embeds = embeds.to(device)
    mask = mask.to(device) if mask is not None else None
    base = run()
    name = apply_lora(transformer, lora, strength=1.0, adapter_name="krea2_transfer")
    out = {}
    try:
        for st in strengths:
            transformer.set_adapters([name], weights=[float(st)])
            out[float(st)] = [v - b for v, b in zip(run(), base)]
    finally:
        transformer.delete_adapters([name])
    return out


def sample_seeds(model, embeds, mask, settings, seeds, negative=None, alike: bool = True, **ref_kw) -> torch.Tensor:
    """Latents of the prompts batched once per seed, stacked; CFG with `negative` (embeds, mask) when
    settings.guidance > 0. `alike`: each prompt's noise is the one it gets sampled alone (inference.prompt_noise), as
    previews sample it (train/preview.sample_each), so the grid's rows are the previews' for the same prompt and seed;
    else one draw for the batch (initial_noise(len(prompts), ..., seed): the look fit's images, as it was measured)."""
    from krea2_train.inference import initial_noise, prompt_noise, sample_latents

    neg = negative if settings.guidance > 0 else (None, None)
    n, h, w = embeds.shape[0], settings.height, settings.width
    out = []
    for seed in seeds:
        noise = prompt_noise([seed] * n, h, w) if alike else initial_noise(n, h, w, seed)
        out.append(sample_latents(model, embeds, mask, settings, *neg, noise=noise, **ref_kw))
    return torch.cat(out)


def _fit(d_turbo, d_raw) -> float:
    num = sum(float((t * r).sum()) for t, r in zip(d_turbo, d_raw))
    den = sum(float((t * t).sum()) for t in d_turbo)
    return num / den if den > 0 else 1.0


def _cos(a, b) -> float:
    den = a.norm() * b.norm()
    return float((a * b).sum() / den) if den > 0 else 0.0


def transfer_report(lora, raw=None, turbo=None, out_dir=None, *, raw_path=None, turbo_path=None, text_encoder=None,
                    vae=None, prompts=None, sigmas=DEFAULT_SIGMAS, height: int = 1024, width: int = 1024,
                    seed: int = 0, dtype="bfloat16", device=None, render: bool = True, style_reference=None,
                    sweep=None, workflow: dict | None = None, slider=None, references=None, reference_images=None,
                    reference_method: str = "index", reference_source: str = "", reference_names=None,
                    name: str | None = None) -> dict:
    """Measure Raw vs Turbo effect of `lora` (a file in any layout, or a TrainedAdapter) and write the report;
    returns the report dict.

    `raw`/`turbo`: checkpoint paths or loaded transformers. Only one transformer is on the accelerator at a time:
    with Turbo's checkpoint known (`turbo` a path, or a loaded Turbo plus `turbo_path`) its base weights are swapped
    to Raw in place and back; a loaded Turbo without `turbo_path` waits on the CPU while Raw is measured.
    `text_encoder` (models.text_encoder.TextEncoder or a folder) encodes the prompts; without it, random text
    embeddings stand in (numbers only, no images). `vae` (models.vae.VAE or a path) is needed to render the grid.
    `style_reference`: an evaluate.style.StyleReference (or an image folder) for the style check over `sweep`
    strengths (default evaluate.strength.DEFAULT_SWEEP). `workflow`: lora/workflow.workflow_png_chunks' lora_name,
    trigger_words and models, to embed ComfyUI's graph for the suggested column in the grid PNG. `slider`: the
    slider targets (config SliderTargets or dicts with target/positive/negative/guidance) for the slider section.
    `references` (an edit LoRA): per reference k a clean latent (len(prompts) or 1, 16, h, w), in ComfyUI's order,
    run with `reference_method`; `reference_images` (PIL, one per prompt; else decoded from the latents) head the
    grid; `reference_source` says where they came from and `reference_names` (file names) go into the grid's graph;
    their style distance is reported as `edit_style_distance`, labelled as no style result. `name`: the LoRA's name in
    the report (default: the name in its header, or its path).
    """
    from krea2_train import facts
    from krea2_train.inference import SampleSettings, apply_lora, sample_latents
    from krea2_train.models.text_encoder import TextEncoder
    from krea2_train.models.vae import VAE, to_pil
    from krea2_train.schedule import pack_latents
    from krea2_train.utils.io import write_bytes_atomic, write_json_atomic

    raw, turbo = raw if raw is not None else raw_path, turbo if turbo is not None else turbo_path
    if raw is None or turbo is None or out_dir is None:
        from krea2_train.errors import UserError

        raise UserError("the transfer report needs the Raw and the Turbo checkpoints (model.transformer, "
                        "model.turbo) and an output folder")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = Path(out_dir)
    from krea2_train.lora.formats import LoraFile, TrainedAdapter

    if isinstance(lora, LoraFile):
        lora = lora.adapter
    label = name or (lora.info.get("name") or "LoRA" if isinstance(lora, TrainedAdapter) else str(lora))
    lora = lora if isinstance(lora, TrainedAdapter) else str(lora)  # apply_lora takes a path or an adapter
    prompts = list(prompts or DEFAULT_PROMPTS)
    if isinstance(text_encoder, (str, Path)):
        text_encoder = TextEncoder.from_path(text_encoder, dtype=dtype, device=device)
    if isinstance(vae, (str, Path)):
        vae = VAE.from_path(vae, device=device)

    # Where Turbo's weights can be read back from after its base weights were swapped to Raw in place.
    turbo_source = turbo_path if isinstance(turbo, torch.nn.Module) else turbo
    turbo_model = _transformer(turbo, dtype, device)
    cfg = turbo_model.config
    if text_encoder is not None:
        embeds, mask = text_encoder.encode(prompts)
    else:
        gen = torch.Generator().manual_seed(seed + 1)
        embeds = torch.randn(len(prompts), 8, cfg.num_text_layers, cfg.text_hidden_dim, generator=gen)
        mask = None
    grid = (height // facts.PIXEL_MULTIPLE, width // facts.PIXEL_MULTIPLE)
    ref_kw = {}
    if references:
        from krea2_train.models.reference import check_method

        check_method(reference_method)
        if slider:
            from krea2_train.errors import UserError

            raise UserError("the transfer report measures a slider or an edit LoRA, not both")
        bad = [tuple(r.shape) for r in references if r.dim() != 4 or r.shape[0] not in (1, len(prompts))]
        if bad:
            raise ValueError(f"reference latents {bad}: each must be (1 or {len(prompts)} prompts, 16, h, w)")
        references = [r.float().cpu() for r in references]
        ref_kw = dict(references=references, reference_method=reference_method)

    # Clean latents x0: Turbo's own sample for each prompt (what the LoRA edits in practice), else noise-like.
    turbo_settings = SampleSettings.turbo(height=height, width=width, seed=seed)
    if text_encoder is not None:
        x0 = pack_latents(sample_latents(turbo_model, embeds, mask, turbo_settings, **ref_kw))
    else:
        x0 = torch.randn(len(prompts), grid[0] * grid[1], cfg.in_channels, generator=torch.Generator().manual_seed(seed))
    inputs = _noisy_inputs(x0, sigmas, seed + 2)
    from krea2_train.export.slider_transfer import encode_sliders, slider_effects, slider_reading, summarize

    # a slider's own inputs: Turbo's sample of its target prompt, noised at the same sigmas
    slider_items = encode_sliders(text_encoder, slider) if slider and text_encoder is not None else []
    slider_inputs = [_noisy_inputs(pack_latents(sample_latents(turbo_model, it["target_embeds"], it["target_mask"],
                                                               turbo_settings)), sigmas, seed + 3)
                     for it in slider_items]
    slider_raw = []

    # Turbo at strength 1, then Raw, then Turbo at the fitted strength. Only one 12.9B transformer is ever on the
    # accelerator (two bf16 copies + text encoder + VAE do not fit on a 48 GB card): see _raw_deltas.
    d_turbo_1 = _deltas(turbo_model, lora, [1.0], inputs, embeds, mask, grid, **ref_kw)[1.0]
    held, turbo_model = [turbo_model], None  # _raw_deltas may have to drop Turbo: no other reference here
    pictures = render and vae is not None and text_encoder is not None
    raw_settings = SampleSettings.raw(height=height, width=width, seed=seed)
    negative = text_encoder.encode([""] * len(prompts)) if text_encoder is not None else None
    guidance = raw_settings.guidance if negative is not None else 0.0
    slider_negative = text_encoder.encode([""]) if slider_items else None  # one row: a slider's inputs are batch 1

    def latents_at(model, strength, seeds, alike=True):
        """Latents of `model` with the LoRA at `strength` (None: without it) at each seed, stacked (B, C, h, w);
        Raw with CFG, Turbo without; `alike`: as `sample_seeds`."""
        name = apply_lora(model, lora, strength=strength, adapter_name="krea2_transfer") if strength else None
        try:
            settings = turbo_settings if model is turbo_model else raw_settings
            return sample_seeds(model, embeds, mask, settings, seeds, negative, alike, **ref_kw)
        finally:
            if name:
                model.delete_adapters([name])

    def sample(model, strength):
        """Decoded samples at the report's seed, one per prompt."""
        return to_pil(vae.decode(latents_at(model, strength, [seed])))

    raw_images = []
    # The look fit's samples: other seeds than the pictures that check it, about LOOK_IMAGES images in all. Its noise
    # is one draw per seed for all prompts, as measured: with a seed per image instead, the demo's suggestion moved
    # from 0.74 to 1.29 (8 images are few; BENCHMARKS.md)
    fit_seeds = [seed + 1000 + r for r in range(-(-LOOK_IMAGES // len(prompts)))] if pictures else []
    fit_raw = []

    def sample_fit(model, strength):
        return latents_at(model, strength, fit_seeds, alike=False)

    def measure_raw(model):
        if pictures:
            raw_images.extend(sample(model, 1.0))
            fit_raw.extend([sample_fit(model, None), sample_fit(model, 1.0)])
        # Raw as deployed: under CFG, like the deltas below; Turbo has none
        slider_raw.extend(slider_effects(model, lora, it, inp, grid, negative=slider_negative, guidance=guidance)
                          for it, inp in zip(slider_items, slider_inputs))
        cond = _deltas(model, lora, [1.0], inputs, embeds, mask, grid, **ref_kw)[1.0]
        if guidance <= 0:
            return cond
        uncond = _deltas(model, lora, [1.0], inputs, *negative, grid, **ref_kw)[1.0]
        return [c + guidance * (c - u) for c, u in zip(cond, uncond)]

    turbo_model, d_raw = _raw_deltas(held, raw, turbo_source, not isinstance(turbo, torch.nn.Module), measure_raw,
                                     dtype, device)

    s1 = min(max(_fit(d_turbo_1, d_raw), STRENGTH_RANGE[0]), STRENGTH_RANGE[1])
    d_turbo_s1 = _deltas(turbo_model, lora, [s1], inputs, embeds, mask, grid, **ref_kw)[s1]
    s2 = min(max(s1 * _fit(d_turbo_s1, d_raw), STRENGTH_RANGE[0]), STRENGTH_RANGE[1])
    look = None
    if pictures:  # the suggestion from samples (evaluate/strength.py look_fit); the velocity fit stays reported
        from krea2_train.evaluate.strength import look_fit

        look = look_fit(*fit_raw, lambda st: sample_fit(turbo_model, st), sample_fit(turbo_model, None))
    suggested = look["strength"] if look is not None else s2

    per_sigma = []
    for i, s in enumerate(sigmas):
        r, t = d_raw[i], d_turbo_1[i]
        per_sigma.append({"sigma": float(s), "raw_delta_norm": float(r.norm()), "turbo_delta_norm": float(t.norm()),
                          "ratio": float(t.norm() / r.norm()) if r.norm() > 0 else None, "cosine": _cos(t, r),
                          "cosine_at_suggested": _cos(d_turbo_s1[i], r)})
    raw_total = sum(float(r.norm() ** 2) for r in d_raw) ** 0.5
    turbo_total = sum(float(t.norm() ** 2) for t in d_turbo_1) ** 0.5
    ratio = turbo_total / raw_total if raw_total > 0 else None
    cosine = _cos(torch.cat([t.flatten() for t in d_turbo_1]), torch.cat([r.flatten() for r in d_raw]))
    report = {
        "lora": label,
        "prompts": prompts if text_encoder is not None else f"{len(prompts)} random text embeddings",
        "resolution": [height, width],
        "ratio": ratio,
        "cosine": cosine,
        "suggested_turbo_strength": round(suggested, 3),
        "suggestion_method": "look fit (samples)" if look is not None else "velocity fit",
        "velocity_fit_strength": round(s2, 3),
        "first_fit_strength": round(s1, 3),
        **({"look_fit": look} if look is not None else {}),
        "raw_target": f"guided delta, CFG {guidance:g}" if guidance > 0 else "conditional delta (no text encoder)",
        "per_sigma": per_sigma,
        "reading": _reading(ratio if ratio is not None else 1.0, cosine, s2, look),
    }
    if references:
        report["references"] = {"count": len(references), "method": reference_method, "source": reference_source,
                                "latent_sizes": [list(r.shape[2:]) for r in references]}
    if slider_items:
        section = []
        for it, inp, raw_fx in zip(slider_items, slider_inputs, slider_raw):
            turbo_fx = slider_effects(turbo_model, lora, it, inp, grid, direction=raw_fx["direction"])
            section.append({k: it[k] for k in ("target", "positive", "negative")}
                           | summarize(raw_fx, turbo_fx, it["guidance"]))
        report["slider"] = section
        report["reading"] += "; " + slider_reading(section)
    elif slider:
        report["slider"] = "not measured: the slider's prompts need the text encoder (model.text_encoder)"

    if pictures:
        from krea2_train.evaluate.strength import DEFAULT_SWEEP, style_match
        from krea2_train.evaluate.style import StyleReference

        if isinstance(style_reference, (str, Path)):
            style_reference = StyleReference.from_folder(style_reference)
        strengths = sorted({0.0, 1.0, suggested, *(sweep if sweep is not None else DEFAULT_SWEEP)}) \
            if style_reference is not None else [0.0, 1.0, suggested]
        if slider_items:  # a slider is used both ways: its Turbo pictures at negative strengths too
            from krea2_train.export.slider_transfer import PICTURE_STRENGTHS

            strengths = sorted({*strengths, *PICTURE_STRENGTHS})
        turbo_images = {}
        for st in tqdm(strengths, desc="transfer: Turbo samples", unit="strength", disable=len(strengths) < 4):
            turbo_images[st] = sample(turbo_model, None if st == 0.0 else st)
        if style_reference is not None:
            style = style_match(style_reference, raw_images, turbo_images, suggested)
            if references:  # kept for the record under a name no one reads as a style result
                report["edit_style_distance"] = {"not_a_style_result": EDIT_STYLE_NOTE, **style}
                report["reading"] += "; " + EDIT_STYLE_NOTE
            else:
                report["style"] = style
                report["reading"] += "; " + _style_reading(style)
        columns = [turbo_images[0.0], turbo_images[1.0], turbo_images[suggested], raw_images]
        labels = ["Turbo", "Turbo + LoRA 1.00", f"Turbo + LoRA {suggested:.2f} (suggested)", "Raw + LoRA 1.00 (CFG)"]
        graph_refs = {}
        if references:  # the input first, as previews show it
            if reference_images is None:
                first = references[0].expand(len(prompts), -1, -1, -1) if references[0].shape[0] == 1 else references[0]
                reference_images = to_pil(vae.decode(first.to(device)))
            columns, labels = [list(reference_images), *columns], ["Reference", *labels]
            names = list(reference_names or [f"reference_{k}.png" for k in range(1, len(references) + 1)])
            graph_refs = dict(references=names, reference_method=reference_method)
        grid_png = _grid_png(columns, labels, row_labels=prompts)
        if workflow is not None:  # the ComfyUI graph for the suggested column: {lora_name, trigger_words, models}
            from krea2_train.lora.workflow import embed_png_chunks, workflow_png_chunks

            grid_png = embed_png_chunks(grid_png, workflow_png_chunks(
                strength=round(suggested, 2), prompt=prompts[0], width=width, height=height, seed=seed, **workflow,
                **graph_refs))
        write_bytes_atomic(out_dir / "transfer_grid.png", grid_png)
        report["grid"] = "transfer_grid.png"
        if slider_items:
            from krea2_train.export.slider_transfer import PICTURE_STRENGTHS

            write_bytes_atomic(out_dir / "slider_grid.png", _grid_png(
                [turbo_images[st] for st in PICTURE_STRENGTHS], [f"Turbo + slider {st:+g}" for st in PICTURE_STRENGTHS],
                row_labels=prompts))
            report["slider_grid"] = "slider_grid.png"
        buf = io.BytesIO()
        turbo_images[suggested][0].save(buf, format="PNG")
        report["_preview_png"] = buf.getvalue()
    write_json_atomic(out_dir / "transfer_report.json", {k: v for k, v in report.items() if not k.startswith("_")})
    return report


def _free_accelerator() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _raw_deltas(held: list, raw, turbo_source, owned: bool, measure, dtype, device):
    """`measure` (model -> deltas) on Raw while Turbo is loaded; returns (Turbo model, Raw's deltas).

    `held`: a one-element list holding the Turbo model, so that it can be dropped here (the caller keeps no other
    reference); `owned`: Turbo was loaded by the report (nobody else holds it); `turbo_source`: its checkpoint, or None.
    Only one transformer is on the accelerator at any time. In order of preference:
      * Raw is a loaded model: the caller already holds both; measured as given.
      * Turbo's checkpoint is known: Turbo's frozen base weights are overwritten with Raw's in place, measured, and
        read back from Turbo's checkpoint (bit for bit: same file, same dtype); one copy ever, two extra reads.
      * Otherwise (quantised bases cannot be swapped; or no checkpoint to read Turbo back from): a Turbo loaded here
        is dropped, Raw loaded, measured, dropped and Turbo reloaded; a Turbo passed in waits on the CPU meanwhile.
    """
    from krea2_train.runtime.swap import copy_base_weights

    turbo_model = held.pop()
    if isinstance(raw, torch.nn.Module):
        return turbo_model, measure(raw)
    if turbo_source is not None:
        try:
            copy_base_weights(turbo_model, raw)  # raises TypeError before touching anything if quantised
        except TypeError:
            log.info("transfer report: quantised base weights cannot be swapped in place; loading Raw separately")
        except BaseException:
            copy_base_weights(turbo_model, turbo_source)  # a partial copy: put Turbo back before failing
            raise
        else:
            try:
                return turbo_model, measure(turbo_model)
            finally:
                copy_base_weights(turbo_model, turbo_source)
    if owned and turbo_source is not None:
        turbo_model = None
        _free_accelerator()
        raw_model = _transformer(raw, dtype, device)
        d_raw = measure(raw_model)
        raw_model = None
        _free_accelerator()
        return _transformer(turbo_source, dtype, device), d_raw
    home = next(turbo_model.parameters()).device
    offload = home.type != "cpu"
    if offload:
        turbo_model.to("cpu")
        _free_accelerator()
    try:
        raw_model = _transformer(raw, dtype, device)
        d_raw = measure(raw_model)
        raw_model = None
        _free_accelerator()
    finally:
        if offload:
            turbo_model.to(home)
    return turbo_model, d_raw


def _reading(ratio: float, cosine: float, velocity_strength: float, look: dict | None = None) -> str:
    parts = []
    if ratio < 0.8:
        parts.append(f"the LoRA acts weaker on Turbo ({ratio:.2f}x of its Raw effect)")
    elif ratio > 1.25:
        parts.append(f"the LoRA acts stronger on Turbo ({ratio:.2f}x of its Raw effect)")
    else:
        parts.append(f"the LoRA acts with similar strength on Turbo ({ratio:.2f}x)")
    if cosine < 0.5:
        parts.append(f"its direction differs on Turbo (cosine {cosine:.2f}): expect artefacts, compare the grid")
    elif cosine < 0.8 and look is None:  # the fit scales only the part along Raw's effect: s ~ cosine / ratio
        parts.append(f"only partly along its Raw direction (cosine {cosine:.2f}), so the best-fitting strength is "
                     "about cosine / ratio")
    if look is None:
        parts.append(f"suggested Turbo strength {velocity_strength:.2f}")
        return "; ".join(parts)
    parts.append(f"suggested Turbo strength {look['strength']:.2f}: where the LoRA changes Turbo's samples most "
                 f"like Raw's (the velocity fit alone says {velocity_strength:.2f})")
    left = look.get("left_at_strength")
    if left is not None and left > 0.5:
        parts.append(f"even there {100 * left:.0f}% of Raw's effect is not reproduced on Turbo: compare the grid")
    return "; ".join(parts)


# An edit LoRA's targets are its inputs, edited: Turbo alone already sits about as far from them as Raw + LoRA (the
# edit demo: "matches Raw at 0.00, closes -6%"), so the style distance cannot tell whether the edit transfers.
EDIT_STYLE_NOTE = ("the style check does not apply to an edit LoRA (its targets are the inputs, edited, so Turbo "
                   "alone is already about as far from them as Raw + LoRA); judge the edit in the grid's Reference "
                   "and Turbo + LoRA columns, or by an edit rate (scripts/measure_edit.py: evaluate/edit.py on the "
                   "micro demo's edit)")


def _style_reading(style: dict) -> str:
    closed = style["turbo_closure_at_suggested"]
    text = (f"on pictures, Turbo matches Raw + LoRA's style at strength {style['matched_strength']:.2f}"
            + ("" if style["matched_reached"] else " (closest swept; not reached)"))
    if closed is not None:
        text += f"; at the suggested strength the LoRA closes {100 * closed:.0f}% of Turbo's gap to the training images"
    return text


def _grid_png(columns: list[list], labels: list[str], row_labels: list[str] | None = None) -> bytes:
    """Columns of PIL images (one column per setting, one row per prompt), the setting above each column and the
    prompt above each row (lora/writers' and previews' grids read the same)."""
    from krea2_train.utils.grid import image_grid

    return image_grid(columns, labels, row_labels)
