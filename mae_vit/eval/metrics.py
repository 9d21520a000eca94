"""Classification metrics: top-k counts and a meter that accumulates them over a (distributed) evaluation.

The meter keeps *sums* (correct counts, summed loss, sample count) rather than per-batch averages, so
the final numbers are exact however the samples were split into batches or across processes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mae_vit.errors import DataError
from mae_vit.eval.distributed import stop_if_asked, sum_across_processes


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """Count the samples whose true class is among the `k` highest logits, for each `k` in `ks`.

    Args:
        logits: (B, K) class scores.
        target: (B,) integer class indices in [0, K).
        ks: the values of k; each is clipped to K (so top-5 of a 3-class problem counts as top-3, i.e. every
            sample). The returned dict is keyed by the k *as requested*.

    Returns:
        {k: number of correct samples} as Python ints.

    Ties between equal logits are broken by `torch.topk`'s order, as in any top-k accuracy.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (B, K), got {tuple(logits.shape)}")
    if target.shape != logits.shape[:1]:
        raise ValueError(f"target must have shape ({logits.shape[0]},), got {tuple(target.shape)}")
    if any(k < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got {tuple(ks)}")
    num_classes = logits.shape[1]
    if logits.shape[0] == 0 or not ks:
        return {k: 0 for k in ks}
    kmax = min(max(ks), num_classes)
    top = logits.topk(kmax, dim=1).indices  # (B, kmax), best first
    hit = top.eq(target.to(top.device).unsqueeze(1))  # (B, kmax); at most one True per row
    return {k: int(hit[:, : min(k, num_classes)].any(dim=1).sum().item()) for k in ks}


def check_label_range(labels: torch.Tensor, num_classes: int, what: str) -> None:
    """Raise DataError if any label lies outside [0, num_classes)."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataError(
            f"The {what} labels range over [{int(labels.min())}, {int(labels.max())}] but num_classes is "
            f"{num_classes}, so some labels are not valid class indices. Set num_classes to the number of classes "
            f"in the data, or check that the labels are 0-based class indices."
        )


class ClassificationMeter:
    """Accumulates top-1/top-5 correct counts, summed loss and sample count over an evaluation.

    It keeps exact sums, so the result does not depend on how samples were batched or split across
    processes -- provided every sample is counted exactly once. Two ways to use it with `accelerate`:

    (A) Loader prepared by `accelerator.prepare` (map-style dataset; the sampler pads the last uneven
        batch with duplicated samples). Gather *every batch* with `gather_for_metrics`, which drops the
        duplicates; every process then holds the same, complete totals::

            meter = ClassificationMeter()
            for images, labels in loader:
                logits = model(images)                                          # (B, K)
                loss = F.cross_entropy(logits, labels, reduction="none")        # (B,) per sample
                meter.update(*accelerator.gather_for_metrics((logits, labels, loss)))
            stats = meter.compute()  # {"top1": %, "top5": %, "loss": mean, "n": count}

    (B) Loader that already holds only this rank's share (mae_vit's `make_loader`, which must not be
        prepared): ranks may get different numbers of batches, so per-batch collectives would hang.
        Update with the local batch, and sum the totals once at the end::

            for batch in loader:
                logits = model(batch["image"])
                meter.update(logits, batch["label"], F.cross_entropy(logits, batch["label"], reduction="none"))
            stats = meter.reduced(accelerator).compute()   # every process must call this

    Losses must be per-sample (`reduction="none"`) for (A): a batch-mean loss cannot be de-duplicated.
    Without an accelerator, `update` then `compute`. `merge` adds another meter's totals.
    """

    def __init__(self, ks: Sequence[int] = (1, 5)):
        self.ks = tuple(ks)
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self.n = 0
        self.correct = {k: 0 for k in self.ks}
        self.loss_sum = 0.0
        self.loss_n = 0  # samples that came with a loss (loss is optional)

    def update(self, logits: torch.Tensor, target: torch.Tensor, loss: torch.Tensor | None = None) -> None:
        """Add one batch: logits (B, K), target (B,), and optionally per-sample losses (B,).

        A 0-dim `loss` is accepted as the batch mean (multiplied by B), which is exact only without
        distributed gathering; prefer per-sample losses.
        """
        counts = topk_correct(logits.detach(), target.detach(), self.ks)
        batch = int(target.shape[0])
        for k in self.ks:
            self.correct[k] += counts[k]
        self.n += batch
        if loss is not None:
            loss = loss.detach().to(torch.float64)
            if loss.ndim == 0:
                self.loss_sum += float(loss.item()) * batch
            elif loss.shape == target.shape:
                self.loss_sum += float(loss.sum().item())
            else:
                raise ValueError(
                    f"loss must be per-sample with shape {tuple(target.shape)} or a scalar, got {tuple(loss.shape)}"
                )
            self.loss_n += batch

    def merge(self, other: "ClassificationMeter") -> None:
        """Add the totals of another meter with the same ks (for disjoint sets of samples)."""
        if other.ks != self.ks:
            raise ValueError(f"cannot merge meters with ks {other.ks} and {self.ks}")
        self.n += other.n
        for k in self.ks:
            self.correct[k] += other.correct[k]
        self.loss_sum += other.loss_sum
        self.loss_n += other.loss_n

    def reduced(self, accelerator) -> "ClassificationMeter":
        """A new meter holding the totals summed over all processes (this one is unchanged).

        For use (B) in the class docstring, where each process counted a disjoint share of the samples.
        A collective: every process must call it. With `accelerator=None` or one process, a copy.
        """
        local = [self.n, *(self.correct[k] for k in self.ks), self.loss_sum, self.loss_n]
        total = sum_across_processes(accelerator, local)
        out = ClassificationMeter(self.ks)
        out.n = int(round(total[0]))
        out.correct = {k: int(round(v)) for k, v in zip(self.ks, total[1 : 1 + len(self.ks)])}
        out.loss_sum = float(total[-2])
        out.loss_n = int(round(total[-1]))
        return out

    def compute(self) -> dict:
        """Return {"top1": %, "top5": % (for each k in ks: "top{k}"), "loss": mean or None, "n": count}.

        "loss" is None when no batch came with a loss. Raises DataError when nothing was accumulated.
        """
        if self.n == 0:
            raise DataError(
                "The evaluation saw no samples, so no accuracy can be computed. Check that the evaluation data "
                "path matches at least one shard and that the evaluation split is not empty."
            )
        out: dict = {f"top{k}": 100.0 * self.correct[k] / self.n for k in self.ks}
        out["loss"] = self.loss_sum / self.loss_n if self.loss_n else None
        out["n"] = self.n
        return out


@torch.no_grad()
def classifier_metrics(model: torch.nn.Module, batches, accelerator, should_stop=None) -> dict:
    """{"top1", "top5", "loss", "n"} of a classifier over this process's share of the evaluation batches.

    Shares may differ in length, so the (unwrapped) model runs with no collective per batch and the
    totals are summed over processes once at the end; every process must call this. The model is
    switched to eval mode for the pass and back afterwards. `should_stop`: as in `extract_features`.
    """
    was_training = model.training
    model.eval()
    meter, stopped = ClassificationMeter(), False
    for batch in batches:
        if should_stop is not None and should_stop():
            stopped = True
            break
        images = batch["image"].to(accelerator.device, non_blocking=True)
        labels = batch["label"].to(accelerator.device, non_blocking=True)
        with accelerator.autocast():
            logits = model(images).float()  # (B, K)
        check_label_range(labels, logits.shape[1], "validation")
        meter.update(logits, labels, F.cross_entropy(logits, labels, reduction="none"))
    model.train(was_training)
    stop_if_asked(accelerator, should_stop, stopped, "an evaluation")
    return meter.reduced(accelerator).compute()
