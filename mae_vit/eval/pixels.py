"""The raw-pixel baseline: what a classifier gets from the pixels alone, with no encoder at all.

An encoder whose frozen features do no better than this has not learned anything useful yet. Two
classifiers on the flattened, normalised pixels:
- kNN with the same rule as the encoder's (`knn_accuracy`: cosine similarity, k, temperature), so
  "kNN on the encoder" and "kNN on the pixels" differ only in the features;
- multinomial logistic regression (standardised pixels, L2 penalty, full-batch L-BFGS), the
  classical linear baseline (Fashion-MNIST: about 84% in the literature).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mae_vit.eval.knn import knn_accuracy
from mae_vit.eval.metrics import check_label_range


def logistic_regression(train_x: torch.Tensor, train_y: torch.Tensor, *, num_classes: int, l2: float = 1e-4,
                        max_iter: int = 200) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit softmax regression on (N, D) features; returns (weight (D, K), bias (K,), mean (D,), std (D,)).

    The features are standardised with the training mean and std; loss = mean cross-entropy + l2/2 ||W||^2.
    """
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    x = (train_x - mean) / std  # (N, D)
    weight = torch.zeros(x.shape[1], num_classes, requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, train_y) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return weight.detach(), bias.detach(), mean, std


def logistic_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, *,
                      num_classes: int, l2: float = 1e-4, max_iter: int = 200) -> float:
    """Top-1 (%) on the test set of `logistic_regression` fitted on the training set."""
    check_label_range(test_y, num_classes, "logistic regression test")
    weight, bias, mean, std = logistic_regression(train_x, train_y, num_classes=num_classes, l2=l2, max_iter=max_iter)
    pred = (((test_x - mean) / std) @ weight + bias).argmax(1)
    return 100.0 * float((pred == test_y).float().mean())


def pixel_baseline(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, *,
                   num_classes: int, k: int = 20, temperature: float = 0.07) -> dict:
    """{"knn": top-1 %, "logistic": top-1 %} on images (N, C, H, W) or flattened pixels (N, D)."""
    train_x, test_x = train_x.flatten(1).float(), test_x.flatten(1).float()  # (N, C*H*W)
    return {
        "knn": knn_accuracy(train_x, train_y, test_x, test_y, num_classes=num_classes, k=k, temperature=temperature),
        "logistic": logistic_accuracy(train_x, train_y, test_x, test_y, num_classes=num_classes),
    }
