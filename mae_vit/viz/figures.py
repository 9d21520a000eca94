"""Figures of what a ViT learned (ViT paper fig. 7, class-token attention, MAE reconstructions) plus their numbers.

`write_all_figures(model, imgs, out_dir, ...)` writes, for any ViT of the toolkit (MAE or classifier):
  patch_embedding.png      top principal components of the patch-projection filters (not for hybrids)
  position_similarity.png  cosine similarity of each position embedding to all others
  attention_distance.png   mean attention distance of every head against depth
  cls_attention.png        last-block class-token attention over a few images
  reconstructions.png      MAE reconstructions at several mask ratios (MAE models only)
  summary.json             the numbers behind the figures
Figures are drawn with matplotlib's object API (no pyplot, no global backend state) and saved as PNG.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from mae_vit.errors import ConfigError
from mae_vit.files import write_json
from mae_vit.viz.attention import cls_attention_maps, mean_attention_distance
from mae_vit.viz.embeddings import (
    has_pixel_patch_embedding,
    patch_embedding_components,
    position_embedding_similarity,
    position_similarity_stats,
)
from mae_vit.viz.io import save_figure
from mae_vit.viz.reconstruction import reconstruction_caption, reconstruction_grid, to_display

FILES = {
    "patch_embedding": "patch_embedding.png",
    "position_similarity": "position_similarity.png",
    "attention_distance": "attention_distance.png",
    "cls_attention": "cls_attention.png",
    "reconstructions": "reconstructions.png",
    "summary": "summary.json",
}


def _hwc(img: torch.Tensor):
    """(3, H, W) tensor -> (H, W, 3) numpy array for imshow."""
    return img.permute(1, 2, 0).numpy()


def plot_patch_embedding(components: torch.Tensor, explained: torch.Tensor, path: str | os.PathLike) -> Path:
    """Draw components (n, C, P, P) as small images, each min-max scaled on its own, in rows of 7."""
    n, c = components.shape[:2]
    cols = min(7, n)
    rows = -(-n // cols)
    fig = Figure(figsize=(1.2 * cols, 1.35 * rows + 0.6))
    fig.suptitle("Patch-embedding filters: principal components (each scaled to its own range)", fontsize=9)
    for i in range(n):
        comp = components[i]  # (C, P, P)
        comp = (comp - comp.min()) / (comp.max() - comp.min()).clamp_min(1e-12)
        ax = fig.add_subplot(rows, cols, i + 1)
        if c == 3:
            ax.imshow(_hwc(comp), interpolation="nearest")
        else:  # grey input (or another channel count): show the channel mean
            ax.imshow(comp.mean(dim=0).numpy(), cmap="gray", interpolation="nearest")
        ax.set_title(f"PC{i + 1} {100 * float(explained[i]):.1f}%", fontsize=6)
        ax.set_axis_off()
    return save_figure(fig, path)


def plot_position_similarity(sim: torch.Tensor, path: str | os.PathLike) -> Path:
    """Draw the (gh, gw, gh, gw) similarity as a gh x gw mosaic of gh x gw maps (one per input patch)."""
    gh, gw = sim.shape[:2]
    mosaic = torch.full((gh * (gh + 1) - 1, gw * (gw + 1) - 1), float("nan"))  # 1-cell gaps between maps
    for i in range(gh):
        for j in range(gw):
            mosaic[i * (gh + 1) : i * (gh + 1) + gh, j * (gw + 1) : j * (gw + 1) + gw] = sim[i, j]
    fig = Figure(figsize=(6, 5.2))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(mosaic.numpy(), cmap="viridis", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_title("Position embedding similarity", fontsize=10)
    ax.set_xlabel("input patch column")
    ax.set_ylabel("input patch row")
    ax.set_xticks([j * (gw + 1) + (gw - 1) / 2 for j in range(gw)], [str(j + 1) for j in range(gw)], fontsize=6)
    ax.set_yticks([i * (gh + 1) + (gh - 1) / 2 for i in range(gh)], [str(i + 1) for i in range(gh)], fontsize=6)
    fig.colorbar(im, ax=ax, label="cosine similarity")
    return save_figure(fig, path)


def plot_attention_distance(dist: torch.Tensor, path: str | os.PathLike) -> Path:
    """Scatter the (depth, heads) mean attention distances: one dot per head, block index on x."""
    depth, heads = dist.shape
    fig = Figure(figsize=(5, 4))
    ax = fig.add_subplot(1, 1, 1)
    for h in range(heads):
        ax.scatter(range(1, depth + 1), dist[:, h].numpy(), s=14, label=f"head {h + 1}")
    ax.set_xlabel("network depth (block)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_title("Mean attention distance per head", fontsize=10)
    ax.set_xticks(range(1, depth + 1))
    ax.set_ylim(bottom=0)
    if heads <= 16:
        ax.legend(fontsize=6, ncol=2)
    return save_figure(fig, path)


def plot_cls_attention(display: torch.Tensor, maps: torch.Tensor, path: str | os.PathLike) -> Path:
    """Images (B, 3, H, W) in [0, 1] above the same images overlaid with their (B, gh, gw) attention maps."""
    b, _, h, w = display.shape
    up = F.interpolate(maps.unsqueeze(1), size=(h, w), mode="bilinear", align_corners=False)[:, 0]  # (B, H, W)
    fig = Figure(figsize=(1.8 * b, 3.9))
    fig.suptitle("Class-token attention, last block (mean over heads)", fontsize=9)
    for i in range(b):
        ax = fig.add_subplot(2, b, i + 1)
        ax.imshow(_hwc(display[i]))
        ax.set_axis_off()
        ax = fig.add_subplot(2, b, b + i + 1)
        ax.imshow(_hwc(display[i]))
        ax.imshow(up[i].numpy(), cmap="inferno", alpha=0.6)
        ax.set_axis_off()
    return save_figure(fig, path)


def plot_reconstructions(grids: Sequence[torch.Tensor], ratios: Sequence[float], caption: str, path) -> Path:
    """Stack reconstruction grids (3, H', W'), one per mask ratio, each titled with its ratio."""
    inch_per_px = min(1 / 40, 12 / grids[0].shape[2])  # small images enlarged, wide grids capped at 12 in
    height = 0.6 + sum(g.shape[1] * inch_per_px + 0.35 for g in grids)
    fig = Figure(figsize=(max(5.0, grids[0].shape[2] * inch_per_px), height))
    fig.suptitle(caption, fontsize=8)
    for i, (grid, ratio) in enumerate(zip(grids, ratios)):
        ax = fig.add_subplot(len(grids), 1, i + 1)
        ax.imshow(_hwc(grid), interpolation="nearest")
        ax.set_title(f"mask ratio {ratio:g}", fontsize=8)
        ax.set_axis_off()
    return save_figure(fig, path)


def _is_mae(model) -> bool:
    return all(hasattr(model, a) for a in ("patchify", "unpatchify", "forward_decoder", "norm_pix_loss"))


@torch.no_grad()
def write_all_figures(
    model,
    imgs: torch.Tensor,
    out_dir: str | os.PathLike,
    *,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    mask_ratios: Sequence[float] = (0.5, 0.75, 0.9),
    max_images: int = 8,
    seed: int = 0,
) -> dict:
    """Write every figure of this module for `model` into `out_dir` and return (and save) the summary dict.

    `imgs` (B, C, H, W) are normalised model inputs (mean/std as in the data pipeline, used to
    un-normalise for display). All of them feed the attention-distance average; the first
    `max_images` are drawn. Reconstructions use one mask noise (seeded by `seed`) for every ratio, so
    a higher ratio removes a superset of the patches of a lower one. Existing files of the same names
    in `out_dir` are replaced (each atomically); nothing else there is touched.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"the figure output path {str(out)!r} exists and is not a folder; choose a folder path.")
    out.mkdir(parents=True, exist_ok=True)
    shown = imgs[:max_images]
    gh, gw = model.patch_embed.grid_size
    summary: dict = {
        "model": type(model).__name__,
        "patch_size": int(model.patch_embed.patch_size),
        "grid_size": [int(gh), int(gw)],
        "depth": len(model.blocks),
        "num_heads": int(model.blocks[0].attn.num_heads),
        "num_images": int(imgs.shape[0]),
        "files": [],
        "skipped": {},
    }

    if has_pixel_patch_embedding(model):
        comps, explained = patch_embedding_components(model, n=28)
        plot_patch_embedding(comps, explained, out / FILES["patch_embedding"])
        summary["files"].append(FILES["patch_embedding"])
        summary["patch_embedding"] = {"explained_variance_ratio": [float(v) for v in explained]}
    else:
        summary["skipped"]["patch_embedding"] = "hybrid model: tokens come from a CNN, not a pixel-patch projection"

    sim = position_embedding_similarity(model)
    plot_position_similarity(sim, out / FILES["position_similarity"])
    summary["files"].append(FILES["position_similarity"])
    summary["position_embedding"] = {"type": getattr(model, "pos_embed_type", "unknown"),
                                     **position_similarity_stats(sim)}

    dist = mean_attention_distance(model, imgs)  # (depth, heads)
    plot_attention_distance(dist, out / FILES["attention_distance"])
    summary["files"].append(FILES["attention_distance"])
    summary["attention_distance"] = {
        "unit": "pixels",
        "per_head": [[float(v) for v in row] for row in dist],
        "per_block_mean": [float(v) for v in dist.mean(dim=1)],
    }

    maps = cls_attention_maps(model, shown)  # (b, gh, gw)
    plot_cls_attention(to_display(shown, mean, std), maps, out / FILES["cls_attention"])
    summary["files"].append(FILES["cls_attention"])
    summary["cls_attention"] = {
        "mean_max_weight": float(maps.flatten(1).max(dim=1).values.mean()),
        "uniform_weight": 1.0 / (gh * gw),
    }

    if _is_mae(model):
        summary["reconstruction"] = _write_reconstructions(model, shown, out / FILES["reconstructions"], mean=mean,
                                                           std=std, mask_ratios=mask_ratios, seed=seed)
        summary["files"].append(FILES["reconstructions"])
    else:
        summary["skipped"]["reconstructions"] = "not a masked autoencoder"

    summary["files"].append(FILES["summary"])
    write_json(out / FILES["summary"], summary)
    return summary


def _write_reconstructions(model, shown: torch.Tensor, path: Path, *, mean, std, mask_ratios, seed: int) -> dict:
    """Draw the MAE's reconstructions of `shown` at each mask ratio, all from one mask noise (seeded by `seed`);
    return the summary's entry, with the loss at each ratio (None where not finite)."""
    gh, gw = model.patch_embed.grid_size
    noise = torch.rand(shown.shape[0], gh * gw, generator=torch.Generator().manual_seed(seed))
    grids, losses = [], []
    device = next(model.parameters()).device
    for ratio in mask_ratios:
        grids.append(reconstruction_grid(model, shown, mask_ratio=ratio, mean=mean, std=std, noise=noise))
        was_training = model.training
        model.eval()
        try:
            loss, _, _ = model(shown.to(device), mask_ratio=ratio, noise=noise.to(device))
        finally:
            model.train(was_training)
        losses.append(float(loss) if math.isfinite(float(loss)) else None)  # JSON has no NaN
    caption = reconstruction_caption(model)
    plot_reconstructions(grids, list(mask_ratios), caption, path)
    return {
        "mask_ratios": [float(r) for r in mask_ratios],
        "loss": losses,
        "norm_pix_loss": bool(model.norm_pix_loss),
        "caption": caption,
    }
