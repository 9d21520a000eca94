"""Where the encoder attends: mean attention distance per head (ViT paper, fig. 7 right) and class-token maps.

The distance computation is a pure function of the attention weights and the patch grid, so it can be
checked on hand-made attention patterns without a model.
"""

from __future__ import annotations

import torch

from mae_vit.viz.embeddings import grid_distances


def _patch_part(attn: torch.Tensor, num_patches: int) -> torch.Tensor:
    """(..., T, T) attention -> (..., N, N) patch-to-patch part, T = N (no prefix) or N + 1 (class token first)."""
    t = attn.shape[-1]
    if t == num_patches + 1:
        return attn[..., 1:, 1:]
    if t == num_patches:
        return attn
    raise ValueError(f"attention over {t} tokens does not fit a grid of {num_patches} patches (+1 class token)")


def attention_distance(attn: torch.Tensor, grid_size: tuple[int, int], patch_size: int) -> torch.Tensor:
    """Mean attention distance in pixels of each head: attn (B, heads, T, T) -> (heads,).

    Exactly: keep the patch-token rows and columns (drop the class token if T = N + 1), renormalise
    each query's weights to sum to 1 over the patch keys, and take for every query patch q the
    expected distance sum_j a(q -> j) * ||c_q - c_j||, where c is the patch centre in pixels (grid
    cell distance times `patch_size`). Average over the B images and the N query patches.
    Attention entirely on itself gives 0; uniform attention gives the grid's mean pairwise distance.
    """
    n = grid_size[0] * grid_size[1]
    a = _patch_part(attn.detach().double().cpu(), n)  # (B, heads, N, N)
    a = a / a.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    dist = grid_distances(grid_size) * patch_size  # (N, N) pixels
    per_query = (a * dist).sum(dim=-1)  # (B, heads, N)
    return per_query.mean(dim=(0, 2)).float()


@torch.no_grad()
def _attention_maps(model, imgs: torch.Tensor) -> list[torch.Tensor]:
    """Softmax attention of every encoder block, each (B, heads, 1 + N, 1 + N), model run in eval mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        _, maps = model.forward_features(imgs.to(device), return_attention=True)
    finally:
        model.train(was_training)
    return [m.float().cpu() for m in maps]


def mean_attention_distance(model, imgs: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Mean attention distance (pixels) of every head of every block on `imgs`: (depth, heads).

    See `attention_distance` for the exact definition; every image counts equally. Images go through
    the model `batch_size` at a time, since all blocks' attention maps of a batch are held at once.
    Low values = local attention (like a convolution), high values = global; the ViT paper finds
    both in early layers and mostly global ones later.
    """
    grid, p = model.patch_embed.grid_size, model.patch_embed.patch_size
    total = None
    for start in range(0, imgs.shape[0], batch_size):
        chunk = imgs[start : start + batch_size]
        per_block = torch.stack([attention_distance(a, grid, p) for a in _attention_maps(model, chunk)])
        weighted = per_block.double() * chunk.shape[0]  # (depth, heads), summed over the chunk's images
        total = weighted if total is None else total + weighted
    if total is None:
        raise ValueError("mean_attention_distance needs at least one image")
    return (total / imgs.shape[0]).float()


def cls_attention_maps(model, imgs: torch.Tensor) -> torch.Tensor:
    """Attention of the class token to the patches in the last block, averaged over heads: (B, gh, gw).

    Each map is renormalised to sum to 1 over the patches (the class token's attention to itself is
    left out).
    """
    gh, gw = model.patch_embed.grid_size
    last = _attention_maps(model, imgs)[-1]  # (B, heads, 1 + N, 1 + N)
    if last.shape[-1] != gh * gw + 1:
        raise ValueError("the model has no class token in front of its patch tokens")
    a = last[:, :, 0, 1:].mean(dim=1)  # (B, N)
    a = a / a.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return a.reshape(-1, gh, gw)
