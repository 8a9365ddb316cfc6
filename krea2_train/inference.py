"""The shared inference core: one sampler for `krea2-train sample`, training previews and export verification.

Matches diffusers' `Krea2Pipeline` (tests compare latents on the tiny models):
    * Euler flow matching with diffusers' `FlowMatchEulerDiscreteScheduler`
    * Raw: resolution-aware shift mu (0.5 @ 256 tokens .. 1.15 @ 6400), guidance on when g > 0
    * Turbo: fixed mu = 1.15, 8 steps, no guidance
    * guidance convention v = cond + g * (cond - uncond) (standard CFG scale 1 + g), negative prompt "" by default
Differences on purpose: text is not padded to 512 tokens (padded tokens are masked keys, so image tokens see the same
thing) and noise is drawn on the CPU from the seed, so a seed gives the same image on any device.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from krea2_train import facts
from krea2_train.schedule import SCHEDULERS, beta_sigmas, make_scheduler, mu_for, pack_latents, position_ids, unpack_latents

log = logging.getLogger(__name__)


def predict_velocity(transformer, packed, sigma, embeds, mask, grid: tuple[int, int], references=None,
                     reference_method: str = "index"):
    """One transformer call: packed latents (B, N, 64) on a (rows, cols) token grid, sigma (B,) in [0, 1] ->
    velocity (B, N, 64). `references`: clean reference latents [(B or 1, 16, h, w), ...] for an edit LoRA, in
    context as ComfyUI's ReferenceLatent gives them (models/reference.py); None: text-to-image."""
    b, n, _ = packed.shape
    gh, gw = grid
    if gh * gw != n:
        raise ValueError(f"token grid {gh}x{gw} does not match {n} packed latent tokens")
    pos = position_ids(embeds.shape[1], gh, gw, device=packed.device)
    if mask is not None and bool(mask.all()):
        mask = None  # nothing padded: skip the mask so the fastest attention kernel can run
    dtype = transformer.img_in.weight.dtype  # the compute dtype (norms and tables stay float32)
    sigma = sigma.expand(b) if sigma.ndim == 1 and sigma.shape[0] == 1 else sigma
    if references:
        from krea2_train.models.reference import reference_forward

        return reference_forward(transformer, packed.to(dtype), embeds.to(dtype), sigma.to(dtype), pos,
                                 [r.to(packed.device, dtype) for r in references], reference_method,
                                 encoder_attention_mask=mask)
    return transformer(
        hidden_states=packed.to(dtype), encoder_hidden_states=embeds.to(dtype), timestep=sigma.to(dtype),
        position_ids=pos, encoder_attention_mask=mask, return_dict=False,
    )[0]


@dataclass
class SampleSettings:
    height: int = 256
    width: int = 256
    steps: int = facts.RAW_STEPS
    guidance: float = facts.RAW_GUIDANCE
    variant: str = "raw"  # "raw": resolution-aware shift; "turbo": mu 1.15
    seed: int = 0
    mu: float | None = None  # override the variant's shift
    # simple: diffusers' Krea 2 schedule (= ComfyUI's `simple`); beta: ComfyUI's `beta` scheduler (schedule.py)
    scheduler: str = "simple"

    @classmethod
    def turbo(cls, **kw):
        return cls(**{"steps": facts.TURBO_STEPS, "guidance": 0.0, "variant": "turbo", **kw})

    @classmethod
    def raw(cls, **kw):
        return cls(**{"steps": facts.RAW_STEPS, "guidance": facts.RAW_GUIDANCE, "variant": "raw", **kw})


def initial_noise(batch: int, height: int, width: int, seed: int, channels: int = 16) -> torch.Tensor:
    """Packed starting noise, drawn like the pipeline's `randn_tensor` on a CPU generator."""
    if height % facts.PIXEL_MULTIPLE or width % facts.PIXEL_MULTIPLE:
        from krea2_train.errors import UserError

        raise UserError(f"height and width must be multiples of {facts.PIXEL_MULTIPLE}, got {height}x{width} "
                        f"(try {round(height / 16) * 16}x{round(width / 16) * 16})")
    gen = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn((batch, channels, height // facts.VAE_SCALE, width // facts.VAE_SCALE), generator=gen)
    return pack_latents(noise)


def prompt_noise(seeds, height: int, width: int) -> torch.Tensor:
    """Starting noise for a batch, image i with the noise it gets sampled alone at seeds[i] (initial_noise(1, ...)),
    so its picture does not depend on the batch: previews sample prompt by prompt, the transfer grid all at once,
    and the same prompt and seed give the same picture in both."""
    return torch.cat([initial_noise(1, height, width, s) for s in seeds])


@torch.no_grad()
def sample_latents(transformer, embeds, mask, settings: SampleSettings, negative_embeds=None, negative_mask=None,
                   noise: torch.Tensor | None = None, progress: bool = False, references=None,
                   reference_method: str = "index") -> torch.Tensor:
    """Run the Euler sampler; returns normalised latents (B, 16, H/8, W/8) in float32. `references` (edit LoRAs):
    clean reference latents [(B or 1, 16, h, w), ...], given to the conditional and the unconditional pass alike (as
    ComfyUI's ConditioningZeroOut keeps the positive's reference latents)."""
    device = next(transformer.parameters()).device
    b = embeds.shape[0]
    s = settings
    latents = (noise if noise is not None else initial_noise(b, s.height, s.width, s.seed)).to(device, torch.float32)
    grid = (s.height // facts.PIXEL_MULTIPLE, s.width // facts.PIXEL_MULTIPLE)
    mu = s.mu if s.mu is not None else mu_for(s.variant, s.height, s.width)
    if s.scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {s.scheduler!r}; one of {', '.join(SCHEDULERS)}")
    embeds, mask = embeds.to(device), (mask.to(device) if mask is not None else None)
    guided = s.guidance > 0
    if guided and negative_embeds is None:
        raise ValueError("guidance > 0 needs negative embeddings (encode the negative prompt, '' by default)")
    if s.scheduler == "beta":
        # ComfyUI's Euler over its beta sigmas: x += (sigma_next - sigma) * v (flow velocity = its `d`)
        sigmas = beta_sigmas(s.steps, mu).to(device)  # float32, as ComfyUI's sigmas and its dt
        steps = list(zip(sigmas[:-1], sigmas[1:]))
    else:
        scheduler = make_scheduler()
        scheduler.set_timesteps(sigmas=torch.linspace(1.0, 1.0 / s.steps, s.steps).tolist(), mu=mu, device=device)
        scheduler.set_begin_index(0)
        steps = scheduler.timesteps
    iterator = steps
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(steps, desc="sampling", unit="step")
    for step in iterator:
        if s.scheduler == "beta":
            sigma_now, sigma_next = step
            sigma = sigma_now.expand(b)
        else:
            sigma = (step / 1000.0).expand(b)
        v = predict_velocity(transformer, latents, sigma, embeds, mask, grid, references, reference_method).float()
        if guided:
            v_neg = predict_velocity(transformer, latents, sigma, negative_embeds.to(device),
                                     negative_mask.to(device) if negative_mask is not None else None, grid,
                                     references, reference_method).float()
            v = v + s.guidance * (v - v_neg)
        if s.scheduler == "beta":
            latents = latents + (sigma_next - sigma_now) * v
        else:
            latents = scheduler.step(v, step, latents, return_dict=False)[0]
    return unpack_latents(latents, s.height // facts.VAE_SCALE, s.width // facts.VAE_SCALE)


# ----------------------------------------------------------------------------------------------------------- LoRA
def apply_lora(transformer, path_or_state, strength: float = 1.0, adapter_name: str | None = None) -> str:
    """Load one LoRA (any layout we read: diffusers, ComfyUI, musubi, ai-toolkit, ours) onto `transformer` through
    diffusers/PEFT and make it the only active adapter, at `strength`; returns the adapter name."""
    return apply_loras(transformer, [(path_or_state, strength)], [adapter_name] if adapter_name else None)[0]


def apply_loras(transformer, loras, names: list[str] | None = None) -> list[str]:
    """Load several (LoRA, strength) pairs and activate them together; returns their adapter names."""
    from krea2_train.lora.writers import read_lora_for_diffusers  # knows every peer layout, not only diffusers' own

    taken = set(getattr(transformer, "peft_config", {}) or {})
    chosen = []
    for i, (source, _) in enumerate(loras):
        name = names[i] if names else (Path(source).stem if isinstance(source, (str, Path)) else "lora")
        name = base = name.replace(".", "_")
        n = 1
        while name in taken:  # two files may share a stem (pytorch_lora_weights): keep both
            n += 1
            name = f"{base}_{n}"
        state, metadata = read_lora_for_diffusers(source)
        transformer.load_lora_adapter(state, prefix="transformer", adapter_name=name, metadata=metadata)
        taken.add(name)
        chosen.append(name)
    transformer.set_adapters(chosen, weights=[float(s) for _, s in loras])
    return chosen


def _tuner_layers(transformer):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def stacked_lora(transformer, source, strength: float, name: str = "stacked", device=None):
    """A fixed LoRA (e.g. the Turbo LoRA) added under whatever adapters are active, at `strength`, and removed
    after; yields the adapter name. The active adapters keep their own scales and trainability (nothing of theirs is
    re-set: under FSDP a toggled requires_grad would stick to the gathered LoRA), so training resumes unchanged.

    `source`: a LoRA file, a `TrainedAdapter`, or a `lora.turbo.TurboLora` (a file read with `read_turbo_lora`: a
    LoRA plus ComfyUI's `.diff` / `.diff_b` full deltas). The low-rank part is injected with PEFT straight from the
    factors (no state-dict load, which FSDP's sharded state would meet), on the compute `device` (block offload keeps
    the base weights on the CPU); each module's scale is checked to be `strength` x the file's own scale, so the LoRA
    never acts at another strength than asked. The deltas are added to the base parameters as ComfyUI does
    (`param += strength * delta`, in float32, then rounded to the parameter's dtype; ComfyUI rounds bf16
    stochastically), and the original tensors are put back on exit, bit for bit."""
    from peft import LoraConfig, inject_adapter_in_model

    from krea2_train.lora.formats import TrainedAdapter
    from krea2_train.lora.turbo import TurboLora, read_turbo_lora

    turbo = source if isinstance(source, TurboLora) else (
        TurboLora(source, {}, "<adapter>") if isinstance(source, TrainedAdapter) else read_turbo_lora(source))
    adapter = turbo.adapter
    if name in (getattr(transformer, "peft_config", None) or {}):
        raise ValueError(f"adapter {name!r} is already loaded")
    if adapter is not None and any(type(m).__module__.startswith("peft.tuners.lokr")
                                   for m in _tuner_layers(transformer)):
        from krea2_train.errors import UserError

        raise UserError("a LoRA cannot be stacked on a LoKr adapter (PEFT mixes them only in a PeftMixedModel); "
                        "train with lora.type: lora or dora, or set preview.turbo to the Turbo checkpoint")
    targets = _delta_targets(transformer, turbo)  # checked before anything is changed
    layers = _tuner_layers(transformer)
    active = list(layers[0].active_adapters) if layers else []
    grads = {p: p.requires_grad for p in transformer.parameters()}
    device = torch.device(device) if device is not None else next(transformer.parameters()).device
    saved = {}
    injected = False
    try:
        if adapter is not None:
            with warnings.catch_warnings():  # "Already found a `peft_config`": several adapters is the point here
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                inject_adapter_in_model(LoraConfig(**adapter.lora_config_dict()), transformer, adapter_name=name)
            injected = True
            with torch.no_grad():
                for m in adapter.modules:
                    layer = transformer.get_submodule(m)
                    for factors, value in ((layer.lora_A, adapter.down[m]), (layer.lora_B, adapter.up[m])):
                        w = factors[name].weight
                        if tuple(w.shape) != tuple(value.shape):
                            raise ValueError(f"LoRA module {m}: factor {tuple(value.shape)} vs layer {tuple(w.shape)}")
                        w.data = value.to(device, w.dtype if w.dtype.is_floating_point else torch.float32).clone()
                    layer.set_scale(name, float(strength))
                    want = float(strength) * adapter.scale(m)
                    if abs(layer.scaling[name] - want) > 1e-9 * max(1.0, abs(want)):
                        raise RuntimeError(f"LoRA module {m} would act at scale {layer.scaling[name]}, not {want}")
            for layer in _tuner_layers(transformer):
                layer.set_adapter(active + [name])
        homes = _offloaded_homes(transformer)
        with torch.no_grad():
            for pname, (param, delta) in targets.items():
                saved[pname] = _set_param(param, lambda home: (home.float() + float(strength) * delta.to(
                    home.device, torch.float32)).to(home.dtype), homes)
        for p, flag in grads.items():
            p.requires_grad_(flag)
        yield name
    finally:
        for pname, original in saved.items():
            _set_param(targets[pname][0], lambda home, original=original: original, homes)
        if injected:
            for layer in _tuner_layers(transformer):
                layer.delete_adapter(name)
                layer.set_adapter(active)
            transformer.peft_config.pop(name, None)
        for p, flag in grads.items():
            p.requires_grad_(flag)


def _offloaded_homes(transformer) -> dict:
    """{id(param): (offloader, block, entry)} for the frozen block weights a BlockOffloader (runtime/memory.py)
    keeps in CPU memory and copies in on every block call: a patch must go to that home copy, or the next onload
    brings the unpatched weight back."""
    try:
        from krea2_train.runtime.speed import unwrap_transformer

        model = unwrap_transformer(transformer)
    except TypeError:
        model = transformer
    off = getattr(model, "_krea2_offloader", None)
    if off is None:
        return {}
    return {id(p): (off, i, j) for i, entries in enumerate(off.tensors) for j, (p, _) in enumerate(entries)}


def _set_param(param, make, homes: dict) -> torch.Tensor:
    """Replace `param`'s value by make(its current home tensor); returns that home tensor (to put back with
    make=lambda _: it). For an offloaded weight the home is the offloader's CPU copy, and the device copy (if the
    block is on the device now) follows."""
    if id(param) not in homes:
        old = param.data
        param.data = make(old)
        return old
    off, i, j = homes[id(param)]
    p, old = off.tensors[i][j]
    new = make(old)
    if off.device.type == "cuda" and not new.is_pinned():
        new = new.pin_memory()
    off.tensors[i][j] = (p, new)
    if i in off.on_device:
        p.data = new.to(off.device)
        off.onloaded[i][j] = p.data.data_ptr()  # ours, not a library's replacement (BlockOffloader._offload)
    elif not off.poison:
        p.data = new
    return old


def _delta_targets(transformer, turbo) -> dict:
    """{diffusers parameter name: (the Parameter to patch, delta)} for a TurboLora's full deltas, each resolved
    under PEFT wrapping (`base_layer`) and checked: a missing parameter, another shape, a sharded (FSDP) or 1-byte
    (quantised) parameter is refused naming the file and the key."""
    from krea2_train.errors import UserError
    from krea2_train.runtime.sharding import is_sharded

    out = {}
    for pname, delta in turbo.diffs.items():
        key = turbo.diff_keys.get(pname, pname)
        module_name, _, leaf = pname.rpartition(".")
        try:
            module = transformer.get_submodule(module_name) if module_name else transformer
        except AttributeError:
            module = None
        if module is not None and hasattr(module, "get_base_layer"):
            module = module.get_base_layer()
        param = getattr(module, leaf, None) if module is not None else None
        if not isinstance(param, torch.nn.Parameter):
            raise UserError(f"{turbo.source}: {key} patches {pname}, which this transformer does not have as a "
                            "plain parameter (another model size, fused q/k/v projections, or a quantised layer "
                            "that keeps no float weight). Use the Turbo checkpoint for previews instead, or a Turbo "
                            "LoRA without `.diff` tensors.")
        if is_sharded(param):
            raise UserError(f"{turbo.source}: its full-weight deltas (e.g. {key}) cannot be added to an FSDP-sharded "
                            "transformer; set preview.turbo to the Turbo checkpoint, or use a Turbo LoRA without "
                            "`.diff` tensors.")
        if tuple(param.shape) != tuple(delta.shape):
            raise UserError(f"{turbo.source}: {key} has shape {tuple(delta.shape)} but {pname} is "
                            f"{tuple(param.shape)}; the LoRA is for another model size.")
        if param.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise UserError(f"{turbo.source}: {key} patches {pname}, which this transformer keeps as {param.dtype} "
                            "(a 1-byte quantised base layer): a delta cannot be added to it exactly. Train on a "
                            "bf16 Raw (memory.quantize off), or use a Turbo LoRA without `.diff` on Linear weights.")
        out[pname] = (param, delta)
    return out


# ----------------------------------------------------------------------------------------------------- images
class Generator:
    """Prompts -> images with a transformer, a text encoder and a VAE (the `sample` command and previews)."""

    def __init__(self, transformer, text_encoder, vae):
        self.transformer, self.text_encoder, self.vae = transformer, text_encoder, vae

    def encode(self, prompts: list[str]):
        return self.text_encoder.encode(prompts)

    def encode_references(self, images, settings: SampleSettings) -> list[torch.Tensor]:
        """Reference images (PIL) -> clean latents [(1, 16, H/8, W/8), ...]: each resized and centre-cropped to the
        output size, as training puts a reference into its target's bucket (data/checks.py)."""
        import numpy as np

        from krea2_train.data.buckets import apply, place

        out = []
        for img in images:
            img = apply(img.convert("RGB"), place(img.width, img.height, (settings.width, settings.height)))
            px = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1.0
            out.append(self.vae.encode(px[None]))
        return out

    def __call__(self, prompts: list[str], settings: SampleSettings, negative_prompt: str = "", progress=False,
                 references=None, reference_method: str = "index"):
        """`references`: PIL reference images (edit LoRAs), shared by every prompt."""
        from krea2_train.models.vae import to_pil

        embeds, mask = self.encode(prompts)
        neg = neg_mask = None
        if settings.guidance > 0:
            neg, neg_mask = self.encode([negative_prompt] * len(prompts))
        refs = self.encode_references(references, settings) if references else None
        # each prompt from the noise it has alone at settings.seed, as previews and the transfer grid draw it, so a
        # file named by prompt and seed is the same picture however many prompts shared the call
        noise = prompt_noise([settings.seed] * len(prompts), settings.height, settings.width)
        latents = sample_latents(self.transformer, embeds, mask, settings, neg, neg_mask, noise=noise,
                                 progress=progress, references=refs, reference_method=reference_method)
        return to_pil(self.vae.decode(latents))
