"""The ViT encoder shared by the MAE and the classifier (ViT paper, section 3.1).

image (B, C, H, W) -> patch tokens (B, N, D) -> + position embeddings -> prepend class token
-> depth x pre-norm Transformer block -> final LayerNorm -> (B, 1 + N, D)

Parameter names equal the official MAE / timm ones (`cls_token`, `pos_embed`, `patch_embed.proj`,
`blocks.i.*`, `norm`), so their checkpoints load without renaming.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mae_vit.layers import LN_EPS, Block, PatchEmbed, sincos_2d
from mae_vit.models.hybrid import HybridEmbed

SIZES = {  # name: (width D, depth, heads), ViT paper table 1 + DeiT's tiny/small + our CPU demo's mini
    "mini": (128, 6, 4),
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}


class VisionTransformer(nn.Module):
    """The encoder. `pos_embed="sincos"`: fixed 2-D table, not trained; `"learned"`: 1-D learnable.

    `hybrid=("r50", 3)` replaces the patch projection by the first 3 stages of a ResNet-50.
    `final_norm=False` leaves out `norm` (the classifier with global pooling uses `fc_norm` instead).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        pos_embed: str = "sincos",
        drop_path_rate: float = 0.0,
        hybrid: tuple[str, int] | None = None,
        final_norm: bool = True,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        if pos_embed not in ("sincos", "learned"):
            raise ValueError(f"pos_embed must be 'sincos' or 'learned', got {pos_embed!r}")
        self.embed_dim = embed_dim
        self.in_chans = in_chans
        self.pos_embed_type = pos_embed
        self.grad_checkpointing = grad_checkpointing
        if hybrid is None:
            self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        else:
            self.patch_embed = HybridEmbed(img_size, in_chans, embed_dim, backbone=hybrid[0], stages=hybrid[1])
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=pos_embed == "learned")
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # grows linearly with depth
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, rates[i]) for i in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS) if final_norm else nn.Identity()

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.patch_embed.grid_size

    def no_weight_decay(self) -> set[str]:
        """Parameters kept out of weight decay besides the 1-D ones (biases, norm weights): tokens and tables."""
        return {"cls_token", "pos_embed"}

    def layer_of(self, name: str) -> int:
        """Depth of parameter `name` for layer-wise lr decay (fine-tuning): 0 for the embeddings, i + 1 for
        blocks.i, len(blocks) + 1 for everything above them (final norm, head, an MAE's decoder)."""
        if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return len(self.blocks) + 1

    def init_weights(self) -> None:
        """The official MAE initialisation (also used for the classifier built from scratch)."""
        if self.pos_embed_type == "sincos":
            self.pos_embed.data.copy_(sincos_2d(self.embed_dim, self.grid_size)[None])
        else:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        w = self.patch_embed.proj.weight.data  # a Linear on flattened patches: xavier on (D, C*P*P)
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        self.apply(_init_linear_and_norm)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, D) patch tokens plus their position embeddings (no class token)."""
        return self.patch_embed(x) + self.pos_embed[:, 1:]

    def prepend_cls(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n, D) -> (B, 1 + n, D): the class token (with its position embedding) goes first."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def run_blocks(self, x: torch.Tensor, blocks: nn.ModuleList | None = None) -> torch.Tensor:
        """The Transformer `blocks` (the encoder's by default), with activation checkpointing when enabled and
        training."""
        for blk in self.blocks if blocks is None else blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def forward_features(self, x: torch.Tensor, return_attention: bool = False):
        """Encode the whole image: (B, C, H, W) -> (B, 1 + N, D), after the final norm.

        With `return_attention`, also the softmax attention of every block: a list of
        (B, heads, 1 + N, 1 + N) tensors (computed eagerly, for analysis).
        """
        x = self.prepend_cls(self.embed(x))  # (B, 1 + N, D)
        if not return_attention:
            return self.norm(self.run_blocks(x))
        maps = []
        for blk in self.blocks:
            x, attn = blk.forward_with_attention(x)
            maps.append(attn)
        return self.norm(x), maps


def _init_linear_and_norm(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
