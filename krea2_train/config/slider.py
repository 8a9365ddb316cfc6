"""`train.mode: slider`: the slider targets of a concept-slider run (train/slider.py trains them).

    train:
      mode: slider
      sliders:
        - target: "a photo of a person"                 # what the slider changes
          positive: "a photo of a person, highly detailed, intricate"   # the +1 direction
          negative: "a photo of a person, blurry, plain, smooth"        # the -1 direction
          anchors: ["a photo of a landscape"]           # prompts the slider must leave alone
          guidance: 2.0                                 # how far +1 pushes along v(positive) - v(negative)
          images: null                                  # a folder of starting images, else pure noise

No dataset is needed: the frozen Raw model's own predictions are the teacher.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class SliderTarget:
    target: str = ""
    positive: str = ""
    negative: str = ""
    anchors: List[str] = field(default_factory=list)
    guidance: float = 1.0
    # Weight of the anchor term (the LoRA must keep the base velocity on the anchor prompts) against the slider term.
    anchor_weight: float = 1.0
    # A folder of images whose latents start the noising (x_t = (1 - sigma) x0 + sigma noise); null: x_t is pure noise.
    images: Optional[str] = None


def slider_problems(cfg) -> list[tuple[str, str]]:
    """(key, message) for every impossible slider setting; empty when the config is fine."""
    from pathlib import Path

    t = cfg.train
    out = []
    if t.mode != "slider":
        if t.sliders:
            out.append(("train.sliders", "is only read with train.mode: slider; set train.mode: slider or remove "
                                         "train.sliders"))
        return out
    if not t.sliders:
        out.append(("train.sliders", "must list at least one slider target ({target, positive, negative}) when "
                                     "train.mode is slider; see configs/slider.yaml"))
    for i, s in enumerate(t.sliders):
        k = f"train.sliders[{i}]"
        for name in ("target", "positive", "negative"):
            if not str(getattr(s, name)).strip():
                out.append((f"{k}.{name}", "must be a non-empty prompt"))
        if s.positive.strip() and s.positive == s.negative:
            out.append((f"{k}.negative", "equals positive: the slider would have no direction; give two opposite "
                                         "prompts"))
        if not s.guidance > 0:
            out.append((f"{k}.guidance", f"= {s.guidance} must be positive (typical: 1 to 4)"))
        if s.anchor_weight < 0:
            out.append((f"{k}.anchor_weight", f"= {s.anchor_weight} must be >= 0"))
        if any(not str(a).strip() for a in s.anchors):
            out.append((f"{k}.anchors", "has an empty prompt; remove it"))
        if s.images is not None and not Path(str(s.images)).expanduser().is_dir():
            out.append((f"{k}.images", f"= {s.images!r} is not a folder; point it at a folder of images or set "
                                       "it to null (start from pure noise)"))
    if cfg.lora.type == "dora":
        out.append(("lora.type", "= dora cannot train a slider: DoRA's magnitude does not flip sign with the "
                                 "strength, so -1 would not undo +1; use lora.type: lora"))
    if cfg.data.datasets:
        out.append(("data.datasets", "is not read by a slider run (its teacher is the Raw model itself); remove it, "
                                     "or set train.mode: lora"))
    return out
