"""Position embeddings: fixed 2-D sin-cos tables and resizing to another patch grid.

Both follow the official MAE code numerically (see `interpolate_pos_embed` there):
- sin-cos: half the channels encode the patch column (w index), the other half the row (h index);
  each half is `[sin(pos * omega), cos(pos * omega)]`, `omega_k = 1 / 10000 ** (k / (D / 4))`.
  Computed in float64; the class token's row is zeros.
- resize: bicubic, `align_corners=False`, no antialiasing, on the patch grid only; the class
  token's embedding is kept unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """Positions (M,) -> (M, dim): `[sin(pos * omega), cos(pos * omega)]`, float64."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # (dim/2,)
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None, :]  # (M, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (M, dim)


def sincos_2d(dim: int, grid_size: tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """The fixed 2-D table, (gh * gw [+ 1], dim) float32, rows in row-major patch order.

    The first dim/2 channels come from the column index, the last dim/2 from the row index (the
    official code's `meshgrid(w, h)` order); with `cls_token` a zero row is prepended.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {dim}")
    gh, gw = grid_size
    rows = torch.arange(gh, dtype=torch.float64).repeat_interleave(gw)  # (gh*gw,) h index
    cols = torch.arange(gw, dtype=torch.float64).repeat(gh)  # (gh*gw,) w index
    emb = torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)  # (gh*gw, dim)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb], dim=0)
    return emb.float()


def infer_grid(num_patches: int, like: tuple[int, int] | None = None) -> tuple[int, int]:
    """Guess the (gh, gw) grid of a stored table of `num_patches` positions.

    A square grid when `num_patches` is a square; otherwise a grid with the aspect ratio of `like`.
    """
    side = math.isqrt(num_patches)
    if side * side == num_patches:
        return (side, side)
    if like is not None:
        ratio = like[0] / like[1]
        gw = round(math.sqrt(num_patches / ratio))
        if gw > 0 and num_patches % gw == 0 and abs(num_patches // gw / gw - ratio) < 1e-6:
            return (num_patches // gw, gw)
    raise ValueError(
        f"cannot tell the patch grid of a position embedding with {num_patches} positions: "
        "it is not square and has no aspect ratio matching the model's grid"
    )


def resize_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """(1, prefix + old_h*old_w, D) -> (1, prefix + new_h*new_w, D) by 2-D bicubic interpolation.

    The prefix (class token) rows are copied unchanged. Same grid: returned as it is.
    """
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old_grid = tuple(old_grid) if old_grid is not None else infer_grid(grid.shape[1], like=new_grid)
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    dim = grid.shape[-1]
    dtype = grid.dtype
    grid = grid.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2).float()  # (1, D, oh, ow)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False, antialias=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(dtype)  # (1, nh*nw, D)
    return torch.cat([prefix, grid], dim=1)
