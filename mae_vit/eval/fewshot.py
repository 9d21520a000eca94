"""Few-shot linear evaluation of frozen features (the ViT paper's closed-form few-shot protocol).

For each shot count s and each of `draws` random draws, s training examples per class are picked; a
ridge regression from features to {-1, +1} one-hot targets is solved in closed form; test accuracy is
the argmax of the regression outputs. Closed form means no optimiser hyper-parameters, so the numbers
compare encoders, not training recipes.

Feature preprocessing, per draw and fitted on the drawn few-shot subset only: each feature dimension is
centred on the subset's mean and divided by the subset's (population) standard deviation + 1e-5; the
same transform is applied to the test features. A constant column of ones is then appended as the bias.
The bias is regularised along with the weights (l2 * I on the whole (D+1)-square system); because the
features are centred, this only shrinks the bias by a factor n / (n + l2).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mae_vit.errors import DataError
from mae_vit.eval.metrics import check_label_range

_STD_EPS = 1e-5


def add_bias_column(x: torch.Tensor) -> torch.Tensor:
    """(n, D) -> (n, D+1) with a trailing column of ones."""
    return torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)


def ridge_solve(x: torch.Tensor, y: torch.Tensor, l2: float) -> torch.Tensor:
    """Solve (X^T X + l2 I) W = X^T Y in float64: x (n, F), y (n, K) -> W (F, K)."""
    x = x.to(torch.float64)
    y = y.to(torch.float64)
    gram = x.T @ x + l2 * torch.eye(x.shape[1], dtype=torch.float64, device=x.device)  # (F, F)
    return torch.linalg.solve(gram, x.T @ y)


def signed_one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(n,) class indices -> (n, K) float64 targets: +1 at the true class, -1 elsewhere."""
    return 2.0 * torch.nn.functional.one_hot(labels.long(), num_classes).to(torch.float64) - 1.0


def fit_predict(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    *,
    num_classes: int,
    l2: float,
    chunk: int = 8192,
) -> torch.Tensor:
    """Standardise, add bias, solve the ridge regression on (train_x, train_y); return test predictions (M,).

    Test rows are standardised and scored `chunk` at a time, so a large test set never needs a full
    float64 copy.
    """
    train_x = train_x.to(torch.float64)
    mean = train_x.mean(dim=0, keepdim=True)  # (1, D)
    std = train_x.std(dim=0, unbiased=False, keepdim=True) + _STD_EPS  # (1, D)
    w = ridge_solve(add_bias_column((train_x - mean) / std), signed_one_hot(train_y, num_classes), l2)  # (D+1, K)
    preds = []
    for start in range(0, test_x.shape[0], chunk):
        te = (test_x[start : start + chunk].to(torch.float64) - mean) / std  # (c, D)
        preds.append((add_bias_column(te) @ w).argmax(dim=1))
    return torch.cat(preds)


def sample_per_class(labels: torch.Tensor, shots: int, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of `shots` distinct random examples of each class (class 0's first), drawn with `generator`."""
    picked = []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c, as_tuple=False).flatten()
        picked.append(idx[torch.randperm(idx.numel(), generator=generator)[:shots]])
    return torch.cat(picked)


@torch.no_grad()
def fewshot_linear(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_classes: int,
    shots: Sequence[int] = (1, 5, 10, 25),
    draws: int = 5,
    l2: float = 1e-3,
    seed: int = 0,
) -> dict[int, dict]:
    """Few-shot linear accuracy for each shot count, averaged over random draws of the training examples.

    Args:
        train_feats (N, D), train_labels (N,): the pool the few-shot examples are drawn from.
        test_feats (M, D), test_labels (M,): evaluated in full for every draw.
        shots: examples per class. draws: random draws per shot count. l2: ridge strength.
        seed: the draws of shot count s use a generator seeded with `seed` alone, so a shot count's
            result does not depend on which other shot counts were requested.

    Returns:
        {s: {"mean": %, "std": % (population std over draws), "accs": [% per draw], "note": None}}.
        A shot count larger than the smallest class in the training pool is skipped and reported as
        {"mean": None, "std": None, "accs": [], "note": "<why>"}.
    """
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(
            f"features must be (N, D) and (M, D) with the same D, got {tuple(train_feats.shape)} and "
            f"{tuple(test_feats.shape)}"
        )
    if train_labels.shape != train_feats.shape[:1] or test_labels.shape != test_feats.shape[:1]:
        raise ValueError("labels must have one entry per feature row")
    if draws < 1 or l2 < 0 or any(s < 1 for s in shots):
        raise ValueError(f"need draws >= 1, l2 >= 0, shots >= 1; got draws={draws}, l2={l2}, shots={tuple(shots)}")
    if test_feats.shape[0] == 0:
        raise DataError("Few-shot evaluation got no test features; the evaluation split is empty.")
    check_label_range(train_labels, num_classes, "few-shot training")
    check_label_range(test_labels, num_classes, "few-shot test")

    train_labels = train_labels.cpu().long()
    test_labels = test_labels.cpu().long()
    train_feats = train_feats.cpu()
    test_feats = test_feats.cpu()
    per_class = torch.bincount(train_labels, minlength=num_classes)  # (K,)
    smallest = int(per_class.min())

    results: dict[int, dict] = {}
    for s in shots:
        if s > smallest:
            results[s] = {
                "mean": None,
                "std": None,
                "accs": [],
                "note": (
                    f"skipped: {s} shots per class requested but class {int(per_class.argmin())} has only "
                    f"{smallest} training examples"
                ),
            }
            continue
        gen = torch.Generator().manual_seed(seed)
        accs = []
        for _ in range(draws):
            idx = sample_per_class(train_labels, s, num_classes, gen)  # (s * K,)
            pred = fit_predict(train_feats[idx], train_labels[idx], test_feats, num_classes=num_classes, l2=l2)
            accs.append(100.0 * float((pred == test_labels).double().mean()))
        acc_t = torch.tensor(accs, dtype=torch.float64)
        results[s] = {
            "mean": float(acc_t.mean()),
            "std": float(acc_t.std(unbiased=False)),
            "accs": accs,
            "note": None,
        }
    return results
