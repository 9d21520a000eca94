"""Hybrid stem (ViT paper, section 3.1): tokens from a CNN feature map instead of raw patches.

The first `stages` stages of a torchvision ResNet turn the image into a feature map of stride
`2 ** (stages + 1)` (4, 8, 16 for 1, 2, 3 stages); a 1x1 convolution projects each feature-map cell to
the Transformer width D ("patch size 1" on the feature map). The stride plays the role of the patch
size everywhere else (position-embedding grid, MAE pixel targets). No weights are downloaded: the CNN
starts from torchvision's random initialisation.

Note for MAE pretraining: masking happens after the CNN, so the stem sees the whole image; the
encoder still sees only the visible tokens. That leaks some context through the CNN's receptive field,
which is why the MAE paper uses plain patch embedding.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models import resnet

from mae_vit.layers import to_2tuple

RESNETS = {"r18": resnet.resnet18, "r34": resnet.resnet34, "r50": resnet.resnet50}


class HybridEmbed(nn.Module):
    """(B, C, H, W) -> ResNet stages -> (B, F, H/s, W/s) -> 1x1 proj -> (B, N, D)."""

    def __init__(self, img_size, in_chans: int, embed_dim: int, backbone: str = "r50", stages: int = 3):
        super().__init__()
        if backbone not in RESNETS:
            raise ValueError(f"unknown hybrid backbone {backbone!r}; choose one of {sorted(RESNETS)}")
        if not 1 <= stages <= 4:
            raise ValueError(f"hybrid stages must be 1..4, got {stages}")
        net = RESNETS[backbone](weights=None)
        if in_chans != 3:
            net.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        parts = [("conv1", net.conv1), ("bn1", net.bn1), ("relu", net.relu), ("maxpool", net.maxpool)]
        parts += [(f"layer{i}", getattr(net, f"layer{i}")) for i in range(1, stages + 1)]
        self.backbone = nn.Sequential(OrderedDict(parts))
        self.patch_size = 2 ** (stages + 1)  # the stem's stride
        self.img_size = to_2tuple(img_size)
        h, w = self.img_size
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not divisible by the hybrid stride {self.patch_size}")
        self.grid_size = (h // self.patch_size, w // self.patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        last_block = getattr(net, f"layer{stages}")[-1]
        feat_dim = 64 * 2 ** (stages - 1) * type(last_block).expansion  # 64/128/256/512 x (1 or 4)
        self.proj = nn.Conv2d(feat_dim, embed_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.backbone(x))  # (B, D, H/s, W/s)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)
