"""The classifier-training loop shared by fine-tuning and linear probing.

What differs between the two (the module that is trained, its optimizer, the training batches, the
loss) comes from a `ClassifierMode` (`engine/finetune.py`, `engine/linprobe.py`); `train_classifier`
does the rest the way the pretraining loop does: run directory with resume / overwrite rules,
atomic checkpoints (every `save_every` steps, at each epoch end, at the end), gradient accumulation
with no all-reduce but on the last micro-batch, the non-finite guard, the stop signal, progress and
TensorBoard logging. On top of that:

- evaluation on `data.val` every `train.eval_every` epochs and at the end: top-1, top-5 and loss
  from a rank-sharded loader, every validation sample counted exactly once across processes;
- the best validation top-1 is exported to `best.safetensors` (and kept in the trainer state, so a
  resumed run still knows it), the last weights to `model.safetensors`, and `metrics.json` holds the
  final and the best metrics.

The pretrained checkpoint is read first, before anything is written (a bad path costs a second and
leaves no trace), and is loaded only on a fresh start: a resumed run continues from its own state.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from ..checkpoint import EXPORT_NAME, export_safetensors, read_file, to_state_dict
from ..data import eval_transform, make_loader, read_index, steps_per_epoch
from ..errors import DataError
from ..eval.metrics import ClassificationMeter
from ..progress import Progress
from .build import batch_plan, make_accelerator, resolve_data
from .optim import set_lr
from .runtime import (EpochBatches, log_training, NonFiniteGuard, optimizer_step, plan_steps, restore, RunDir,
                      save_checkpoint, setup_logging, StopSignal, TrainerState, TrainMeter, write_json)
from .schedule import lr_at

log = logging.getLogger("mae_vit")

BEST_NAME = "best.safetensors"    # weights of the best validation top-1
METRICS_NAME = "metrics.json"     # final and best validation metrics
FEATURES_NAME = "features.pt"     # linear probing's feature cache


# --------------------------------------------------------------------------------------------
# Batches: shards (images) or in-memory tensors (cached features), both as dicts with image/label
# --------------------------------------------------------------------------------------------


class ShardBatches:
    """Labelled batches of this rank's share of WebDataset shards, epoch by epoch (`make_loader`).

    `train=True`: shuffled, full batches only (every rank gets `steps(epoch)` of them).
    `train=False` (evaluation): file order, the last partial batch kept, each sample on one rank.
    """

    def __init__(self, urls: str, *, transform, batch_size: int, num_workers: int, rank: int, world_size: int,
                 seed: int, shuffle_buffer: int, in_chans: int, pin_memory: bool = False, train: bool = True):
        self.urls, self.transform, self.train = urls, transform, train
        self.batch_size, self.num_workers = batch_size, num_workers
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer, self.in_chans, self.pin_memory = shuffle_buffer, in_chans, pin_memory

    def steps(self, epoch: int) -> int:
        """Full batches every rank gets in `epoch` (training)."""
        return steps_per_epoch(self.urls, world_size=self.world_size, num_workers=self.num_workers,
                               batch_size=self.batch_size, seed=self.seed, epoch=epoch)

    def batches(self, epoch: int = 0, skip: int = 0) -> Iterable[dict]:
        return make_loader(self.urls, transform=self.transform, batch_size=self.batch_size,
                           num_workers=self.num_workers, rank=self.rank, world_size=self.world_size, seed=self.seed,
                           epoch=epoch, shuffle=self.train, shuffle_buffer=self.shuffle_buffer, with_labels=True,
                           in_chans=self.in_chans, drop_last=self.train, pin_memory=self.pin_memory,
                           skip_batches=skip)


class TensorBatches:
    """Batches of in-memory inputs (N, ...) and labels (N,), e.g. cached features.

    Every rank draws the same permutation per (seed, epoch) (file order when not `train`) and takes
    every `world_size`-th entry of it from its `rank`: the ranks' shares are disjoint and cover all.
    `train=True`: `steps(epoch)` full batches on every rank; `train=False`: all of the share.
    """

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, *, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, train: bool = True):
        if inputs.shape[0] != labels.shape[0]:
            raise ValueError(f"{inputs.shape[0]} inputs but {labels.shape[0]} labels")
        self.inputs, self.labels = inputs, labels
        self.batch_size, self.rank, self.world_size, self.seed, self.train = batch_size, rank, world_size, seed, train

    def steps(self, epoch: int = 0) -> int:
        return (self.inputs.shape[0] // self.world_size) // self.batch_size  # the smallest share's full batches

    def batches(self, epoch: int = 0, skip: int = 0) -> Iterator[dict]:
        n = self.inputs.shape[0]
        if self.train:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        else:
            order = torch.arange(n)
        mine = order[self.rank::self.world_size]
        count = self.steps(epoch) if self.train else -(-mine.shape[0] // self.batch_size)
        for i in range(skip, count):
            idx = mine[i * self.batch_size:(i + 1) * self.batch_size]
            yield {"image": self.inputs[idx], "label": self.labels[idx], "skipped": 0}


def eval_batches(urls: str, *, img_size: int, data: DictConfig, in_chans: int, rank: int,
                 world_size: int) -> ShardBatches:
    """The validation set of shards with the evaluation transform (resize + center crop, `data.crop_pct`)."""
    transform = eval_transform(img_size, in_chans=in_chans, mean=list(data.mean), std=list(data.std),
                               crop_pct=data.crop_pct, interpolation=data.interpolation)
    return ShardBatches(urls, transform=transform, batch_size=data.batch_size, num_workers=data.num_workers,
                        rank=rank, world_size=world_size, seed=0, shuffle_buffer=0, in_chans=in_chans, train=False)


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[dict], accelerator=None) -> dict:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy of `model` over `batches`, summed over all processes.

    `batches` must hold this process's share only (each sample on exactly one process, as
    `ShardBatches(train=False)` / `TensorBatches(train=False)` give); processes may see different
    numbers of batches, so the model is used unwrapped (no collective per batch) and the totals are
    summed once at the end. Every process must call this; each gets {"top1", "top5", "loss", "n"}.
    """
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    meter = ClassificationMeter((1, 5))
    for batch in batches:
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        with accelerator.autocast() if accelerator is not None else nullcontext():
            logits = model(images)  # (B, K)
        logits = logits.float()
        meter.update(logits, labels, F.cross_entropy(logits, labels, reduction="none"))
    model.train(was_training)
    return meter.reduced(accelerator).compute()


# --------------------------------------------------------------------------------------------
# What the modes provide
# --------------------------------------------------------------------------------------------


class DataContext:
    """What a mode needs to make its batches: the process layout, the data, the run, the trained module."""

    def __init__(self, *, accelerator, train_urls: str, val_urls: str | None, run: RunDir, resumed: bool,
                 model: nn.Module):
        self.accelerator = accelerator
        self.rank, self.world_size = accelerator.process_index, accelerator.num_processes
        self.train_urls, self.val_urls = train_urls, val_urls
        self.run, self.resumed = run, resumed
        self.model = model  # unwrapped; on the device, with the run's weights (pretrained or resumed)


class ClassifierMode:
    """Fine-tuning or linear probing: the parts of `train_classifier` that differ. Subclasses set
    `name`, `checkpoint` (pretrained weights or None) and `img_size`, and implement the methods."""

    name: str = "classify"
    checkpoint: str | None = None
    img_size: int = 224

    def build_model(self, num_classes: int, pretrained: dict | None) -> tuple[nn.Module, nn.Module]:
        """(the module trained, forward(inputs) -> logits; the classifier whose weights are exported)."""
        raise NotImplementedError

    def build_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        raise NotImplementedError

    def data(self, ctx: DataContext) -> tuple:
        """(training batches with .steps(epoch) and .batches(epoch, skip), validation batches or None)."""
        raise NotImplementedError

    def mix(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch-level augmentation on the device (MixUp / CutMix): (inputs, targets for `loss`)."""
        return inputs, labels

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets)


def read_pretrained(checkpoint: str | None) -> dict | None:
    """The state dict of `checkpoint` (any format `load_weights` reads), or None; CheckpointError if bad."""
    return None if checkpoint is None else to_state_dict(read_file(checkpoint))


def resolve_num_classes(configured: int | None, train_urls: str) -> int:
    """model.num_classes, else the classes in the training shards' index; DataError when neither says."""
    index = read_index(train_urls)
    found = index["num_classes"] if index else None
    if configured is None:
        if found is None:
            raise DataError(
                f"cannot tell how many classes the training data {train_urls} has: its shards have no index with "
                "classes (remote or hand-made shards?). Set --num-classes K (model.num_classes=K)."
            )
        return int(found)
    if found is not None and found > configured:
        raise DataError(
            f"the training shards have {found} classes but model.num_classes is {configured}, so some labels "
            f"would not be classes of the model. Set --num-classes {found} (or leave model.num_classes unset)."
        )
    return int(configured)


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def train_classifier(cfg: DictConfig, mode: ClassifierMode) -> dict:
    """Run (or resume) classifier training as configured; returns a summary dict (see the end)."""
    t, d, o = cfg.train, cfg.data, cfg.optim
    run = RunDir(t.output_dir, extra_outputs=(BEST_NAME, METRICS_NAME, FEATURES_NAME))
    will_resume = t.resume and run.latest() is not None
    pretrained = None if will_resume else read_pretrained(mode.checkpoint)  # a bad path fails here
    accelerator = make_accelerator(t.mixed_precision, str(run.path))
    setup_logging(accelerator.is_main_process)
    world = accelerator.num_processes
    train_urls, val_urls = resolve_data(d, accelerator)
    if d.train is None:
        log.info("no data.train given: using the labelled synthetic demo shards %s (val %s)", train_urls, val_urls)
    num_classes = resolve_num_classes(cfg.model.num_classes, train_urls)

    torch.manual_seed(t.seed)  # the same initial weights on every process
    model, classifier = mode.build_model(num_classes, pretrained)  # loads `pretrained`: shape errors come now
    del pretrained
    resume_from = run.prepare(cfg, resume=t.resume, overwrite=t.overwrite, is_main=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    effective, accum, peak_lr = batch_plan(o, d.batch_size, world)
    optimizer = mode.build_optimizer(model, peak_lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = restore(accelerator, resume_from, run)
    unwrapped = accelerator.unwrap_model(model)

    ctx = DataContext(accelerator=accelerator, train_urls=train_urls, val_urls=val_urls, run=run,
                      resumed=resume_from is not None, model=unwrapped)
    train_data, val_data = mode.data(ctx)
    if val_data is None:
        log.warning("no validation data (data.val): no evaluation, no %s; metrics.json gets the training loss only",
                    BEST_NAME)
    micro_per_epoch = train_data.steps(0)
    steps_per_ep, warmup_steps, total_steps, last_step = plan_steps(
        micro_per_epoch, accum=accum, epochs=o.epochs, warmup_epochs=o.warmup_epochs, max_steps=t.max_steps,
        what=f"{train_urls} ({d.batch_size} per batch, {world} process(es))")
    if accelerator.is_main_process:
        run.save_config(cfg)
    accelerator.init_trackers("logs")
    trainable = sum(p.numel() for p in unwrapped.parameters() if p.requires_grad)
    log.info("%s: model %s at %d px, %d classes (%s trainable parameters); %d process(es) x batch %d x %d "
             "accumulation = effective batch %d, peak lr %.3g, %d steps/epoch, %d steps in all", mode.name,
             cfg.model.name, mode.img_size, num_classes, f"{trainable:,}", world, d.batch_size, accum, effective,
             peak_lr, steps_per_ep, total_steps)

    guard = NonFiniteGuard(accelerator.device)
    stop = StopSignal()
    bar = Progress(last_step, mode.name, unit="step", initial=state.step) if accelerator.is_main_process else None
    last_ckpt = resume_from
    saved_step = state.step if resume_from is not None else None
    last_loss = None
    meter = TrainMeter(accelerator.device)
    model.train()

    def checkpoint() -> None:
        nonlocal last_ckpt, saved_step
        guard.check(accelerator, last_ckpt)  # never save a diverged state over a good one
        last_ckpt = save_checkpoint(accelerator, run, state, t.keep_last)
        saved_step = state.step

    def validate(epoch: float) -> dict | None:
        if val_data is None:
            return None
        guard.check(accelerator, last_ckpt)  # a diverged model is not "best"
        metrics = evaluate(unwrapped, val_data.batches(), accelerator)
        metrics.update(epoch=round(epoch, 4), step=state.step)
        _record(metrics, state, accelerator, classifier, run)
        accelerator.log({"val/top1": metrics["top1"], "val/top5": metrics["top5"], "val/loss": metrics["loss"]},
                        step=state.step)
        best = state.extra["best"]
        log.info("epoch %s step %d: val top-1 %.2f%%  top-5 %.2f%%  loss %.4f  (%d images; best top-1 %.2f%% at "
                 "epoch %s)", _epoch_text(epoch), state.step, metrics["top1"], metrics["top5"], metrics["loss"],
                 metrics["n"], best["top1"], _epoch_text(best["epoch"]))
        return metrics

    def compute_loss(batch):
        inputs = batch["image"].to(accelerator.device, non_blocking=True)
        inputs, targets = mode.mix(inputs, batch["label"].to(accelerator.device, non_blocking=True))
        with accelerator.autocast():
            return mode.loss(model(inputs), targets), inputs.shape[0]

    while state.step < last_step and state.epoch < o.epochs:
        epoch_micro = train_data.steps(state.epoch) // accum * accum
        if epoch_micro == 0:  # cannot happen with the planned data; guards against an endless loop
            raise DataError(f"epoch {state.epoch} of {train_urls} has too few batches for one optimizer step.")
        batches = EpochBatches(lambda skip: train_data.batches(state.epoch, skip), state.batches_in_epoch)
        while state.step < last_step:
            lr = lr_at(state.step, peak_lr=peak_lr, min_lr=o.min_lr, warmup_steps=warmup_steps,
                       total_steps=total_steps)
            set_lr(optimizer, lr)
            optimizer_step(accelerator, model, optimizer, batches, meter, guard, state, accum=accum,
                           clip_grad=o.clip_grad, compute_loss=compute_loss)
            if bar:
                bar.update()
            if state.step % t.log_every == 0 or state.step == last_step:
                stats = log_training(accelerator, meter, guard, state, bar=bar, last_step=last_step, lr=lr,
                                     epoch_micro=epoch_micro, last_ckpt=last_ckpt)
                last_loss = stats["loss"]
                state.extra["train_loss"] = last_loss
                if stop.agreed(accelerator):
                    log.info("stop signal received: saving a checkpoint at step %d and stopping", state.step)
                    checkpoint()
                    accelerator.end_training()
                    return {"stopped": True, "step": state.step, "checkpoint": str(last_ckpt)}
            end_of_epoch = state.batches_in_epoch >= epoch_micro
            if end_of_epoch:
                state.epoch += 1
                state.batches_in_epoch = 0
                if state.epoch % t.eval_every == 0 or state.epoch == o.epochs:
                    validate(state.epoch)
            if end_of_epoch or state.step % t.save_every == 0:
                checkpoint()  # at an epoch end after the evaluation, so that the state knows the best
            if end_of_epoch:
                break

    if bar:
        bar.close()
    last_eval = state.extra.get("last_eval")
    if val_data is not None and (last_eval is None or last_eval["step"] != state.step):
        validate(state.epoch + state.batches_in_epoch / max(train_data.steps(state.epoch), 1))
    if saved_step != state.step:
        checkpoint()
    summary = {"task": mode.name, "step": state.step, "epoch": state.epoch, "num_classes": num_classes,
               "img_size": mode.img_size, "train_loss": state.extra.get("train_loss", last_loss),
               "final": state.extra.get("last_eval"), "best": state.extra.get("best")}
    if accelerator.is_main_process:
        export_safetensors(classifier, run.path / EXPORT_NAME)
        write_json(run.path / METRICS_NAME, summary)
        if summary["final"] is not None:
            log.info("done: step %d; final val top-1 %.2f%%, best %.2f%% at epoch %s; weights in %s and %s, metrics "
                     "in %s", state.step, summary["final"]["top1"], summary["best"]["top1"],
                     _epoch_text(summary["best"]["epoch"]), run.path / EXPORT_NAME, run.path / BEST_NAME,
                     run.path / METRICS_NAME)
        else:
            log.info("done: step %d; weights in %s", state.step, run.path / EXPORT_NAME)
    accelerator.end_training()
    summary.update(checkpoint=str(last_ckpt), weights=str(run.path / EXPORT_NAME),
                   resumed_from=None if resume_from is None else str(resume_from))
    return summary


def _record(metrics: dict, state: TrainerState, accelerator, classifier: nn.Module, run: RunDir) -> None:
    """Keep `metrics` as the last evaluation; when its top-1 beats the best, export best.safetensors."""
    state.extra["last_eval"] = metrics
    if state.best_metric is None or metrics["top1"] > state.best_metric:
        state.best_metric = metrics["top1"]
        state.extra["best"] = metrics
        if accelerator.is_main_process:
            export_safetensors(classifier, run.path / BEST_NAME)


def _epoch_text(epoch: float) -> str:
    return str(int(epoch)) if float(epoch).is_integer() else f"{epoch:.2f}"


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_k targets_k log softmax(logits)_k; targets (B, K) are probabilities."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()

