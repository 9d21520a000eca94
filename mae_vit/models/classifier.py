"""ViT classifier for fine-tuning and linear probing: the encoder plus a zero-initialised D x K head.

Pooling (as the official MAE fine-tuning model and timm's `global_pool`):
- `global_pool=True` (default): mean of the patch tokens, then its own LayerNorm `fc_norm`; the
  encoder has no final `norm`.
- `global_pool=False`: the class token after the final `norm`.
`probe_bn=True` puts a BatchNorm without affine parameters (eps 1e-6) before the head, as the
official linear probe does; the head is then `head.1` (and the BatchNorm `head.0`).
"""

from __future__ import annotations

import torch
from torch import nn

from mae_vit.layers import LN_EPS
from mae_vit.models.vit import VisionTransformer


class ViTClassifier(VisionTransformer):
    def __init__(self, *, num_classes: int = 1000, global_pool: bool = True, probe_bn: bool = False, **encoder_kwargs):
        super().__init__(final_norm=not global_pool, **encoder_kwargs)
        self.global_pool = global_pool
        self.num_classes = num_classes
        self.fc_norm = nn.LayerNorm(self.embed_dim, eps=LN_EPS) if global_pool else nn.Identity()
        self.init_weights()
        linear = nn.Linear(self.embed_dim, num_classes)
        nn.init.zeros_(linear.weight)  # the ViT paper: a new task's head starts at zero
        nn.init.zeros_(linear.bias)
        if probe_bn:
            self.head = nn.Sequential(nn.BatchNorm1d(self.embed_dim, affine=False, eps=1e-6), linear)
        else:
            self.head = linear
        if self.pos_embed_type == "sincos":
            self.pos_embed.requires_grad_(True)  # fixed in pretraining, trained when fine-tuning

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, 1 + N, D) -> (B, D)."""
        if self.global_pool:
            return self.fc_norm(tokens[:, 1:].mean(dim=1))
        return tokens[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> logits (B, K)."""
        return self.head(self.pool(self.forward_features(x)))
