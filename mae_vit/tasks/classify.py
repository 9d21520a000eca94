"""Classifier training, the part fine-tuning and linear probing share: a `Task` for the training loop.

What differs between the two (the module that is trained, its optimizer, the training batches, the
batch mixing and the loss) is in `finetune.py` and `linprobe.py`; this class adds to the loop:

- evaluation on `data.val` every `train.eval_every` epochs, at the last epoch and at the last step:
  top-1, top-5 and loss from a rank-sharded loader, every validation sample counted exactly once;
- a checkpoint at every epoch end (after the evaluation, so that the saved state knows the best);
- the best validation top-1 exported to `best.safetensors` (and kept in the trainer state, so a
  resumed run still knows it), the last weights to `model.safetensors`, and `metrics.json` with the
  final and the best metrics;
- with `data.test`: the test split evaluated ONCE, at the end, with the weights chosen on data.val
  (best.safetensors), written to metrics.json as `test` with `chosen_by` ("val top-1 at epoch E").
  data.val makes every choice, so it should be held out from the training set, never the test split.

The pretrained checkpoint is read first, before anything is written (a bad path costs a second and
leaves no trace), and is loaded only on a fresh start: a resumed run continues from its own state.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from mae_vit.checkpoint import (
    EXPORT_NAME,
    export_safetensors,
    load_weights,
    nonfinite_tensors,
    read_file,
    to_state_dict,
)
from mae_vit.data import expand_urls, read_index
from mae_vit.errors import DataError, NonFiniteLossError
from mae_vit.eval import classifier_metrics
from mae_vit.files import write_json
from mae_vit.train.batches import ShardBatches, eval_batches, transform_for
from mae_vit.train.build import resolve_data
from mae_vit.train.loop import Task
from mae_vit.train.monitor import on_main_process, stop_requested
from mae_vit.train.run_config import run_metadata
from mae_vit.train.rundir import RunDir, TrainState

log = logging.getLogger("mae_vit")

BEST_NAME = "best.safetensors"    # weights of the best validation top-1
METRICS_NAME = "metrics.json"     # final and best validation metrics, and the test split's (data.test)
FEATURES_NAME = "features.pt"     # linear probing's feature cache


class ClassifierTask(Task):
    """Fine-tuning or linear probing. Subclasses set `name` and implement `make_model`,
    `build_optimizer` and `make_train_data`; `mix` and `criterion` default to plain cross-entropy."""

    outputs = (BEST_NAME, METRICS_NAME, FEATURES_NAME)
    save_at_epoch_end = True  # the saved state knows the best evaluation so far

    def __init__(self, cfg: DictConfig, img_size: int):
        self.cfg, self.img_size = cfg, img_size
        self.checkpoint = self.parent = cfg.checkpoint
        self.pretrained = None

    def make_model(self, num_classes: int, pretrained: dict | None) -> tuple[nn.Module, nn.Module]:
        """(the module trained, forward(inputs) -> logits; the classifier whose weights are exported)."""
        raise NotImplementedError

    def make_train_data(self, val: ShardBatches | None, resumed: bool) -> tuple:
        """(training batches, validation batches or None): `val` is the shards' evaluation batches."""
        raise NotImplementedError

    def mix(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch-level augmentation on the device (MixUp / CutMix): (inputs, targets for `criterion`)."""
        return inputs, labels

    def criterion(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets)

    def extra_results(self) -> dict:
        """Further results for metrics.json, worked out at the end (linear probing's probe sweep)."""
        return {}

    def image_model(self) -> nn.Module:
        """The trained module taking images (B, C, H, W) -> logits: what the test split is evaluated with."""
        return self.model

    # ---- what the loop calls ----

    def check(self, resuming: bool) -> None:
        self.pretrained = None if resuming else read_pretrained(self.checkpoint)  # a bad path fails here

    def build_model(self, accelerator, resuming: bool) -> nn.Module:
        self.accelerator = accelerator
        self.train_urls, self.val_urls = resolve_data(self.cfg, accelerator)
        if self.cfg.data.train is None:
            log.info("no data.train given: using the labelled synthetic demo shards %s (val %s)", self.train_urls,
                     self.val_urls)
        self.test_urls = self.cfg.data.get("test")
        if self.test_urls is not None:
            expand_urls(self.test_urls)  # missing test shards fail now, not after the training
        self.num_classes = resolve_num_classes(self.cfg.model.num_classes, self.train_urls, self.val_urls,
                                               self.test_urls)
        # self.model: the trained module itself (the loop's prepared copy wraps this very object)
        self.model, self.classifier = self.make_model(self.num_classes, self.pretrained)  # shape errors come now
        self.pretrained = None
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        log.info("%s: model %s at %d px, %d classes (%s trainable parameters)", self.name, self.cfg.model.name,
                 self.img_size, self.num_classes, f"{trainable:,}")
        return self.model

    def build_data(self, run: RunDir, resumed: bool):
        self.run = run
        val = None
        if self.val_urls is not None:
            val = eval_batches(self.val_urls, self.cfg, accelerator=self.accelerator, img_size=self.img_size)
        train, self.val = self.make_train_data(val, resumed)
        if self.val is None:
            log.warning("no validation data (data.val): no evaluation, no %s; metrics.json gets the training loss "
                        "only", BEST_NAME)
        return train

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        device = self.accelerator.device
        inputs, targets = self.mix(batch["image"].to(device, non_blocking=True),
                                   batch["label"].to(device, non_blocking=True))
        with self.accelerator.autocast():
            return self.criterion(model(inputs), targets)

    def after_step(self, step: int, state: TrainState, *, epoch_end: bool, last: bool) -> None:
        epoch, epochs = state.epoch, self.cfg.optim.epochs
        due = last or (epoch_end and (epoch % self.cfg.train.eval_every == 0 or epoch == epochs))
        if due and self.val is not None:
            self.validate(state)  # sets state.last_eval: the loop saves a checkpoint after it

    def validate(self, state: TrainState) -> dict:
        metrics = classifier_metrics(self.model, self.val.batches(), self.accelerator, stop_requested)
        metrics.update(epoch=round(state.samples_seen / state.samples_per_epoch, 4), step=state.step)
        bad = nonfinite_tensors(self.classifier.state_dict())
        if bad:  # the same weights on every process: all of them stop here, before anything is exported
            raise NonFiniteLossError(
                f"the weights became NaN or infinite by optimizer step {state.step} ({len(bad)} tensors, e.g. "
                f"{bad[0]}); the run stopped before the evaluation could export {BEST_NAME}. Common fixes: a lower "
                "learning rate (optim.base_lr), gradient clipping (optim.clip_grad=1.0), train.mixed_precision=bf16 "
                "instead of fp16.",
                step=state.step)
        state.last_eval = metrics
        if state.best is None or metrics["top1"] > state.best["top1"]:
            state.best = metrics
            on_main_process(self.accelerator, lambda: export_safetensors(self.classifier, self.run.path / BEST_NAME,
                                                                         metadata=run_metadata(self.cfg)))
        self.accelerator.log({"val/top1": metrics["top1"], "val/top5": metrics["top5"], "val/loss": metrics["loss"]},
                             step=state.step)
        log.info("epoch %s step %d: val top-1 %.2f%%  top-5 %.2f%%  loss %.4f  (%d images; best top-1 %.2f%% at "
                 "epoch %s)", _epoch_text(metrics["epoch"]), state.step, metrics["top1"], metrics["top5"],
                 metrics["loss"], metrics["n"], state.best["top1"], _epoch_text(state.best["epoch"]))
        return metrics

    def finish(self, state: TrainState) -> dict:
        weights, metrics_file = self.run.path / EXPORT_NAME, self.run.path / METRICS_NAME
        summary = {"task": self.name, "step": state.step, "epoch": state.epoch, "num_classes": self.num_classes,
                   "img_size": self.img_size, "train_loss": state.last_loss, "final": state.last_eval,
                   "best": state.best, **self.extra_results()}
        on_main_process(self.accelerator, lambda: export_safetensors(self.classifier, weights,
                                                                     metadata=run_metadata(self.cfg)))
        if self.test_urls is not None:  # after the export: the best weights replace the last ones in the model
            summary["test"] = self.evaluate_test(state)
        on_main_process(self.accelerator, lambda: write_json(metrics_file, summary))
        if state.last_eval is not None:
            log.info("done: step %d; final val top-1 %.2f%%, best %.2f%% at epoch %s; weights in %s and %s, metrics "
                     "in %s", state.step, state.last_eval["top1"], state.best["top1"],
                     _epoch_text(state.best["epoch"]), weights, self.run.path / BEST_NAME, metrics_file)
        else:
            log.info("done: step %d; weights in %s", state.step, weights)
        return {**summary, "weights": str(weights)}

    def evaluate_test(self, state: TrainState) -> dict:
        """data.test's top-1, top-5, loss and n, once, with the weights chosen on data.val (best.safetensors; the
        last weights when there is no data.val), plus `chosen_by` and `weights` saying which."""
        if state.best is not None:
            weights, chosen_by = self.run.path / BEST_NAME, f"val top-1 at epoch {_epoch_text(state.best['epoch'])}"
            self.accelerator.wait_for_everyone()  # the main process has written best.safetensors
            load_weights(self.classifier, weights, strict=True, verbose=False)
        else:
            weights, chosen_by = self.run.path / EXPORT_NAME, "nothing (no data.val): the last weights"
        test = ShardBatches(self.test_urls, self.cfg, transform_for(self.cfg, "eval", self.img_size),
                            accelerator=self.accelerator, train=False)
        metrics = classifier_metrics(self.image_model(), test.batches(), self.accelerator, stop_requested)
        metrics.update(chosen_by=chosen_by, weights=str(weights))
        log.info("test top-1 %.2f%%  top-5 %.2f%%  loss %.4f  (data.test, %d images, evaluated once) with the "
                 "weights chosen by %s (%s)", metrics["top1"], metrics["top5"], metrics["loss"], metrics["n"],
                 chosen_by, weights)
        return metrics


def read_pretrained(checkpoint: str | None) -> dict | None:
    """The state dict of `checkpoint` (any format `load_weights` reads), or None; CheckpointError if bad."""
    return None if checkpoint is None else to_state_dict(read_file(checkpoint))


def resolve_num_classes(configured: int | None, train_urls: str, val_urls: str | None = None,
                        test_urls: str | None = None) -> int:
    """model.num_classes, else the classes in the training shards' index; DataError when neither says, or when
    the training, validation or test shards hold more classes than that (checked now, not after an epoch)."""
    found = {what: (read_index(urls) or {}).get("num_classes") for what, urls in (
        ("training", train_urls), ("validation", val_urls), ("test", test_urls)) if urls}
    num_classes = configured if configured is not None else found["training"]
    if num_classes is None:
        raise DataError(
            f"cannot tell how many classes the training data {train_urls} has: its shards have no index with "
            "classes (remote or hand-made shards?). Set --num-classes K (model.num_classes=K)."
        )
    for what, classes in found.items():
        if classes is not None and classes > num_classes:
            raise DataError(
                f"the {what} shards have {classes} classes but the model has {num_classes} "
                f"({'model.num_classes' if configured is not None else 'from the training index'}), so some labels "
                f"would not be classes of the model. Set --num-classes {classes}, or use shards of the same classes."
            )
    return int(num_classes)


def _epoch_text(epoch: float) -> str:
    return str(int(epoch)) if float(epoch).is_integer() else f"{epoch:.2f}"


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_k targets_k log softmax(logits)_k; targets (B, K) are probabilities."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
