"""Optimizer parameter groups (weight-decay exclusions, layer-wise lr decay) and the LARS optimizer.

Groups follow the official MAE recipes: biases, norm weights and the token / position-embedding
parameters get no weight decay; with layer decay (fine-tuning) each transformer block gets its own
lr scale, shrinking geometrically from the head down to the patch embedding. Which parameters are
tokens and which block a parameter belongs to, the model says (`no_weight_decay()`, `layer_of(name)`).
Every group carries an `lr_scale` that the training loop applies each step: `group["lr"] = lr * group["lr_scale"]`
(`set_lr` does exactly that).
"""

from typing import Dict, Iterable, List, Sequence, Tuple

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, *, layer_decay: float = 1.0) -> List[Dict]:
    """Trainable parameters of `model` split into optimizer groups, from what the model declares.

    No weight decay for 1-D parameters (biases, norm weights) and for the names in
    `model.no_weight_decay()` (tokens, position tables; the timm convention). Frozen parameters
    (requires_grad False) are left out. With layer_decay < 1, parameter `name` gets lr_scale
    layer_decay ** (len(model.blocks) + 1 - model.layer_of(name)). Returns non-empty groups ordered
    by depth, decayed before non-decayed, each {"params": [...], "weight_decay": float, "lr_scale": float}.
    """
    no_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    use_layers = layer_decay != 1.0
    if use_layers and not hasattr(model, "layer_of"):
        raise ValueError("layer decay needs a model that declares layer_of(name) and its blocks (a ViT)")
    num_layers = len(model.blocks) if use_layers else 0
    groups: Dict[Tuple[int, bool], Dict] = {}  # (depth, decayed?) -> group
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decayed = param.ndim > 1 and name not in no_decay
        depth = model.layer_of(name) if use_layers else 0
        scale = layer_decay ** (num_layers + 1 - depth) if use_layers else 1.0
        group = groups.setdefault(
            (depth, decayed), {"params": [], "weight_decay": weight_decay if decayed else 0.0, "lr_scale": scale}
        )
        group["params"].append(param)
    return [groups[key] for key in sorted(groups, key=lambda k: (k[0], not k[1]))]


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to lr * its lr_scale (1.0 for groups without one); a group with a `fixed_lr`
    (the online probe's head) keeps that instead of following the schedule."""
    for group in optimizer.param_groups:
        group["lr"] = group["fixed_lr"] if "fixed_lr" in group else lr * group.get("lr_scale", 1.0)


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling with momentum, as used for MAE linear probing.

    Per parameter with a gradient, for weights (ndim > 1):
        dp = grad + weight_decay * p
        dp = dp * trust_coefficient * ||p|| / ||dp||    (factor 1 when either norm is 0)
    1-D parameters (biases, norms) use dp = grad. Then
        mu = momentum * mu + dp    (mu starts at 0)
        p  = p - lr * mu
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ):
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or trust_coefficient <= 0:
            raise ValueError(
                f"LARS needs lr >= 0, weight_decay >= 0, 0 <= momentum < 1 and trust_coefficient > 0; got "
                f"lr={lr}, weight_decay={weight_decay}, momentum={momentum}, trust_coefficient={trust_coefficient}"
            )
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:
                    dp = dp.add(p, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(dp)
                    ratio = group["trust_coefficient"] * param_norm / update_norm
                    trust = torch.where((param_norm > 0) & (update_norm > 0), ratio, torch.ones_like(ratio))
                    dp = dp.mul(trust)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(dp)
                p.add_(mu, alpha=-group["lr"])
        return loss


def build_optimizer(
    kind: str,
    groups: List[Dict],
    *,
    lr: float,
    betas: Sequence[float] = (0.9, 0.999),
    momentum: float = 0.9,
    fused: bool = False,
) -> torch.optim.Optimizer:
    """AdamW ("adamw", with `betas`; `fused`: torch's fused kernel) or LARS ("lars", with `momentum`) over
    `groups` from param_groups.

    Each group's weight decay comes from the group; its initial lr is lr * lr_scale. The fused AdamW does
    the same arithmetic as the foreach one in one kernel (equal to float rounding; tests/test_optim.py).
    """
    for group in groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(float(betas[0]), float(betas[1])), fused=fused or None)
    if kind == "lars":
        return LARS(groups, lr=lr, momentum=momentum)
    raise ValueError(f"unknown optimizer kind {kind!r}; expected 'adamw' or 'lars'")
