"""A grid of linear probes trained at once on cached features, chosen on a held-out slice of the training set.

The probe's hyper-parameters matter more than anything on small data sets (the paper's lr assumes a
batch of 16384). Here every (lr, weight decay) pair of the grid is a head of the same shape, so all
heads train together as one batched matmul: features (B, D) x weights (G, D, K) -> logits (G, B, K).
The features are standardised with the statistics of the fitting part (as the paper's BatchNorm
without affine parameters does); each head runs SGD with momentum 0.9 and a cosine schedule. A
seeded `holdout` share of the *training* features chooses the head; the test features are used once,
to report the chosen head, and never to choose.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LRS = (0.01, 0.03, 0.1, 0.3, 1.0)
WEIGHT_DECAYS = (0.0, 1e-4, 1e-3)


def probe_sweep(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, *,
                num_classes: int, epochs: int = 30, batch_size: int = 256, holdout: float = 0.1,
                seed: int = 0) -> dict:
    """Train the grid LRS x WEIGHT_DECAYS on (1 - holdout) of the training features; returns every head's
    held-out top-1 (%), the chosen head (best held-out top-1) and its test top-1 (%)."""
    order = torch.randperm(train_x.shape[0], generator=torch.Generator().manual_seed(seed))
    n_held = max(1, int(holdout * train_x.shape[0]))
    held, fit = order[:n_held], order[n_held:]
    mean, std = train_x[fit].mean(0), train_x[fit].std(0) + 1e-6
    norm = lambda x: (x.float() - mean) / std  # noqa: E731  (the fitting part's statistics)
    grid = [(lr, wd) for lr in LRS for wd in WEIGHT_DECAYS]
    lr = torch.tensor([g[0] for g in grid]).view(-1, 1, 1)  # (G, 1, 1)
    wd = torch.tensor([g[1] for g in grid]).view(-1, 1, 1)
    weight = torch.zeros(len(grid), train_x.shape[1], num_classes)  # (G, D, K): every head starts at chance
    bias = torch.zeros(len(grid), 1, num_classes)  # (G, 1, K)
    momentum = [torch.zeros_like(weight), torch.zeros_like(bias)]
    x_fit, y_fit = norm(train_x[fit]), train_y[fit]
    steps = epochs * math.ceil(len(fit) / batch_size)
    gen = torch.Generator().manual_seed(seed + 1)
    step = 0
    for _ in range(epochs):
        for idx in torch.randperm(len(fit), generator=gen).split(batch_size):
            scale = 0.5 * (1 + math.cos(math.pi * step / steps))  # cosine from the head's lr to 0
            weight.requires_grad_(True), bias.requires_grad_(True)
            logits = torch.einsum("bd,gdk->gbk", x_fit[idx], weight) + bias  # (G, B, K)
            loss = F.cross_entropy(logits.flatten(0, 1), y_fit[idx].repeat(len(grid)), reduction="sum") / len(idx)
            grad_w, grad_b = torch.autograd.grad(loss, (weight, bias))  # each head gets its own gradient
            with torch.no_grad():
                weight, bias = weight.detach(), bias.detach()
                for param, grad, buf in ((weight, grad_w + wd * weight, momentum[0]), (bias, grad_b, momentum[1])):
                    buf.mul_(0.9).add_(grad)
                    param.sub_(lr * scale * buf)
            step += 1

    def top1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # (G,) per head, in %
        with torch.no_grad():
            pred = (torch.einsum("bd,gdk->gbk", norm(x), weight) + bias).argmax(-1)  # (G, B)
        return 100.0 * (pred == y).float().mean(1)

    held_top1 = top1(train_x[held], train_y[held])
    best = int(torch.argmax(held_top1))  # chosen on the held-out training slice only
    test_top1 = float(top1(test_x, test_y)[best])
    heads = [{"lr": g[0], "weight_decay": g[1], "heldout_top1": float(a)} for g, a in zip(grid, held_top1)]
    return {"heads": heads, "chosen": heads[best], "test_top1": test_top1, "holdout": n_held, "fit": len(fit),
            "epochs": epochs}
