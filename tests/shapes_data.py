"""A captioned image set whose content can be checked: coloured shapes of two sizes at two positions
on varied backgrounds, with several caption phrasings. Used by the quality benchmark and its test."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 225), "yellow": (235, 215, 30), "purple": (140, 40, 175)}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("top", "bottom")
PHRASINGS = (
    "a {size} {colour} {shape} at the {position}",
    "{colour} {shape} , {size} , at the {position}",
    "a picture of a {size} {colour} {shape} on the {position}",
)
# Captions that name only some attributes, as real captions do: they teach each attribute on its own,
# which is what lets an unseen (colour, shape) pair, or a one-word query like "green", land in the right place.
# Position is the exception: neither tower learns it (top/bottom caption cosine stays ~1.0, image
# top-10 same-position at chance), and captions naming the position alone did not change that.
PARTIAL_PHRASINGS = (
    "a {colour} {shape}",
    "{colour}",
    "a {shape}",
    "a {size} {shape} at the {position}",
)
HELD_OUT = (("red", "triangle"), ("blue", "circle"), ("yellow", "square"))  # never seen in training


@dataclass(frozen=True)
class Spec:
    colour: str
    shape: str
    size: str
    position: str

    def caption(self, phrasing: int = 0, partial: bool = False) -> str:
        phrasings = PHRASINGS + PARTIAL_PHRASINGS if partial else PHRASINGS
        return phrasings[phrasing % len(phrasings)].format(**self.__dict__)


def all_specs(held_out: bool) -> list[Spec]:
    """Every attribute combination whose (colour, shape) is (held_out=True) or is not held out."""
    return [Spec(c, s, z, p) for c, s, z, p in itertools.product(COLOURS, SHAPES, SIZES, POSITIONS)
            if ((c, s) in HELD_OUT) == held_out]


def draw(spec: Spec, rng: np.random.Generator, size: int = 64) -> Image.Image:
    base = rng.integers(60, 200, 3)
    noise = rng.normal(0, 12, (size, size, 3))
    img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    r = int(size * (0.13 if spec.size == "small" else 0.26) * rng.uniform(0.9, 1.1))
    cx = int(rng.uniform(r + 2, size - r - 2))
    cy = int(size * (0.27 if spec.position == "top" else 0.73) + rng.uniform(-3, 3))
    fill = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in COLOURS[spec.colour])
    box = [cx - r, cy - r, cx + r, cy + r]
    if spec.shape == "circle":
        d.ellipse(box, fill=fill)
    elif spec.shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def write_set(folder: Path, specs: list[Spec], per_spec: int, seed: int, captions: bool = True,
              partial: bool = False) -> dict[str, Spec]:
    """Images (and sidecar captions, some naming only some attributes when partial) for each spec;
    returns file name -> spec."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for i, (spec, k) in enumerate(itertools.product(specs, range(per_spec))):
        name = f"{spec.colour}_{spec.shape}_{spec.size}_{spec.position}_{seed}_{k}.png"
        draw(spec, rng).save(folder / name)
        if captions:
            (folder / name).with_suffix(".txt").write_text(spec.caption(i, partial))
        truth[name] = spec
    return truth
