"""Multi-head self-attention with a fused kernel and an eager fallback.

The fused path is `torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient
kernels where the device has them). The eager path computes the same softmax(QK^T / sqrt(d)) V
explicitly; it is used when the attention weights are wanted (visualisation) and is tested for
parity with the fused one. It is also the faster path on a CPU under bf16 autocast: there torch's CPU
flash kernel spends about three times as long in its backward as the two explicit bf16 matmuls (AMX)
do, so the explicit path is taken (ViT-B MAE train step, 2-core Xeon with AMX: 5.3 vs 3.3 img/s).
`EXPLICIT_ON_CPU_BF16 = False` turns that rule off (the benchmark's ablation does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

EXPLICIT_ON_CPU_BF16 = True


class Attention(nn.Module):
    """(B, T, D) -> (B, T, D). q, k, v come from one fused `qkv` Linear, stacked in that order."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, fused: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused = fused
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        qkv = rearrange(self.qkv(x), "b t (qkv heads d) -> qkv b heads t d", qkv=3, heads=self.num_heads)
        q, k, v = qkv.unbind(0)  # each (B, heads, T, head_dim)
        attn = None
        if self.fused and not return_attention and not _cpu_bf16(x):
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, T, T)
            x = attn @ v
        x = self.proj(rearrange(x, "b heads t d -> b t (heads d)"))  # (B, T, D)
        return (x, attn) if return_attention else x


def _cpu_bf16(x: torch.Tensor) -> bool:
    """True on a CPU under bf16 autocast, where the explicit path is faster (see the module doc)."""
    return (EXPLICIT_ON_CPU_BF16 and x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16)
