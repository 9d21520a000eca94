"""Writing visualisation outputs (PNG images, matplotlib figures, JSON) atomically.

Each file is written to a temporary name in the destination folder and renamed over the target only
when complete, so an interrupted run never leaves a truncated image or a half-written summary behind.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image


def _atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call `write(file)` on a temporary file next to `path`, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def to_uint8_hwc(img: torch.Tensor) -> np.ndarray:
    """(C, H, W) or (H, W) image, float in [0, 1] or uint8 -> (H, W, C) / (H, W) uint8 array."""
    img = img.detach().cpu()
    if img.dtype != torch.uint8:
        img = (img.float().clamp(0, 1) * 255).round().to(torch.uint8)
    if img.ndim == 3:
        img = img.permute(1, 2, 0)  # (H, W, C)
        if img.shape[2] == 1:
            img = img[:, :, 0]
    return img.numpy()


def save_png(img: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write an image tensor ((C, H, W) with C in {1, 3}, or (H, W); float in [0, 1] or uint8) as a PNG."""
    array = to_uint8_hwc(img)
    return _atomic_write(path, lambda f: Image.fromarray(array).save(f, format="PNG"))


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write a matplotlib `Figure` as a PNG."""
    return _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight"))


def _finite_or_none(data):
    """A copy of nested dicts/lists/tuples with every NaN or infinite float replaced by None."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _finite_or_none(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite_or_none(v) for v in data]
    return data


def save_json(data, path: str | os.PathLike) -> Path:
    """Write `data` as indented, strictly valid JSON: NaN and infinite floats (not JSON) are written as null."""
    text = json.dumps(_finite_or_none(data), indent=2, allow_nan=False) + "\n"
    return _atomic_write(path, lambda f: f.write(text.encode("utf-8")))
