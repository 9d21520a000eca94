"""Patch embedding: an image becomes a sequence of patch tokens.

A linear projection of each flattened P x P patch (ViT paper, eq. 1) is the same computation as a
convolution with kernel P and stride P, which is how it is implemented (and how official checkpoints
store it: `patch_embed.proj.weight` of shape (D, C, P, P)).
"""

from __future__ import annotations

import torch
from torch import nn


def to_2tuple(x: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """`16 -> (16, 16)`; a pair is returned as a tuple."""
    if isinstance(x, int):
        return (x, x)
    h, w = x
    return (int(h), int(w))


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, N, D) with N = (H / P) * (W / P), tokens in row-major patch order."""

    def __init__(self, img_size: int | tuple[int, int], patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = int(patch_size)
        h, w = self.img_size
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"image size {h}x{w} is not divisible by the patch size {self.patch_size}; "
                "choose an image size that is a multiple of the patch size"
            )
        self.grid_size = (h // self.patch_size, w // self.patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != self.img_size:
            raise ValueError(f"expected images of size {self.img_size}, got {tuple(x.shape[-2:])}")
        x = self.proj(x)  # (B, D, H/P, W/P)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)
