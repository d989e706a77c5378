"""The shapes world's data: coloured shapes on backgrounds, 32x32, with captions.

Everything is generated on the fly from a seed. Captions use a few templates, and sometimes a
synonym of the shape's name ("disc" for circle), so that erasing a concept can be tested beyond
its exact word.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SIZE = 32
SHAPES = ("circle", "square", "triangle", "cross", "star")
COLOURS = {  # hues 60 degrees apart: separable for the classifier and the generator alike
    "red": (220, 30, 30),
    "yellow": (235, 215, 20),
    "green": (30, 175, 45),
    "cyan": (20, 200, 210),
    "blue": (35, 60, 225),
    "purple": (165, 40, 195),
}
BACKGROUNDS = {"black": (0, 0, 0), "gray": (110, 110, 110), "white": (245, 245, 245)}
BACKGROUND_P = (0.7, 0.15, 0.15)
SYNONYMS = {
    "circle": ("disc", "round shape"),
    "square": ("box",),
    "triangle": ("wedge",),
    "cross": ("plus sign",),
    "star": ("pentagram",),
}
COLOUR_NAMES = tuple(COLOURS)

# (template, uses colour, uses background); {s} is the shape's name or a synonym
TEMPLATES = (
    ("a {c} {s}", True, False),
    ("a {c} {s}", True, False),
    ("a {c} {s} on a {b} background", True, True),
    ("{c} {s}", True, False),
    ("a picture of a {c} {s}", True, False),
    ("a {s} that is {c}", True, False),
    ("a {s}", False, False),
    ("a {s} on a {b} background", False, True),
)
P_SYNONYM = 0.2
P_EMPTY = 0.1


@dataclass(frozen=True)
class Item:
    shape: int
    colour: int
    background: int
    caption: str


def vocabulary() -> list[str]:
    """Every word a caption can contain."""
    words = set()
    for t, _, _ in TEMPLATES:
        words |= set(t.replace("{c}", "").replace("{s}", "").replace("{b}", "").split())
    for s in SHAPES:
        words.add(s)
        for syn in SYNONYMS[s]:
            words |= set(syn.split())
    words |= set(COLOURS) | set(BACKGROUNDS)
    return sorted(words)


def caption(rng: np.random.Generator, shape: int, colour: int, background: int) -> str:
    if rng.random() < P_EMPTY:
        return ""
    t, _, _ = TEMPLATES[rng.integers(len(TEMPLATES))]
    name = SHAPES[shape]
    if rng.random() < P_SYNONYM:
        syns = SYNONYMS[name]
        name = syns[rng.integers(len(syns))]
    return t.format(c=COLOUR_NAMES[colour], s=name, b=list(BACKGROUNDS)[background])


def _mask(shape: str, cx: float, cy: float, r: float, ss: int) -> np.ndarray:
    n = SIZE * ss
    ys, xs = np.mgrid[0:n, 0:n].astype(np.float32)
    x = (xs + 0.5) / ss - cx
    y = (ys + 0.5) / ss - cy
    if shape == "circle":
        m = x * x + y * y <= r * r
    elif shape == "square":
        a = r * 0.85
        m = (np.abs(x) <= a) & (np.abs(y) <= a)
    elif shape == "triangle":  # pointing up, centred on its centroid
        h = 1.5 * r
        top, base = -r, h - r
        half = (y - top) / h * (r * 1.0)
        m = (y >= top) & (y <= base) & (np.abs(x) <= half)
    elif shape == "cross":
        w = r * 0.33
        m = ((np.abs(x) <= w) & (np.abs(y) <= r)) | ((np.abs(y) <= w) & (np.abs(x) <= r))
    elif shape == "star":
        ang = np.arctan2(y, x) + math.pi / 2
        rad = np.sqrt(x * x + y * y)
        k = (ang % (2 * math.pi / 5)) / (2 * math.pi / 5)  # position within one spike period
        edge = r * (0.42 + 0.58 * np.abs(1 - 2 * k))
        m = rad <= edge
    else:
        raise ValueError(shape)
    return m


STYLES = ("plain", "stripes")


def _stylise(img: np.ndarray, style: str) -> np.ndarray:
    """A shifted style for model-transfer tests: faint diagonal stripes over the whole image."""
    if style == "plain":
        return img
    if style == "stripes":
        ys, xs = np.mgrid[0:SIZE, 0:SIZE]
        stripes = ((xs + ys) // 3 % 2).astype(np.float32)[..., None]
        return np.clip(img * 0.85 + 0.15 * stripes, 0, 1)
    raise ValueError(f"unknown style {style!r}")


def render(shape: int, colour: int, background: int, rng: np.random.Generator, ss: int = 4) -> np.ndarray:
    """One anti-aliased HxWx3 float image in [0, 1]."""
    r = rng.uniform(8.0, 11.5)
    cx = SIZE / 2 + rng.uniform(-3.5, 3.5)
    cy = SIZE / 2 + rng.uniform(-3.5, 3.5)
    m = _mask(SHAPES[shape], cx, cy, r, ss).astype(np.float32)
    m = m.reshape(SIZE, ss, SIZE, ss).mean(axis=(1, 3))[..., None]
    fg = np.array(COLOURS[COLOUR_NAMES[colour]], np.float32) / 255
    bg = np.array(list(BACKGROUNDS.values())[background], np.float32) / 255
    return m * fg + (1 - m) * bg


def sample_items(rng: np.random.Generator, n: int) -> list[Item]:
    items = []
    for _ in range(n):
        s = int(rng.integers(len(SHAPES)))
        c = int(rng.integers(len(COLOURS)))
        b = int(rng.choice(len(BACKGROUNDS), p=BACKGROUND_P))
        items.append(Item(s, c, b, caption(rng, s, c, b)))
    return items


def batch(rng: np.random.Generator, n: int, style: str = "plain") -> tuple[np.ndarray, list[Item]]:
    items = sample_items(rng, n)
    images = np.stack([_stylise(render(it.shape, it.colour, it.background, rng), style) for it in items])
    return images, items
