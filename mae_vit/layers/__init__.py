"""Building blocks of the ViT: patch embedding, position embeddings, attention, MLP, block."""

from mae_vit.layers.attention import Attention
from mae_vit.layers.block import LN_EPS, Block, DropPath, drop_path
from mae_vit.layers.mlp import Mlp
from mae_vit.layers.patch_embed import PatchEmbed, to_2tuple
from mae_vit.layers.pos_embed import infer_grid, resize_pos_embed, sincos_1d, sincos_2d

__all__ = [
    "Attention", "Block", "DropPath", "LN_EPS", "Mlp", "PatchEmbed", "drop_path", "infer_grid",
    "resize_pos_embed", "sincos_1d", "sincos_2d", "to_2tuple",
]
