"""FLOPs of the MAE train step, counted by torch (`torch.utils.flop_counter.FlopCounterMode`).

FLOPs come from `torch.utils.flop_counter.FlopCounterMode` over one forward + backward step of the
eager model. It counts only matrix multiplies, convolutions and scaled-dot-product attention, the
operations that dominate a ViT; element-wise ops, norms, softmax, the loss and the optimizer count
zero. One multiply-add is 2 FLOPs. The fused attention kernels recompute Q K^T in backward and torch
counts that recomputation (5 batched matmuls in backward against 2 in forward). torch's table has no
entry for the CPU flash-attention op, so one is added here with the same formula, which makes the
count identical on CPU and GPU.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Tuple

import torch
from torch.utils.flop_counter import FlopCounterMode

from mae_vit.layers import attention
from mae_vit.models import MaskedAutoencoderViT

FLOP_NOTE = "FlopCounterMode: matmul/conv/sdpa only, forward+backward, 1 multiply-add = 2 FLOPs"


def _attention_flops(q_shape, k_shape, v_shape) -> Tuple[int, int]:
    """(forward, backward) FLOPs of softmax(Q K^T) V with q (B, H, Sq, D), k (B, H, Sk, D), v (B, H, Sk, Dv).

    Forward: S = Q K^T and P V. Backward (flash style): S again, dQ = dS K and dK = dS^T Q (each the
    size of Q K^T), dP = dO V^T and dV = P^T dO (each the size of P V). The same formulas torch uses
    for its CUDA attention kernels.
    """
    b, h, sq, d = q_shape
    sk, dv = k_shape[-2], v_shape[-1]
    qk, pv = 2 * b * h * sq * sk * d, 2 * b * h * sq * sk * dv
    return qk + pv, 3 * qk + 2 * pv


def _cpu_attention_forward(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    return _attention_flops(q_shape, k_shape, v_shape)[0]


def _cpu_attention_backward(grad_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    return _attention_flops(q_shape, k_shape, v_shape)[1]


_CPU_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_forward,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward,
}


def flop_counter() -> FlopCounterMode:
    """A silent FlopCounterMode that also counts the CPU flash-attention kernel."""
    return FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION)


def count_flops(
    model: MaskedAutoencoderViT,
    imgs: torch.Tensor,
    mask_ratio: float,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
) -> Tuple[int, int, int]:
    """FLOPs of the whole batch: (train step forward + backward, forward, encoder forward).

    Runs one counted forward + backward (gradients are cleared afterwards, weights are not changed)
    and two counted no-grad forwards. The number of kept patches is fixed by mask_ratio, so the
    counts do not depend on the random mask. Attention is counted as the fused kernel's, also where a CPU
    under bf16 runs the explicit path (`layers/attention.py`), so the count does not depend on the path.
    """
    saved, attention.EXPLICIT_ON_CPU_BF16 = attention.EXPLICIT_ON_CPU_BF16, False
    try:
        return _count(model, imgs, mask_ratio, autocast)
    finally:
        attention.EXPLICIT_ON_CPU_BF16 = saved


def _count(model, imgs, mask_ratio, autocast) -> Tuple[int, int, int]:
    with flop_counter() as counter:
        with autocast():
            loss = model(imgs, mask_ratio=mask_ratio)[0]
        loss.backward()
    model.zero_grad(set_to_none=True)
    train = counter.get_total_flops()
    with torch.no_grad(), autocast():
        with flop_counter() as counter:
            model(imgs, mask_ratio=mask_ratio)
        forward = counter.get_total_flops()
        with flop_counter() as counter:
            model.forward_encoder(imgs, mask_ratio)
        encoder = counter.get_total_flops()
    return train, forward, encoder
