"""Building blocks of the ViT: patch embedding, position embeddings, attention, MLP, block."""

from .attention import Attention
from .block import LN_EPS, Block, DropPath, drop_path
from .mlp import Mlp
from .patch_embed import PatchEmbed, to_2tuple
from .pos_embed import infer_grid, resize_pos_embed, sincos_1d, sincos_2d

__all__ = [
    "Attention", "Block", "DropPath", "LN_EPS", "Mlp", "PatchEmbed", "drop_path", "infer_grid",
    "resize_pos_embed", "sincos_1d", "sincos_2d", "to_2tuple",
]
