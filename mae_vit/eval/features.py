"""Run a frozen encoder over a data loader and collect (features, labels) for kNN / few-shot evaluation."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from mae_vit.errors import DataError
from mae_vit.eval.distributed import gather_rows, stop_if_asked


def _split_batch(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) from a batch dict with "image"/"label" (mae_vit loaders) or a sequence (inputs, labels, ...)."""
    if isinstance(batch, dict):
        if "image" in batch and "label" in batch:
            return batch["image"], batch["label"]
        raise ValueError(
            f"a batch dict needs 'image' and 'label' keys, got {sorted(batch)}; build the loader with labels"
        )
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError(f"a batch must be (inputs, labels, ...) or a dict, got {type(batch).__name__}")


@torch.no_grad()
def extract_features(
    model_fn: Callable[[torch.Tensor], torch.Tensor],
    loader: Iterable,
    accelerator=None,
    *,
    device: torch.device | str | None = None,
    on_device: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply `model_fn` to every batch's inputs; return all features (N, D) float32 and labels (N,) int64, on CPU.

    Each batch is a dict with "image" and "label" (mae_vit loaders) or a sequence `(inputs, labels, ...)`.
    `model_fn` maps inputs (B, ...) to features (B, D). Put the model in eval mode first: this function
    only disables autograd. Inputs are moved to `device`, or to `accelerator.device` when an accelerator
    is given and `device` is not.

    With an accelerator, `loader` holds this process's share of the data (mae_vit's rank-sharded
    `make_loader`, not a loader prepared by Accelerate): each process keeps its share and the shares
    are concatenated once at the end (rank 0's first), so every process returns the features of the
    whole data set, each sample once; shares may differ in size, and a rank may have no batch at all.
    With `on_device` the features stay on the device (gathered there): no host memory per process for
    the whole set, and the kNN that follows runs on the training device.
    `should_stop` (a pre-emption flag) is asked before every batch: once it says yes, this process reads no
    more and every process raises `StoppedBySignal` at the end (`stop_if_asked`).
    """
    if device is None and accelerator is not None:
        device = accelerator.device
    feats, labels, stopped = [], [], False
    for batch in loader:
        if should_stop is not None and should_stop():
            stopped = True
            break
        x, y = _split_batch(batch)
        if device is not None:
            x = x.to(device, non_blocking=True)
        f = model_fn(x)  # (B, D)
        if f.ndim != 2:
            raise ValueError(f"model_fn must return (B, D) features, got shape {tuple(f.shape)}")
        y = torch.as_tensor(y, device=f.device)
        feats.append(f.detach().float() if on_device else f.detach().float().cpu())
        labels.append(y.detach().long() if on_device else y.detach().long().cpu())
    feats_t = torch.cat(feats) if feats else torch.zeros(0, 0)  # (n, D)
    labels_t = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)  # (n,)
    stop_if_asked(accelerator, should_stop, stopped, "feature extraction")
    if accelerator is not None:
        feats_t, labels_t = gather_rows(accelerator, feats_t, on_device), gather_rows(accelerator, labels_t, on_device)
    if feats_t.shape[0] == 0:
        raise DataError(
            "Feature extraction saw no samples: the data loader is empty. Check the data path and split, and that "
            "the batch size is not larger than the dataset with drop_last enabled."
        )
    return feats_t, labels_t
