"""What the embeddings learned (ViT paper, fig. 7 left and centre): patch-projection filters and position similarity."""

from __future__ import annotations

import torch


def has_pixel_patch_embedding(model) -> bool:
    """True when `patch_embed.proj` maps raw pixel patches (weight (D, C, P, P)); False for a hybrid's 1x1 conv."""
    w = model.patch_embed.proj.weight
    p = model.patch_embed.patch_size
    return tuple(w.shape[1:]) == (getattr(model, "in_chans", w.shape[1]), p, p)


@torch.no_grad()
def patch_embedding_components(model, n: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """Top principal components of the patch-embedding filters.

    The projection weight (D, C, P, P) is read as D filters, each a point in C*P*P pixel space. The
    filters are centred (mean filter subtracted) and the right singular vectors of the centred (D, C*P*P)
    matrix are the principal directions, ordered by explained variance.

    Returns:
        components (n', C, P, P): orthonormal (as flattened vectors), most important first, with
            n' = min(n, D, C*P*P); each component's sign is fixed so that its largest-magnitude entry
            is positive (PCA leaves the sign free).
        explained (n',): fraction of the total filter variance along each component (non-increasing).
    """
    if not has_pixel_patch_embedding(model):
        raise ValueError("the patch embedding is not a pixel-patch projection (hybrid model); it has no pixel filters")
    w = model.patch_embed.proj.weight.detach().double().cpu()  # (D, C, P, P)
    d, c, p, _ = w.shape
    flat = w.reshape(d, c * p * p)
    flat = flat - flat.mean(dim=0, keepdim=True)  # centre over the D filters
    _, s, vh = torch.linalg.svd(flat, full_matrices=False)  # vh (r, C*P*P), rows orthonormal
    k = min(n, vh.shape[0])
    comps = vh[:k]
    peak = comps.gather(1, comps.abs().argmax(dim=1, keepdim=True))  # (k, 1)
    comps = comps * torch.where(peak < 0, -1.0, 1.0)
    var = s**2
    explained = var[:k] / var.sum().clamp_min(1e-300)
    return comps.reshape(k, c, p, p).float(), explained.float()


@torch.no_grad()
def position_embedding_similarity(model) -> torch.Tensor:
    """Cosine similarity between the position embeddings of every pair of patch positions: (gh, gw, gh, gw).

    `sim[i, j]` is a (gh, gw) map of how similar position (i, j)'s embedding is to each position's.
    The class token's embedding is left out; the diagonal sim[i, j, i, j] is 1.
    """
    gh, gw = model.patch_embed.grid_size
    pos = model.pos_embed.detach().float().cpu()[0, 1:]  # (N, D), patch positions only
    if pos.shape[0] != gh * gw:
        raise ValueError(f"pos_embed has {pos.shape[0]} patch positions but the grid is {gh}x{gw}")
    pos = torch.nn.functional.normalize(pos, dim=1)
    return (pos @ pos.T).reshape(gh, gw, gh, gw)


def grid_distances(grid_size: tuple[int, int]) -> torch.Tensor:
    """Euclidean distances between the cells of a (gh, gw) grid, in cells, row-major order: (N, N)."""
    gh, gw = grid_size
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()], dim=1).double()  # (N, 2)
    return torch.cdist(coords, coords)


def position_similarity_stats(sim: torch.Tensor) -> dict[str, float | None]:
    """Mean cosine similarity of neighbouring vs far-apart positions, from a (gh, gw, gh, gw) similarity.

    "neighbour": pairs of distinct positions sharing an edge (grid distance exactly 1).
    "far": pairs at Euclidean grid distance >= max(2, max(gh, gw) / 2) (never neighbours).
    A learned position embedding that encodes the 2-D layout has neighbour_mean clearly above far_mean.
    None where the grid has no such pair (e.g. a 1x1 grid).
    """
    gh, gw = sim.shape[:2]
    flat = sim.reshape(gh * gw, gh * gw).double()
    dist = grid_distances((gh, gw))

    def mean_where(sel: torch.Tensor) -> float | None:
        return float(flat[sel].mean()) if bool(sel.any()) else None

    return {
        "neighbour_mean": mean_where((dist - 1).abs() < 1e-9),
        "far_mean": mean_where(dist >= max(2.0, max(gh, gw) / 2)),
    }
