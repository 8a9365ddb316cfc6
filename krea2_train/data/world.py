"""The micro model's procedural world: one flat shape on a plain background, captioned from a small grammar.

    a [small|large] {colour} {shape} [at the {position}] on a {colour} background

Images are pure functions of (seed, index), so the world is CC0 by construction and the same on every machine.
What the world deliberately lacks is the demo style of `datasets/demo` (flat Bauhaus posters: several shapes,
thick black outlines, cream hatched paper, a navy/teal/mustard palette): here there is exactly one shape, no
outline, no texture, no paper colour and none of those hues, so a LoRA trained on the demo posters has something
visible to learn.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

SIZE = 128
# Saturated, well separated sRGB values so a sample's colours can be read back by nearest palette entry.
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "orange": (245, 140, 30),
    "purple": (140, 50, 180),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": (0.22, 0.32), "large": (0.50, 0.62)}  # side / diameter as a fraction of the image
POSITIONS = {"left": (0.28, 0.5), "right": (0.72, 0.5), "top": (0.5, 0.28), "bottom": (0.5, 0.72),
             "centre": (0.5, 0.5)}
# Every word a caption can contain; the micro tokenizer learns each as a whole token.
WORDS = ("a on at the background " + " ".join(COLOURS) + " " + " ".join(SHAPES) + " " + " ".join(SIZES) + " "
         + " ".join(POSITIONS))


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    background: str
    size: str | None = None  # None: medium (not named in the caption)
    position: str | None = None  # None: anywhere that fits (not named in the caption)

    def caption(self) -> str:
        size = f"{self.size} " if self.size else ""
        where = f" at the {self.position}" if self.position else ""
        return f"a {size}{self.colour} {self.shape}{where} on a {self.background} background"


def random_scene(rng: random.Random, detail: float = 0.5) -> Scene:
    """Foreground and background colours always differ; size and position are named with probability `detail`."""
    colour, background = rng.sample(sorted(COLOURS), 2)
    shape = rng.choice(SHAPES)
    size = rng.choice(sorted(SIZES)) if rng.random() < detail else None
    position = rng.choice(sorted(POSITIONS)) if rng.random() < detail else None
    return Scene(colour, shape, background, size, position)


def render(scene: Scene, rng: random.Random, size: int = SIZE):
    """The scene as a PIL RGB image. Drawn at 4x and downsampled, so edges are anti-aliased like a real picture."""
    from PIL import Image, ImageDraw

    k = 4
    big = size * k
    img = Image.new("RGB", (big, big), COLOURS[scene.background])
    draw = ImageDraw.Draw(img)
    lo, hi = SIZES[scene.size] if scene.size else (0.34, 0.46)
    extent = rng.uniform(lo, hi) * big
    half = extent / 2
    if scene.position:
        cx, cy = (c * big for c in POSITIONS[scene.position])
        jitter = 0.05 * big
        cx, cy = cx + rng.uniform(-jitter, jitter), cy + rng.uniform(-jitter, jitter)
    else:
        cx, cy = rng.uniform(half + 0.04 * big, big - half - 0.04 * big), rng.uniform(half + 0.04 * big,
                                                                                     big - half - 0.04 * big)
    # keep the whole shape inside the frame
    cx, cy = min(max(cx, half + 2), big - half - 2), min(max(cy, half + 2), big - half - 2)
    fill = COLOURS[scene.colour]
    box = (cx - half, cy - half, cx + half, cy + half)
    if scene.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif scene.shape == "square":
        draw.rectangle(box, fill=fill)
    else:  # upward isosceles triangle filling the box
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    return img.resize((size, size), Image.LANCZOS)


def world_item(seed: int, index: int, size: int = SIZE, detail: float = 0.5):
    """(PIL image, caption, scene) number `index` of the world drawn from `seed`."""
    rng = random.Random(seed * 1_000_003 + index)
    scene = random_scene(rng, detail)
    return render(scene, rng, size), scene.caption(), scene


def to_tensor(images) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) float32 in [-1, 1] (the VAE's input range)."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def world_batch(seed: int, start: int, count: int, size: int = SIZE, detail: float = 0.5):
    """(pixels (B, 3, H, W) in [-1, 1], captions, scenes) for items start .. start+count-1."""
    items = [world_item(seed, i, size, detail) for i in range(start, start + count)]
    return to_tensor([im for im, _, _ in items]), [c for _, c, _ in items], [s for _, _, s in items]


def all_captions() -> list[str]:
    """Every caption the grammar can produce (8 * 7 * 3 * 3 * 6 = 3024), sorted: the text cache for pretraining."""
    out = []
    for colour in COLOURS:
        for background in COLOURS:
            if background == colour:
                continue
            for shape in SHAPES:
                for size in (None, *SIZES):
                    for position in (None, *POSITIONS):
                        out.append(Scene(colour, shape, background, size, position).caption())
    return sorted(out)


def prompt_set(seed: int, count: int) -> list[Scene]:
    """`count` seeded plain prompts `a {colour} {shape} on a {colour} background` for measuring prompt following."""
    rng = random.Random(seed)
    scenes = []
    for _ in range(count):
        colour, background = rng.sample(sorted(COLOURS), 2)
        scenes.append(Scene(colour, rng.choice(SHAPES), background))
    return scenes


# ------------------------------------------------------------------------------------------ the VAE's wider world
def broad_image(seed: int, index: int, size: int = SIZE):
    """A random flat-graphics picture for training the micro VAE only: any RGB colours (not the world's eight),
    1-5 overlapping shapes and bars, outlines of random width and colour, stripes, gradients and grain.

    A real VAE is trained on far more than its transformer's data; one trained on the world alone cannot represent
    a picture outside it (measured: the demo posters' cream paper came back white, teal purple, outlines lost), so a
    LoRA could never show a new style through it. This set covers the kinds of thing a style brings (palettes, ink
    lines, hatching, paper grain) without drawing the demo posters themselves."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed * 1_000_003 + index + 7)
    k = 2
    big = size * k

    def colour():
        return tuple(rng.randrange(256) for _ in range(3))

    img = Image.new("RGB", (big, big), colour())
    draw = ImageDraw.Draw(img)
    if rng.random() < 0.35:  # vertical or horizontal gradient
        a, b = np.array(colour(), np.float32), np.array(colour(), np.float32)
        t = np.linspace(0, 1, big, dtype=np.float32)[:, None, None]
        grad = (a * (1 - t) + b * t).repeat(big, axis=1)
        img = Image.fromarray((grad if rng.random() < 0.5 else grad.transpose(1, 0, 2)).astype(np.uint8))
        draw = ImageDraw.Draw(img)
    if rng.random() < 0.4:  # stripes / hatching across the whole frame
        step, width, ink = rng.randint(4, 24), rng.randint(1, 4), colour()
        for x in range(-big, big, step):
            draw.line([(x, 0), (x + big, big)] if rng.random() < 0.5 else [(x, 0), (x, big)], fill=ink, width=width)
    for _ in range(rng.randint(1, 5)):
        w, h = rng.uniform(0.1, 0.7) * big, rng.uniform(0.1, 0.7) * big
        x, y = rng.uniform(-0.1, 0.9) * big, rng.uniform(-0.1, 0.9) * big
        box = (x, y, x + w, y + h)
        outline = colour() if rng.random() < 0.5 else (rng.randrange(40),) * 3
        width = rng.choice((0, 0, 2, 4, 8, 12))
        kind = rng.randrange(4)
        if kind == 0:
            draw.ellipse(box, fill=colour(), outline=outline, width=width)
        elif kind == 1:
            draw.rectangle(box, fill=colour(), outline=outline, width=width)
        elif kind == 2:
            draw.polygon([(x + w / 2, y), (x + w, y + h), (x, y + h)], fill=colour(), outline=outline,
                         width=width)
        else:
            draw.pieslice(box, rng.choice((0, 90, 180, 270)), rng.choice((180, 270, 360)) , fill=colour(),
                          outline=outline, width=width)
    out = np.asarray(img.resize((size, size), Image.LANCZOS), dtype=np.float32)
    if rng.random() < 0.4:  # paper grain
        out = out + np.random.default_rng(rng.randrange(2**32)).normal(0, rng.uniform(2, 10), out.shape)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def broad_batch(seed: int, start: int, count: int, size: int = SIZE) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1]: broad_image for items start .. start+count-1."""
    return to_tensor([broad_image(seed, i, size) for i in range(start, start + count)])


def graphic_image(seed: int, index: int, size: int = SIZE):
    """A random flat graphic design for the micro VAE's second phase: a pale paper-like ground (any light colour,
    sometimes finely hatched in a darker tone of itself), 1-6 flat shapes and bars in random colours, most with
    near-black outlines 1-5 px wide at 128 px. `broad_image` rarely draws a pale ground or a thin dark line, and
    a VAE that never saw them turns a cream page white and drops outlines; never the demo posters themselves
    (their own palette and layouts are not drawn here; tests check the distance)."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed * 1_000_003 + index + 13)
    k = 4
    big = size * k
    ground = tuple(rng.randint(170, 255) for _ in range(3))
    img = Image.new("RGB", (big, big), ground)
    draw = ImageDraw.Draw(img)
    if rng.random() < 0.5:
        shade = tuple(max(0, c - rng.randint(10, 40)) for c in ground)
        step, width = rng.randint(8, 28), rng.randint(2, 5)
        for x in range(-big, big, step):
            draw.line([(x, 0), (x + big, big)], fill=shade, width=width)
    ink = (rng.randrange(50),) * 3
    for _ in range(rng.randint(1, 6)):
        w, h = rng.uniform(0.08, 0.6) * big, rng.uniform(0.08, 0.6) * big
        if rng.random() < 0.3:  # a bar
            h = rng.uniform(0.03, 0.1) * big
        x, y = rng.uniform(0.0, 1.0) * big - w / 2, rng.uniform(0.0, 1.0) * big - h / 2
        box = (x, y, x + w, y + h)
        fill = tuple(rng.randrange(256) for _ in range(3))
        width = rng.choice((0, 4, 6, 8, 12, 16, 20))
        kind = rng.randrange(4)
        if kind == 0:
            draw.ellipse(box, fill=fill, outline=ink, width=width)
        elif kind == 1:
            draw.rectangle(box, fill=fill, outline=ink, width=width)
        elif kind == 2:
            draw.polygon([(x + w / 2, y), (x + w, y + h), (x, y + h)], fill=fill, outline=ink, width=width)
        else:
            draw.pieslice(box, 180, 360, fill=fill, outline=ink, width=width)
    if rng.random() < 0.5:  # a frame around the page
        draw.rectangle((0, 0, big - 1, big - 1), outline=ink, width=rng.choice((4, 8, 12)))
    return img.resize((size, size), Image.LANCZOS)


def graphic_batch(seed: int, start: int, count: int, size: int = SIZE) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1]: graphic_image for items start .. start+count-1."""
    return to_tensor([graphic_image(seed, i, size) for i in range(start, start + count)])


# ------------------------------------------------------------------------------------------ edit pairs (edit LoRAs)
EDIT_COLOUR = "red"
EDIT_INSTRUCTION = f"make the shape {EDIT_COLOUR}"  # "the", "shape" and "red" are whole micro tokens


@dataclass(frozen=True)
class EditPair:
    reference: object  # PIL image: the input
    target: object  # PIL image: the same scene (shape, size, position, background) with the shape in EDIT_COLOUR
    instruction: str
    scene: Scene  # the reference's scene


def edit_scene(rng: random.Random) -> Scene:
    """A reference scene for the edit: neither its shape nor its background is EDIT_COLOUR already (a red shape
    would make the pair a no-op, and a red background would hide the recoloured shape)."""
    colour, background = rng.sample(sorted(c for c in COLOURS if c != EDIT_COLOUR), 2)
    shape = rng.choice(SHAPES)
    size = rng.choice(sorted(SIZES)) if rng.random() < 0.5 else None
    position = rng.choice(sorted(POSITIONS)) if rng.random() < 0.5 else None
    return Scene(colour, shape, background, size, position)


def edit_pair(seed: int, index: int, size: int = SIZE) -> EditPair:
    """Edit pair number `index` from `seed`: "make the shape red". Both images are drawn from the same geometry
    draws (render's random numbers do not depend on the colour), so only the shape's colour differs."""
    from dataclasses import replace

    rng = random.Random(seed * 1_000_003 + index + 29)
    scene = edit_scene(rng)
    state = rng.getstate()
    reference = render(scene, rng, size)
    rng.setstate(state)
    target = render(replace(scene, colour=EDIT_COLOUR), rng, size)
    return EditPair(reference, target, EDIT_INSTRUCTION, scene)
