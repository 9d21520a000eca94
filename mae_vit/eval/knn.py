"""Weighted k-nearest-neighbour classification of frozen features (the InstDisc / DINO kNN protocol).

Each test feature votes with its k most cosine-similar training features; a neighbour with similarity
s adds exp(s / T) to its class's score. It needs no training, so it is a quick, hyper-parameter-light
read-out of how linearly-clustered a pretrained encoder's features are.

At scale (ImageNet: a 1.28M x 768 bank, 50,000 queries, about 1e14 FLOP) the similarity runs on the
device the features are on, in chunks of at most `MAX_SIM_ELEMENTS` similarities, and with an
accelerator each process scores its own share of the queries, once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mae_vit.errors import DataError
from mae_vit.eval.distributed import sum_across_processes
from mae_vit.eval.metrics import check_label_range

MAX_SIM_ELEMENTS = 2**26  # one chunk's (queries x bank) similarity matrix: 256 MiB in float32


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
    of class c of exp(s_qj / temperature). Test rows are processed at most `chunk` at a time, and fewer
    when the bank is large, so the similarity matrix held in memory is at most MAX_SIM_ELEMENTS.

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
    chunk = max(1, min(chunk, MAX_SIM_ELEMENTS // train.shape[0]))
    scores = torch.zeros(test_feats.shape[0], num_classes, dtype=torch.float32, device=device)  # (M, K)
    for start in range(0, test_feats.shape[0], chunk):
        query = F.normalize(test_feats[start : start + chunk].to(torch.float32), dim=1)  # (c, D)
        sim, idx = (query @ train.T).topk(k, dim=1)  # (c, k) each
        weights = (sim / temperature).exp()  # (c, k)
        scores[start : start + chunk].scatter_add_(1, labels[idx], weights)
    return scores


def query_share(num_queries: int, rank: int, world: int) -> slice:
    """The contiguous rows of the queries that process `rank` of `world` scores: every row exactly once."""
    per = -(-num_queries // world)  # ceil
    return slice(min(rank * per, num_queries), min((rank + 1) * per, num_queries))


def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, accelerator=None, **options) -> float:
    """Top-1 accuracy (%) of `knn_classify` (`options`: num_classes, k, temperature, chunk) on labelled test
    features; ties go to the lower class index.

    With an accelerator (every process holding all features, as `extract_features` returns them) the
    work is split: each process scores its share of the queries on its device, and the correct counts
    are summed across processes, so every process returns the same number.
    """
    if test_labels.shape != test_feats.shape[:1]:
        raise ValueError(f"test_labels must have shape ({test_feats.shape[0]},), got {tuple(test_labels.shape)}")
    if test_feats.shape[0] == 0:
        raise DataError("kNN evaluation got no test features; the evaluation split is empty.")
    check_label_range(test_labels, options["num_classes"], "kNN test")
    rows = slice(None)
    if accelerator is not None:
        test_feats = test_feats.to(accelerator.device)
        rows = query_share(test_feats.shape[0], accelerator.process_index, accelerator.num_processes)
    mine = test_feats[rows]  # (m, D): this process's queries
    correct = 0.0
    if mine.shape[0]:
        pred = knn_classify(train_feats, train_labels, mine, **options).argmax(dim=1)  # (m,)
        correct = float((pred == test_labels[rows].to(pred.device)).sum().item())
    total_correct = sum_across_processes(accelerator, [correct])[0]
    return 100.0 * total_correct / test_feats.shape[0]
