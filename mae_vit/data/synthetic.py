"""Procedural labelled images, so that every part of the toolkit runs with no data set at all.

Ten classes of shapes and textures (disc, square, triangle, ring, cross, horizontal stripes, vertical
stripes, checkerboard, gradient, dots) drawn with random colours, position, size, rotation, a faint
background shading and a little pixel noise. The label of sample `i` is `i % num_classes`, so any
prefix of the sequence is class-balanced to within one sample.

Every sample is a pure function of `(seed, split, index)`: its random generator is seeded from those
three numbers only, so sample `i` has the same pixels whichever process, worker or order produces it.
The splits (`train`, `val`, `test`) are disjoint random streams of the same distribution.

Shapes are rendered from signed distances with a one-pixel soft edge (anti-aliased), so they look
the same at 16 px and at 224 px apart from detail.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from mae_vit.errors import ConfigError

CLASS_NAMES = (
    "disc",
    "square",
    "triangle",
    "ring",
    "cross",
    "horizontal stripes",
    "vertical stripes",
    "checkerboard",
    "gradient",
    "dots",
)
SPLITS = ("train", "val", "test")
MIN_IMG_SIZE = 8
NOISE_STD = 0.03


def check_synthetic_args(*, seed: int, img_size: int, num_classes: int, split: str = "train") -> None:
    """Raise ConfigError for settings the generator cannot honour."""
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"Synthetic data needs a non-negative integer seed, got {seed!r}. Set seed to 0 or more.")
    if not isinstance(img_size, int) or img_size < MIN_IMG_SIZE:
        raise ConfigError(
            f"Synthetic images must be at least {MIN_IMG_SIZE} px, got img_size={img_size!r}. "
            f"Set img_size to an integer of {MIN_IMG_SIZE} or more (e.g. 32)."
        )
    if not isinstance(num_classes, int) or not 1 <= num_classes <= len(CLASS_NAMES):
        raise ConfigError(
            f"The synthetic generator has {len(CLASS_NAMES)} classes ({', '.join(CLASS_NAMES)}); "
            f"num_classes={num_classes!r} is not between 1 and {len(CLASS_NAMES)}. Choose a value in that range."
        )
    if split not in SPLITS:
        raise ConfigError(f"Unknown synthetic split {split!r}; use one of {', '.join(SPLITS)}.")


def _luminance(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Background and foreground RGB in [0, 1] whose luminance differs by at least 0.3 (visible in grey too)."""
    background = rng.uniform(0.0, 1.0, 3)
    for _ in range(64):
        foreground = rng.uniform(0.0, 1.0, 3)
        if abs(_luminance(foreground) - _luminance(background)) >= 0.3:
            return background, foreground
    return background, 1.0 - background  # practically unreachable; still deterministic


def _soft(distance: np.ndarray, pixel: float) -> np.ndarray:
    """Coverage from a signed distance (negative inside) with a one-pixel anti-aliased edge."""
    return np.clip(0.5 - distance / pixel, 0.0, 1.0)


def _rotate(x: np.ndarray, y: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = np.cos(angle), np.sin(angle)
    return c * x + s * y, -s * x + c * y


def _centre(rng: np.random.Generator, margin: float) -> tuple[float, float]:
    cx, cy = rng.uniform(margin, 1.0 - margin, 2)
    return float(cx), float(cy)


def _disc(rng, x, y, px):
    r = rng.uniform(0.15, 0.3)
    cx, cy = _centre(rng, r + 0.02)
    return _soft(np.hypot(x - cx, y - cy) - r, px)


def _square(rng, x, y, px):
    half = rng.uniform(0.12, 0.24)
    cx, cy = _centre(rng, half * 1.42 + 0.02)
    u, v = _rotate(x - cx, y - cy, rng.uniform(0.0, np.pi / 2))
    return _soft(np.maximum(np.abs(u), np.abs(v)) - half, px)


def _triangle(rng, x, y, px):
    radius = rng.uniform(0.18, 0.32)  # circumradius; the inradius is half of it
    cx, cy = _centre(rng, radius + 0.02)
    angle = rng.uniform(0.0, 2 * np.pi)
    dist = np.full_like(x, -np.inf)
    for k in range(3):
        a = angle + 2 * np.pi * k / 3
        dist = np.maximum(dist, (x - cx) * np.cos(a) + (y - cy) * np.sin(a) - radius / 2)
    return _soft(dist, px)


def _ring(rng, x, y, px):
    r = rng.uniform(0.18, 0.3)
    half_width = max(rng.uniform(0.025, 0.05), 0.8 * px)
    cx, cy = _centre(rng, r + half_width + 0.02)
    return _soft(np.abs(np.hypot(x - cx, y - cy) - r) - half_width, px)


def _cross(rng, x, y, px):
    arm = rng.uniform(0.18, 0.3)
    half_thick = max(rng.uniform(0.045, 0.08), 0.8 * px)
    cx, cy = _centre(rng, arm * 1.42 + 0.02)
    u, v = _rotate(x - cx, y - cy, rng.uniform(-0.35, 0.35))
    bar_h = np.maximum(np.abs(u) - arm, np.abs(v) - half_thick)
    bar_v = np.maximum(np.abs(u) - half_thick, np.abs(v) - arm)
    return _soft(np.minimum(bar_h, bar_v), px)


def _grating(rng, coord, px):
    """Square-ish wave along `coord` with a period of at least 4 px."""
    period = max(rng.uniform(0.14, 0.3), 4 * px)
    phase = rng.uniform(0.0, 2 * np.pi)
    return np.sin(2 * np.pi * coord / period + phase)


def _stripes(rng, x, y, px, *, vertical: bool):
    u, v = _rotate(x - 0.5, y - 0.5, rng.uniform(-0.25, 0.25))
    wave = _grating(rng, u if vertical else v, px)
    return np.clip(0.5 + 2.0 * wave, 0.0, 1.0)


def _checkerboard(rng, x, y, px):
    u, v = _rotate(x - 0.5, y - 0.5, rng.uniform(-0.25, 0.25))
    period = max(rng.uniform(0.18, 0.34), 4 * px)
    phase_u, phase_v = rng.uniform(0.0, 2 * np.pi, 2)
    wave = np.sin(2 * np.pi * u / period + phase_u) * np.sin(2 * np.pi * v / period + phase_v)
    return np.clip(0.5 + 3.0 * wave, 0.0, 1.0)


def _gradient(rng, x, y, px):
    angle = rng.uniform(0.0, 2 * np.pi)
    centre = rng.uniform(0.35, 0.65)
    span = rng.uniform(0.25, 0.6)
    t = (x - 0.5) * np.cos(angle) + (y - 0.5) * np.sin(angle) + 0.5
    return np.clip((t - centre) / span + 0.5, 0.0, 1.0)


def _dots(rng, x, y, px):
    count = int(rng.integers(6, 13))
    cover = np.zeros_like(x)
    for _ in range(count):
        r = max(rng.uniform(0.035, 0.06), 1.2 * px)
        cx, cy = _centre(rng, r + 0.01)
        cover = np.maximum(cover, _soft(np.hypot(x - cx, y - cy) - r, px))
    return cover


_RENDERERS = (
    _disc,
    _square,
    _triangle,
    _ring,
    _cross,
    lambda rng, x, y, px: _stripes(rng, x, y, px, vertical=False),
    lambda rng, x, y, px: _stripes(rng, x, y, px, vertical=True),
    _checkerboard,
    _gradient,
    _dots,
)


def synthetic_sample(
    index: int, *, seed: int = 0, img_size: int = 32, num_classes: int = 10, split: str = "train"
) -> tuple[Image.Image, int]:
    """Sample `index` of the synthetic data set: (RGB PIL image of img_size x img_size, label in [0, num_classes)).

    Deterministic in (seed, split, index) alone; label = index % num_classes.
    """
    check_synthetic_args(seed=seed, img_size=img_size, num_classes=num_classes, split=split)
    if index < 0:
        raise ValueError(f"sample index must be >= 0, got {index}")
    label = index % num_classes
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    background, foreground = _colours(rng)

    pixel = 1.0 / img_size
    coords = (np.arange(img_size) + 0.5) * pixel
    x, y = np.meshgrid(coords, coords)  # (H, W) each; x grows to the right, y downwards
    cover = _RENDERERS[label](rng, x, y, pixel)  # (H, W) in [0, 1]

    # A faint linear shading of the whole image so that flat areas are not a giveaway.
    shade_angle = rng.uniform(0.0, 2 * np.pi)
    shade = rng.uniform(-0.08, 0.08) * ((x - 0.5) * np.cos(shade_angle) + (y - 0.5) * np.sin(shade_angle))

    image = background * (1.0 - cover[..., None]) + foreground * cover[..., None]  # (H, W, 3)
    image = image + shade[..., None] + rng.normal(0.0, NOISE_STD, image.shape)
    pixels = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels), label


def synthetic_samples(
    num_samples: int, *, seed: int = 0, img_size: int = 32, num_classes: int = 10, split: str = "train"
):
    """Yield `(key, image, label)` for indices 0..num_samples-1 (the form `write_shards` takes); key = 8-digit index."""
    check_synthetic_args(seed=seed, img_size=img_size, num_classes=num_classes, split=split)
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError(f"num_samples must be a positive integer, got {num_samples!r}.")
    for index in range(num_samples):
        image, label = synthetic_sample(index, seed=seed, img_size=img_size, num_classes=num_classes, split=split)
        yield f"{index:08d}", image, label
