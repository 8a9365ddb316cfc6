"""Pretraining the micro Krea 2 on the procedural world, in resumable stages (scripts/pretrain_micro.py drives it).

    1. text encoder  micro Qwen3-VL trained briefly as a language model on the grammar (`train_text_encoder`),
                     rounded to bf16 as shipped; every grammar caption encoded once
    2. vae           Qwen-Image VAE trained for reconstruction on 64 px crops of world images and of the broader
                     `world.broad_image` graphics (fully convolutional, so it serves at 64 .. 256 px); latent
                     statistics measured and written into its config (latents_mean/std); in two phases, the
                     second mixing in `world.graphic_image` designs (pale grounds, dark outlines)
    3. latents       world images encoded once through the shipped (bf16-rounded) VAE
    4. raw           the Raw transformer with the project's own flow-matching loss and sigma sampling
                     (`train.timesteps.sample_sigmas`, Raw's resolution-aware shift), caption dropout for CFG, EMA
    5. turbo         trajectory distillation: from Raw's CFG trajectories on Turbo's 8-step grid (mu 1.15, each
                     interval integrated in several Euler sub-steps), the student's single Euler step from sigma_i
                     must land where the guided teacher lands at sigma_{i+1}; no guidance at sampling, same
                     architecture, initialised from Raw

Each stage writes its result under the work folder and is skipped when that result exists; the long stages also
save a checkpoint every few hundred steps. Every random draw comes from a generator seeded by (seed, stage, step),
so a resumed run gives the same numbers as an uninterrupted one. No pickle anywhere: safetensors and JSON.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from krea2_train import facts
from krea2_train.config import TimestepSection
from krea2_train.data import world
from krea2_train.models import micro
from krea2_train.models.fast_vae import single_frame_convs
from krea2_train.models.tiny import original_file_state
from krea2_train.schedule import pack_latents, position_ids, sampling_sigmas
from krea2_train.train.batches import pad_text
from krea2_train.train.timesteps import sample_sigmas
from krea2_train.utils.io import atomic_dir, save_safetensors_atomic, write_json_atomic

log = logging.getLogger(__name__)


@dataclass
class PretrainSettings:
    seed: int = micro.SEED
    # text encoder: language-model steps of `text_batch` grammar captions
    text_steps: int = 150
    text_batch: int = 32
    text_lr: float = 1e-3
    # VAE: steps of `vae_batch` random 64 px crops of world images plus `vae_broad_batch` of broad graphics
    vae_steps: int = 2000
    vae_batch: int = 4
    vae_broad_batch: int = 8
    vae_crop: int = 64
    vae_lr: float = 2e-3
    kl_weight: float = 1e-6
    # VAE phase 2: from phase 1's weights, crops of world / broad / graphic-design images (world.graphic_image)
    vae2_steps: int = 800
    vae2_batch: list = field(default_factory=lambda: [2, 2, 8])
    vae2_lr: float = 1e-3
    # latent dataset
    images: int = 4000
    # Raw
    raw_steps: int = 1800
    raw_batch: int = 32
    raw_lr: float = 8e-4
    raw_warmup: int = 100
    caption_dropout: float = 0.1
    ema_decay: float = 0.998
    # Turbo
    trajectories: int = 256
    trajectory_batch: int = 32
    substeps: int = 3
    guidance: float = facts.RAW_GUIDANCE
    turbo_steps: int = 200
    turbo_batch: int = 32
    turbo_lr: float = 1e-4
    checkpoint_every: int = 200
    timesteps: dict = field(default_factory=lambda: asdict(TimestepSection()))

    @classmethod
    def smoke(cls, **kw):
        """A few steps of every stage: checks the pipeline end to end in a couple of minutes."""
        return cls(**{"text_steps": 2, "vae_steps": 3, "vae2_steps": 2, "images": 64, "raw_steps": 3,
                      "trajectories": 8, "trajectory_batch": 4,
                      "turbo_steps": 3, "checkpoint_every": 2, **kw})


def _gen(seed: int, stage: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + stage * 7_919_009 + step * 104_729) % (2**63))


def _progress(total: int, desc: str, initial: int = 0):
    from tqdm.auto import tqdm

    # mininterval: the log is a file; one line every few seconds keeps rate and ETA visible without flooding it
    return tqdm(total=total, initial=initial, desc=desc, unit="step", mininterval=5.0, dynamic_ncols=False)


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine down to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


# ------------------------------------------------------------------------------------------ resumable checkpoints
def _save_ckpt(path: Path, step: int, model, optimizer, ema=None) -> None:
    """Model, EMA and AdamW moments as safetensors (named by parameter), the step in the header."""
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    tensors[f"opt.{key}.{names[id(p)]}"] = state[key]
    opt_step = next((float(s["step"]) for s in optimizer.state.values() if "step" in s), 0.0)
    save_safetensors_atomic(tensors, path, metadata={"step": str(step), "opt_step": str(opt_step)})


def _load_ckpt(path: Path, model, optimizer, ema=None) -> int:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as h:
        meta = h.metadata()
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if ema is not None:
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    for n, p in model.named_parameters():
        if f"opt.exp_avg.{n}" in tensors:
            optimizer.state[p] = {"step": torch.tensor(float(meta["opt_step"])),
                                  "exp_avg": tensors[f"opt.exp_avg.{n}"], "exp_avg_sq": tensors[f"opt.exp_avg_sq.{n}"]}
    return int(meta["step"])


# --------------------------------------------------------------------------------------------------- stage 1: text
def stage_text(work: Path, s: PretrainSettings) -> Path:
    """The random micro Qwen3-VL as shipped (bf16), and every caption's hidden states through it (float32)."""
    from krea2_train.models.text_encoder import TextEncoder

    out = work / "text_embeds.safetensors"
    if not (work / "text_encoder" / "config.json").exists():
        model, tokenizer = micro.build_text_encoder(world.WORDS, s.seed)
        micro.check_tokenizer(tokenizer, world.WORDS)
        train_text_encoder(model, tokenizer, s)
        with atomic_dir(work / "text_encoder") as tmp:
            model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    if out.exists():
        return out
    encoder = TextEncoder.from_path(work / "text_encoder", dtype="float32")
    captions = ["", *world.all_captions()]
    tensors = {}
    for i in range(0, len(captions), 64):
        chunk = captions[i:i + 64]
        hidden, mask = encoder.encode(chunk)
        for j in range(len(chunk)):
            tensors[str(i + j)] = hidden[j, mask[j]].float()
    save_safetensors_atomic(tensors, out, metadata={"captions": captions})
    return out


def train_text_encoder(model, tokenizer, s: PretrainSettings) -> None:
    """A few hundred language-model steps on the grammar's captions (in the Krea 2 prompt template), so each word's
    hidden state says what role it plays.

    Krea 2's transformer puts every text token at RoPE position (0, 0, 0), so word order reaches it only through
    the text encoder, as it does from the real Qwen3-VL. A random encoder does not carry it: the hidden states of
    "red" in "a red circle on a blue background" and in "a blue circle on a red background" had cosine 0.986 (the
    tapped layer 35), and the Raw transformer could not tell foreground from background colour. Next-token
    prediction needs the role (a shape follows the first colour, "background" the second); a training-only linear
    head that must read the current token back from layers 18, 27 and 36 keeps each word's identity from washing
    out. Measured after 150 steps (tap 35): same word, other role 0.51; different colours, same role 0.74."""
    g = torch.Generator().manual_seed(s.seed + 11)
    captions = world.all_captions()
    head = torch.nn.Linear(model.config.text_config.hidden_size, len(tokenizer))
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=s.text_lr, weight_decay=0.0)
    model.train()
    bar = _progress(s.text_steps, "text encoder")
    for step in range(s.text_steps):
        pick = torch.randint(0, len(captions), (s.text_batch,), generator=g).tolist()
        batch = tokenizer([facts.PROMPT_PREFIX + captions[i] + facts.PROMPT_SUFFIX for i in pick],
                          padding="longest", padding_side="right", return_tensors="pt")
        labels = batch.input_ids.masked_fill(~batch.attention_mask.bool(), -100)
        labels[:, :facts.PREFIX_TOKENS] = -100  # the fixed system prompt is not the grammar
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels,
                    output_hidden_states=True)
        identity = sum(F.cross_entropy(head(out.hidden_states[k]).flatten(0, 1), labels.flatten(), ignore_index=-100)
                       for k in (18, 27, 36)) / 3
        loss = out.loss + identity
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    model.eval()


def load_text_embeds(path: Path) -> dict[str, torch.Tensor]:
    """{caption: (L, 12, D) valid-token hidden states}."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as h:
        captions = json.loads(h.metadata()["captions"])
        return {c: h.get_tensor(str(i)) for i, c in enumerate(captions)}


# ---------------------------------------------------------------------------------------------------- stage 2: VAE
def stage_vae(work: Path, s: PretrainSettings) -> Path:
    """Phase 1: the VAE from scratch on world and broad crops (saved bf16, as phase 2 starts from what is shipped)."""
    out = work / "vae_phase1"
    if (out / "config.json").exists():
        return out
    vae = zero_init_residuals(micro.build_vae(s.seed)).train()

    def batch(step):
        pixels, _, _ = world.world_batch(s.seed + 1, step * s.vae_batch, s.vae_batch)
        if not s.vae_broad_batch:
            return pixels
        return torch.cat([pixels, world.broad_batch(s.seed + 1, step * s.vae_broad_batch, s.vae_broad_batch)])

    _train_vae(vae, work / "ckpt_vae.safetensors", s.vae_steps, s.vae_lr, batch, s, stage=2, desc="vae")
    with atomic_dir(out) as tmp:
        vae.eval().to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
    (work / "ckpt_vae.safetensors").unlink(missing_ok=True)
    return out


def stage_vae_graphics(work: Path, s: PretrainSettings) -> Path:
    """Phase 2: phase 1's VAE fine-tuned with graphic designs mixed in (world.graphic_image: pale grounds, dark
    outlines); then the latent statistics of the shipped bf16 weights go into its config."""
    from diffusers import AutoencoderKLQwenImage

    out = work / "vae"
    if (out / "config.json").exists():
        return out
    vae = AutoencoderKLQwenImage.from_pretrained(work / "vae_phase1", torch_dtype=torch.float32).train()
    n_world, n_broad, n_graphic = s.vae2_batch

    def batch(step):
        pixels, _, _ = world.world_batch(s.seed + 4, step * n_world, n_world)
        return torch.cat([pixels, world.broad_batch(s.seed + 4, step * n_broad, n_broad),
                          world.graphic_batch(s.seed + 4, step * n_graphic, n_graphic)])

    _train_vae(vae, work / "ckpt_vae2.safetensors", s.vae2_steps, s.vae2_lr, batch, s, stage=7, desc="vae phase 2")
    vae = vae.eval().to(torch.bfloat16).float()  # the statistics below are those of the shipped bf16 weights
    mean, std = latent_stats(vae, s)
    vae.register_to_config(latents_mean=mean, latents_std=std)
    with atomic_dir(out) as tmp:
        vae.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
    (work / "ckpt_vae2.safetensors").unlink(missing_ok=True)
    return out


def _train_vae(vae, ckpt: Path, steps: int, peak_lr: float, batch, s: PretrainSettings, stage: int, desc: str):
    """Reconstruction training on random `s.vae_crop` px crops of `batch(step)` (B, 3, H, W), resumable."""
    opt = torch.optim.AdamW(vae.parameters(), lr=peak_lr, betas=(0.9, 0.99), weight_decay=0.0)
    start = _load_ckpt(ckpt, vae, opt) if ckpt.exists() else 0
    bar = _progress(steps, desc, start)
    with single_frame_convs():
        for step in range(start, steps):
            g = _gen(s.seed, stage, step)
            pixels = batch(step)
            y, x = (int(v) for v in torch.randint(0, world.SIZE - s.vae_crop + 1, (2,), generator=g))
            crop = pixels[:, :, y:y + s.vae_crop, x:x + s.vae_crop].unsqueeze(2)
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, steps, peak_lr, 50)
            posterior = vae.encode(crop).latent_dist
            # the posterior mode: sampling with the initial unit variance drowns the signal for hundreds of steps
            rec = vae.decode(posterior.mode()).sample
            # MSE only: with an added L1 term this VAE did not start learning within 300 steps (measured)
            loss = F.mse_loss(rec, crop) + s.kl_weight * posterior.kl().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            if (step + 1) % s.checkpoint_every == 0:
                _save_ckpt(ckpt, step + 1, vae, opt)
    bar.close()


@torch.no_grad()
def zero_init_residuals(vae):
    """Zero the last conv of every residual block and the attention output projection, so each block starts as the
    identity: the Qwen-Image VAE from diffusers' default init barely learns in the few thousand steps we can
    afford (measured: MSE stuck near the data variance), with this it learns within a few hundred."""
    for name, module in vae.named_modules():
        if name.endswith(("conv2", "proj")) and getattr(module, "weight", None) is not None:
            module.weight.zero_()
            if module.bias is not None:
                module.bias.zero_()
    return vae


@torch.no_grad()
def latent_stats(vae, s: PretrainSettings, count: int = 256) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of posterior-mode latents over held-out world images (FACTS: z = (z - mean) / std)."""
    zs = []
    with single_frame_convs():
        for i in range(0, count, 32):
            pixels, _, _ = world.world_batch(s.seed + 2, i, 32)
            zs.append(vae.encode(pixels.unsqueeze(2)).latent_dist.mode()[:, :, 0])
    z = torch.cat(zs)
    return z.mean(dim=(0, 2, 3)).tolist(), z.std(dim=(0, 2, 3)).tolist()


# ------------------------------------------------------------------------------------------------ stage 3: latents
def stage_latents(work: Path, s: PretrainSettings) -> Path:
    from krea2_train.models.vae import VAE

    out = work / "latents.safetensors"
    if out.exists():
        return out
    vae = VAE.from_path(work / "vae", dtype="float32")
    latents, captions = [], []
    bar = _progress(s.images, "encode")
    with single_frame_convs():
        for i in range(0, s.images, 32):
            n = min(32, s.images - i)
            pixels, caps, _ = world.world_batch(s.seed + 3, i, n)
            latents.append(vae.encode(pixels))
            captions += caps
            bar.update(n)
    bar.close()
    save_safetensors_atomic({"latents": torch.cat(latents)}, out, metadata={"captions": captions})
    return out


def load_latents(path: Path) -> tuple[torch.Tensor, list[str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as h:
        return h.get_tensor("latents"), json.loads(h.metadata()["captions"])


# ---------------------------------------------------------------------------------------------------- stage 4: Raw
def flow_loss(model, x0, noise, sigmas, text, mask) -> torch.Tensor:
    """The trainer's flow-matching loss (train/trainer.py `loss_on`): x_t = (1-s) x0 + s noise, target noise - x0."""
    s = sigmas.view(-1, 1, 1)
    xt = (1 - s) * x0 + s * noise
    pos = position_ids(text.shape[1], 8, 8) if x0.shape[1] == 64 else _grid_pos(text.shape[1], x0.shape[1])
    pred = model(hidden_states=xt, encoder_hidden_states=text, timestep=sigmas, position_ids=pos,
                 encoder_attention_mask=mask, return_dict=False)[0]
    return F.mse_loss(pred.float(), noise - x0)


def _grid_pos(text_len: int, tokens: int) -> torch.Tensor:
    side = int(round(tokens ** 0.5))
    return position_ids(text_len, side, side)


@torch.no_grad()
def _ema_update(ema, model, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def stage_raw(work: Path, s: PretrainSettings) -> Path:
    out = work / "transformer_raw.safetensors"
    if out.exists():
        return out
    latents, captions = load_latents(work / "latents.safetensors")
    embeds = load_text_embeds(work / "text_embeds.safetensors")
    model = micro.build_transformer(s.seed).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=s.raw_lr, betas=(0.9, 0.99), weight_decay=0.0)
    ckpt = work / "ckpt_raw.safetensors"
    start = _load_ckpt(ckpt, model, opt, ema) if ckpt.exists() else 0
    tcfg = TimestepSection(**s.timesteps)
    bar = _progress(s.raw_steps, "raw", start)
    for step in range(start, s.raw_steps):
        g = _gen(s.seed, 4, step)
        idx = torch.randint(0, latents.shape[0], (s.raw_batch,), generator=g)
        drop = torch.rand(s.raw_batch, generator=g) < s.caption_dropout  # the unconditional branch CFG needs
        text, mask = pad_text([embeds["" if d else captions[i]] for i, d in zip(idx.tolist(), drop.tolist())])
        x0 = pack_latents(latents[idx])
        noise = torch.randn(x0.shape, generator=g)
        sigmas = sample_sigmas(tcfg, s.raw_batch, x0.shape[1], g)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, s.raw_steps, s.raw_lr, s.raw_warmup)
        loss = flow_loss(model, x0, noise, sigmas, text, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        # EMA warms up (decay grows with the step) so early weights do not linger in a short run
        _ema_update(ema, model, min(s.ema_decay, (1 + step) / (10 + step)))
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if (step + 1) % s.checkpoint_every == 0 and step + 1 < s.raw_steps:
            _save_ckpt(ckpt, step + 1, model, opt, ema)
    bar.close()
    meta = {"krea2_variant": "raw", "krea2_note": "micro Krea 2 Raw, pretrained on the procedural world"}
    save_safetensors_atomic(original_file_state(ema), out, metadata=meta)
    ckpt.unlink(missing_ok=True)
    return out


# -------------------------------------------------------------------------------------------------- stage 5: Turbo
def turbo_sigmas() -> torch.Tensor:
    """Turbo's 8-step grid (mu 1.15) with the final 0: the sigmas the sampler visits (inference.sample_latents)."""
    return torch.cat([sampling_sigmas(facts.TURBO_STEPS, facts.TURBO_MU), torch.zeros(1)])


@torch.no_grad()
def teacher_trajectory(teacher, noise, text, mask, uncond, guidance: float, substeps: int) -> torch.Tensor:
    """States (B, 9, N, C) of Raw's guided Euler ODE at Turbo's grid points, each interval in `substeps` steps."""
    grid = turbo_sigmas()
    x = noise
    states = [x]
    neg, neg_mask = pad_text([uncond] * x.shape[0])
    for i in range(len(grid) - 1):
        fine = torch.linspace(float(grid[i]), float(grid[i + 1]), substeps + 1)
        for a, b in zip(fine[:-1], fine[1:]):
            sig = torch.full((x.shape[0],), float(a))
            v = flow_velocity(teacher, x, sig, text, mask)
            if guidance > 0:
                v = v + guidance * (v - flow_velocity(teacher, x, sig, neg, neg_mask))
            x = x + (b - a) * v
        states.append(x)
    return torch.stack(states, dim=1)


def flow_velocity(model, x, sigmas, text, mask) -> torch.Tensor:
    pos = _grid_pos(text.shape[1], x.shape[1])
    if mask is not None and bool(mask.all()):
        mask = None
    return model(hidden_states=x, encoder_hidden_states=text, timestep=sigmas, position_ids=pos,
                 encoder_attention_mask=mask, return_dict=False)[0].float()


def stage_trajectories(work: Path, s: PretrainSettings) -> Path:
    """Teacher trajectories in chunks (each chunk a file, so an interrupted run keeps what it made)."""
    from krea2_train.models.loading import load_transformer

    folder = work / "trajectories"
    folder.mkdir(parents=True, exist_ok=True)
    embeds = load_text_embeds(work / "text_embeds.safetensors")
    captions = [c for c in embeds if c]
    teacher = load_transformer(work / "transformer_raw.safetensors", dtype="float32")
    chunks = range(math.ceil(s.trajectories / s.trajectory_batch))
    bar = _progress(len(chunks), "trajectories")
    for c in chunks:
        path = folder / f"chunk_{c:04d}.safetensors"
        if not path.exists():
            g = _gen(s.seed, 5, c)
            pick = [captions[i] for i in torch.randint(0, len(captions), (s.trajectory_batch,), generator=g)]
            text, mask = pad_text([embeds[p] for p in pick])
            noise = torch.randn((s.trajectory_batch, 64, 64), generator=g)
            states = teacher_trajectory(teacher, noise, text, mask, embeds[""], s.guidance, s.substeps)
            save_safetensors_atomic({"states": states}, path, metadata={"captions": pick})
        bar.update(1)
    bar.close()
    return folder


def load_trajectories(folder: Path, count: int) -> tuple[torch.Tensor, list[str]]:
    from safetensors import safe_open

    states, captions = [], []
    for path in sorted(folder.glob("chunk_*.safetensors")):
        with safe_open(str(path), framework="pt") as h:
            states.append(h.get_tensor("states"))
            captions += json.loads(h.metadata()["captions"])
    return torch.cat(states)[:count], captions[:count]


def stage_turbo(work: Path, s: PretrainSettings) -> Path:
    from krea2_train.models.loading import load_transformer

    out = work / "transformer_turbo.safetensors"
    if out.exists():
        return out
    stage_trajectories(work, s)
    states, captions = load_trajectories(work / "trajectories", s.trajectories)
    embeds = load_text_embeds(work / "text_embeds.safetensors")
    grid = turbo_sigmas()
    student = load_transformer(work / "transformer_raw.safetensors", dtype="float32").train().requires_grad_(True)
    opt = torch.optim.AdamW(student.parameters(), lr=s.turbo_lr, betas=(0.9, 0.99), weight_decay=0.0)
    ckpt = work / "ckpt_turbo.safetensors"
    start = _load_ckpt(ckpt, student, opt) if ckpt.exists() else 0
    bar = _progress(s.turbo_steps, "turbo", start)
    for step in range(start, s.turbo_steps):
        g = _gen(s.seed, 6, step)
        j = torch.randint(0, states.shape[0], (s.turbo_batch,), generator=g)
        i = torch.randint(0, len(grid) - 1, (s.turbo_batch,), generator=g)
        x_i, x_next = states[j, i], states[j, i + 1]
        s_i, s_next = grid[i], grid[i + 1]
        # the velocity whose one Euler step lands on the teacher's state: (x_{i+1} - x_i) / (s_{i+1} - s_i)
        target = (x_next - x_i) / (s_next - s_i).view(-1, 1, 1)
        text, mask = pad_text([embeds[captions[k]] for k in j.tolist()])
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, s.turbo_steps, s.turbo_lr, 20)
        pred = flow_velocity(student, x_i, s_i, text, mask)
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if (step + 1) % s.checkpoint_every == 0 and step + 1 < s.turbo_steps:
            _save_ckpt(ckpt, step + 1, student, opt)
    bar.close()
    meta = {"krea2_variant": "turbo", "krea2_note": "micro Krea 2 Turbo, 8-step trajectory-distilled from Raw"}
    save_safetensors_atomic(original_file_state(student.eval()), out, metadata=meta)
    ckpt.unlink(missing_ok=True)
    return out


# ------------------------------------------------------------------------------------------------------- all
STAGES = (("text", stage_text), ("vae", stage_vae), ("vae_graphics", stage_vae_graphics), ("latents", stage_latents),
          ("raw", stage_raw),
          ("turbo", stage_turbo))


def pretrain(work, settings: PretrainSettings | None = None) -> dict:
    """Run every stage not yet done; returns {stage: seconds spent in this call} (also kept in timings.json)."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    s = settings or PretrainSettings()
    settings_file = work / "settings.json"
    if settings_file.exists() and json.loads(settings_file.read_text()) != asdict(s):
        raise RuntimeError(f"{work} was started with other settings ({settings_file}); use a fresh work folder")
    write_json_atomic(settings_file, asdict(s))
    timings_file = work / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    for name, fn in STAGES:
        t0 = time.perf_counter()
        fn(work, s)
        spent = time.perf_counter() - t0
        if spent > 1.0 or name not in timings:  # a skipped (already done) stage keeps its recorded time
            timings[name] = timings.get(name, 0.0) + spent
        write_json_atomic(timings_file, timings)
        log.info("stage %s done (%.0f s)", name, spent)
    return timings
