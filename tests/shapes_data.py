"""A captioned image set whose content can be checked: coloured shapes of two sizes with a fourth
attribute (their position, or whether they are filled or outlined) on varied backgrounds, with several
caption phrasings. Used by the quality benchmark and its test."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 225), "yellow": (235, 215, 30), "purple": (140, 40, 175)}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
# The fourth attribute. Position is what a globally pooled CNN (ALIGN's EfficientNet) is worst at: in
# bench_quality neither tower learned it (top/bottom caption cosine ~1.0, image top-10 same-position at
# chance), also with captions naming the position alone. Fill is one it can see.
DETAILS = {"position": ("top", "bottom"), "fill": ("filled", "outlined")}
DETAIL_WORDS = {"top": "at the top", "bottom": "at the bottom", "filled": "filled", "outlined": "outlined"}
PHRASINGS = (
    "a {size} {colour} {shape} {detail}",
    "{colour} {shape} , {size} , {detail}",
    "a picture of a {size} {colour} {shape} {detail}",
)
# Captions that name only some attributes, as real captions do: they teach each attribute on its own,
# which is what lets an unseen (colour, shape) pair, or a one-word query like "green", land in the right place.
PARTIAL_PHRASINGS = (
    "a {colour} {shape}",
    "{colour}",
    "a {shape}",
    "a {size} {shape} {detail}",
)
HELD_OUT = (("red", "triangle"), ("blue", "circle"), ("yellow", "square"))  # never seen in training


@dataclass(frozen=True)
class Spec:
    colour: str
    shape: str
    size: str
    detail: str  # a value of one of DETAILS

    def caption(self, phrasing: int = 0, partial: bool = False) -> str:
        phrasings = PHRASINGS + PARTIAL_PHRASINGS if partial else PHRASINGS
        return phrasings[phrasing % len(phrasings)].format(**{**self.__dict__, "detail": DETAIL_WORDS[self.detail]})


def all_specs(held_out: bool, fourth: str = "position") -> list[Spec]:
    """Every attribute combination whose (colour, shape) is (held_out=True) or is not held out;
    fourth names the fourth attribute (a key of DETAILS)."""
    return [Spec(c, s, z, d) for c, s, z, d in itertools.product(COLOURS, SHAPES, SIZES, DETAILS[fourth])
            if ((c, s) in HELD_OUT) == held_out]


def draw(spec: Spec, rng: np.random.Generator, size: int = 64) -> Image.Image:
    base = rng.integers(60, 200, 3)
    noise = rng.normal(0, 12, (size, size, 3))
    img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    r = int(size * (0.13 if spec.size == "small" else 0.26) * rng.uniform(0.9, 1.1))
    cx = int(rng.uniform(r + 2, size - r - 2))
    if spec.detail in DETAILS["position"]:
        cy = int(size * (0.27 if spec.detail == "top" else 0.73) + rng.uniform(-3, 3))
    else:
        cy = int(rng.uniform(r + 2, size - r - 2))
    colour = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in COLOURS[spec.colour])
    style = {"outline": colour, "width": max(2, r // 4)} if spec.detail == "outlined" else {"fill": colour}
    box = [cx - r, cy - r, cx + r, cy + r]
    if spec.shape == "circle":
        d.ellipse(box, **style)
    elif spec.shape == "square":
        d.rectangle(box, **style)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], **style)
    return img


def write_set(folder: Path, specs: list[Spec], per_spec: int, seed: int, captions: bool = True,
              partial: bool = False) -> dict[str, Spec]:
    """Images (and sidecar captions, some naming only some attributes when partial) for each spec;
    returns file name -> spec."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for i, (spec, k) in enumerate(itertools.product(specs, range(per_spec))):
        name = f"{spec.colour}_{spec.shape}_{spec.size}_{spec.detail}_{seed}_{k}.png"
        draw(spec, rng).save(folder / name)
        if captions:
            (folder / name).with_suffix(".txt").write_text(spec.caption(i, partial))
        truth[name] = spec
    return truth
