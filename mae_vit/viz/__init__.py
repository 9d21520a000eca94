"""Visualisation: MAE reconstructions and figures of what a ViT learned (filters, positions, attention)."""

from mae_vit.viz.attention import attention_distance, cls_attention_maps, mean_attention_distance
from mae_vit.viz.embeddings import (
    patch_embedding_components,
    position_embedding_similarity,
    position_similarity_stats,
)
from mae_vit.viz.figures import write_all_figures
from mae_vit.viz.io import save_png
from mae_vit.viz.reconstruction import reconstruction_caption, reconstruction_grid, reconstruction_panels

__all__ = [
    "attention_distance",
    "cls_attention_maps",
    "mean_attention_distance",
    "patch_embedding_components",
    "position_embedding_similarity",
    "position_similarity_stats",
    "reconstruction_caption",
    "reconstruction_grid",
    "reconstruction_panels",
    "save_png",
    "write_all_figures",
]
