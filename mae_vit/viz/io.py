"""Writing visualisation outputs (PNG images, matplotlib figures, JSON) atomically.

Each file is written to a temporary name in the destination folder and renamed over the target only
when complete, so an interrupted run never leaves a truncated image or a half-written summary behind.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mae_vit.files import write_atomic


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
    return write_atomic(path, lambda f: Image.fromarray(array).save(f, format="PNG"))


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write a matplotlib `Figure` as a PNG."""
    return write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight"))
