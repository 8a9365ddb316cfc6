"""How close Raw + a Turbo LoRA (Turbo minus Raw, extracted at a few ranks) is to the real Turbo, on the tiny and
the shipped micro Krea 2: what `preview.turbo: LORA_FILE` and `sample --turbo-lora` stand on.

    python scripts/measure_turbo_lora.py                          # tiny and micro, ranks 4, 16, 64
    python scripts/measure_turbo_lora.py --models micro --ranks 4,16,64,128 --json out.json

Per model and rank (Raw alone is the "rank 0" row: how far Turbo is from Raw to begin with):
    energy        share of the squared Turbo - Raw weight difference the LoRA keeps (mean over modules)
    v_rel_err     ||v(Raw + LoRA) - v(Turbo)|| / ||v(Turbo)|| over the prompts, at sigmas 0.25 / 0.5 / 0.75 / 1.0
    psnr_8        pixel PSNR (dB) of 8-step Turbo-schedule samples (shift 1.15, no CFG) against Turbo's own
    psnr_recipe   the same for the shared recipe: the LoRA at 0.6, 12 steps, CFG 1, ComfyUI's beta scheduler
    strength / ratio / cosine   the transfer report of one fixed random "style" LoRA with Raw + Turbo LoRA in
                  place of Turbo (export/transfer.py: suggested Turbo strength, Turbo/Raw delta ratio, cosine)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

PROMPTS = ["a red circle on a blue background", "a yellow square on a green background",
           "a white triangle on a black background"]
SIGMAS = (0.25, 0.5, 0.75, 1.0)


def _style_lora(transformer, seed: int = 0):
    """A fixed random LoRA on the attention projections (rank 4, alpha 8): the stand-in for a trained one."""
    import torch

    from krea2_train.lora.formats import TrainedAdapter

    gen = torch.Generator().manual_seed(seed)
    down, up, alpha = {}, {}, {}
    for name, m in transformer.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith("transformer_blocks.") and ".attn." in name:
            down[name] = torch.randn(4, m.in_features, generator=gen) * 0.1
            up[name] = torch.randn(m.out_features, 4, generator=gen) * 0.1
            alpha[name] = 8.0
    return TrainedAdapter(down, up, alpha, info={"name": "random_style"})


def _psnr(a, b) -> float:
    import numpy as np

    mse = float(np.mean([(np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2 for x, y in zip(a, b)]))
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def measure(name: str, paths, ranks, size: int, work: Path) -> list[dict]:
    import torch

    from krea2_train.export.transfer import transfer_report
    from krea2_train.inference import SampleSettings, predict_velocity, sample_latents, stacked_lora
    from krea2_train.lora.tools import extract_lora, merge_into_checkpoint
    from krea2_train.models.loading import load_transformer
    from krea2_train.models.text_encoder import TextEncoder
    from krea2_train.models.vae import VAE, to_pil
    from krea2_train.schedule import pack_latents

    raw = load_transformer(paths.transformer_raw, dtype="float32")
    turbo = load_transformer(paths.transformer_turbo, dtype="float32")
    te = TextEncoder.from_path(paths.text_encoder, dtype="float32")
    vae = VAE.from_path(paths.vae, dtype="float32")
    emb, mask = te.encode(PROMPTS)
    grid = (size // 16, size // 16)
    gen = torch.Generator().manual_seed(0)
    x0 = pack_latents(torch.randn(len(PROMPTS), 16, size // 8, size // 8, generator=gen))
    noise = torch.randn(x0.shape, generator=gen)
    inputs = [((1 - s) * x0 + s * noise, torch.full((len(PROMPTS),), s)) for s in SIGMAS]
    eight = SampleSettings.turbo(height=size, width=size, seed=0)
    recipe = SampleSettings.turbo(height=size, width=size, seed=0, steps=12, scheduler="beta")

    def velocities(model):
        return [predict_velocity(model, x, s, emb, mask, grid).float() for x, s in inputs]

    def images(model, settings):
        return [im for i in range(len(PROMPTS)) for im in
                to_pil(vae.decode(sample_latents(model, emb[i:i + 1], mask[i:i + 1], settings)))]

    with torch.no_grad():
        v_turbo = velocities(turbo)
        turbo_images = images(turbo, eight)
        style = _style_lora(raw)
        common = dict(text_encoder=te, prompts=PROMPTS, height=size, width=size, dtype="float32", device="cpu",
                      render=False)
        real = transfer_report(style, raw=str(paths.transformer_raw), turbo=str(paths.transformer_turbo),
                               out_dir=work / f"{name}_turbo", **common)

        def row(rank, model, energy, turbo_file):
            v = velocities(model)
            err = sum(float((a - b).norm() ** 2) for a, b in zip(v, v_turbo)) ** 0.5 / \
                sum(float(b.norm() ** 2) for b in v_turbo) ** 0.5
            out = {"model": name, "rank": rank, "energy": energy, "v_rel_err": err,
                   "psnr_8": _psnr(images(model, eight), turbo_images)}
            if turbo_file is not None:
                rep = transfer_report(style, raw=str(paths.transformer_raw), turbo=str(turbo_file),
                                      out_dir=work / f"{name}_r{rank}", **common)
                out.update(strength=rep["suggested_turbo_strength"], ratio=rep["ratio"], cosine=rep["cosine"])
            return out

        rows = [{"model": name, "rank": "Turbo", "energy": 1.0, "v_rel_err": 0.0, "psnr_8": float("inf"),
                 "strength": real["suggested_turbo_strength"], "ratio": real["ratio"], "cosine": real["cosine"]},
                {**row("Raw alone", raw, 0.0, None), "psnr_recipe": None}]
        for rank in ranks:
            lora, report = extract_lora(paths.transformer_raw, paths.transformer_turbo, rank=rank)
            energy = sum(r["energy"] for r in report.values()) / len(report)
            merged = merge_into_checkpoint([(lora, 1.0)], paths.transformer_raw, work / f"{name}_r{rank}.safetensors",
                                           dtype="float32")  # Raw + LoRA as a file, for the transfer report
            with stacked_lora(raw, lora, 1.0, "turbo_lora"):
                r = row(rank, raw, energy, merged)
            with stacked_lora(raw, lora, 0.6, "turbo_lora"):
                r["psnr_recipe"] = _psnr(images(raw, recipe), turbo_images)
            rows.append(r)
            print(_line(r), flush=True)
    return rows


def _line(r: dict) -> str:
    def f(key, fmt):
        v = r.get(key)
        return "-" if v is None else format(v, fmt)

    return (f"{r['model']:6} {str(r['rank']):>9}  energy {f('energy', '.4f')}  v_rel_err {f('v_rel_err', '.4f')}  "
            f"PSNR 8-step {f('psnr_8', '5.1f')} dB  recipe {f('psnr_recipe', '5.1f')} dB  strength "
            f"{f('strength', '.3f')}  ratio {f('ratio', '.3f')}  cosine {f('cosine', '.4f')}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,micro", help="comma-separated: tiny, micro")
    p.add_argument("--ranks", default="4,16,64")
    p.add_argument("--size", type=int, default=128, help="sample side in px (a multiple of 16)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from krea2_train.models.micro import micro_paths, paths_in
    from krea2_train.models.tiny import make_tiny

    ranks = [int(x) for x in args.ranks.split(",") if x.strip()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            paths = micro_paths() if name == "micro" else paths_in(make_tiny(work / "tiny"))
            rows += measure(name, paths, ranks, args.size if name == "micro" else 64, work)
    print("\n" + "\n".join(_line(r) for r in rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
