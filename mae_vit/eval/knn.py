"""Weighted k-nearest-neighbour classification of frozen features (the InstDisc / DINO kNN protocol).

Each test feature votes with its k most cosine-similar training features; a neighbour with similarity
s adds exp(s / T) to its class's score. It needs no training, so it is a quick, hyper-parameter-light
read-out of how linearly-clustered a pretrained encoder's features are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mae_vit.errors import DataError
from mae_vit.eval.metrics import check_label_range


@torch.no_grad()
def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Score every test feature for every class by a similarity-weighted vote of its k nearest train features.

    Features are L2-normalised, so the dot product is the cosine similarity. For a test row q with
    neighbours j (the min(k, N) train rows of highest similarity s_qj), score[q, c] = sum over neighbours
    of class c of exp(s_qj / temperature). Test rows are processed `chunk` at a time, so the similarity
    matrix held in memory is at most (chunk, N).

    Args:
        train_feats: (N, D) training features. train_labels: (N,) class indices in [0, num_classes).
        test_feats: (M, D) features to classify.
    Returns:
        (M, num_classes) float32 scores on the device of `test_feats`; argmax is the prediction.
    """
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(
            f"features must be (N, D) and (M, D) with the same D, got {tuple(train_feats.shape)} and "
            f"{tuple(test_feats.shape)}"
        )
    if train_labels.shape != train_feats.shape[:1]:
        raise ValueError(f"train_labels must have shape ({train_feats.shape[0]},), got {tuple(train_labels.shape)}")
    if train_feats.shape[0] == 0:
        raise DataError("kNN evaluation got no training features; the training split used for kNN is empty.")
    if k < 1 or temperature <= 0 or chunk < 1:
        raise ValueError(f"need k >= 1, temperature > 0, chunk >= 1; got k={k}, T={temperature}, chunk={chunk}")
    check_label_range(train_labels, num_classes, "kNN training")

    device = test_feats.device
    train = F.normalize(train_feats.to(device, torch.float32), dim=1)  # (N, D)
    labels = train_labels.to(device, torch.long)
    k = min(k, train.shape[0])
    scores = torch.zeros(test_feats.shape[0], num_classes, dtype=torch.float32, device=device)  # (M, K)
    for start in range(0, test_feats.shape[0], chunk):
        query = F.normalize(test_feats[start : start + chunk].to(torch.float32), dim=1)  # (c, D)
        sim, idx = (query @ train.T).topk(k, dim=1)  # (c, k) each
        weights = (sim / temperature).exp()  # (c, k)
        scores[start : start + chunk].scatter_add_(1, labels[idx], weights)
    return scores


def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, **options) -> float:
    """Top-1 accuracy (%) of `knn_classify` (`options`: num_classes, k, temperature, chunk) on labelled test
    features; ties go to the lower class index."""
    if test_labels.shape != test_feats.shape[:1]:
        raise ValueError(f"test_labels must have shape ({test_feats.shape[0]},), got {tuple(test_labels.shape)}")
    if test_feats.shape[0] == 0:
        raise DataError("kNN evaluation got no test features; the evaluation split is empty.")
    check_label_range(test_labels, options["num_classes"], "kNN test")
    scores = knn_classify(train_feats, train_labels, test_feats, **options)
    pred = scores.argmax(dim=1)
    return 100.0 * float((pred == test_labels.to(pred.device)).float().mean().item())
