"""The batches a training loop eats, from the config: transforms, shards or in-memory tensors, steps.

    transform_for(cfg, "pretrain")      the one place a config becomes a transform
    ShardBatches / TensorBatches        an epoch's batches of this process: .batches(epoch, skip)
    MemoryBatches                       a small data set decoded once, augmented on the device (data.in_memory)
    GpuDecodeBatches                    shards whose JPEGs are decoded and augmented on the device (data.gpu_decode)
    train_batches(urls, cfg, kind)      the training batches of a config: shards, or in memory
    step_batches(data, plan)            the micro-batches of every optimizer step, epoch after epoch

An epoch of the schedule is a fixed number of optimizer steps (`Plan.steps_per_epoch`), so the epoch
and the position inside it follow from the step alone: a resumed run skips the batches its steps
already used. If a process's share of an epoch holds fewer batches than the plan needs (bad samples,
uneven shards, another process layout after a resume), it reads its share again from the start for
the rest of the epoch, and says so, rather than leave the other processes waiting.
"""

from __future__ import annotations

import logging
from typing import Iterable, Iterator

import torch
from omegaconf import DictConfig
from torchvision.transforms.v2 import functional as TF

from mae_vit.data import (
    eval_transform,
    finetune_transform,
    linprobe_transform,
    make_loader,
    pretrain_transform,
    rank_batch_counts,
)
from mae_vit.data.gpu_decode import JpegDecoder, crop_flip_each
from mae_vit.data.in_memory import decode_all, random_resized_crop_flip
from mae_vit.errors import DataError
from mae_vit.train.schedule import Plan

log = logging.getLogger("mae_vit")


def transform_for(cfg: DictConfig, kind: str, img_size: int | None = None, crop_pct: float | None = None,
                  normalise: bool = True):
    """The transform of `kind` (pretrain | finetune | linprobe | eval) for `cfg`'s model and data sections
    (`normalise=False`, eval only: uint8 pixels, for sets kept in memory and normalised per batch)."""
    m, d = cfg.model, cfg.data
    size = img_size or m.img_size
    common = dict(in_chans=m.in_chans, mean=list(d.mean), std=list(d.std), interpolation=d.interpolation)
    if kind == "eval":
        return eval_transform(size, crop_pct=crop_pct or d.crop_pct, normalise=normalise, **common)
    crop = dict(crop_scale=tuple(d.crop_scale), hflip=d.hflip)
    if kind == "pretrain":
        return pretrain_transform(size, **common, **crop)
    if kind == "linprobe":
        return linprobe_transform(size, **common, **crop)
    a = cfg.augment
    return finetune_transform(size, **common, **crop, randaug_num_ops=a.randaug_num_ops,
                              randaug_magnitude=a.randaug_magnitude, reprob=a.reprob)


class ShardBatches:
    """This process's share of WebDataset shards as batch dicts (`make_loader`), epoch by epoch.

    `train=True`: shuffled, full batches only. `train=False` (evaluation): file order, the last
    partial batch kept, each sample on exactly one process. One loader serves every epoch: its workers are
    started once, at the first `batches(...)`, and kept (each epoch's batches are those a loader built for
    that epoch gives).
    """

    def __init__(self, urls: str, cfg: DictConfig, transform, *, accelerator, train: bool = True,
                 labels: bool = True):
        d = cfg.data
        self.urls, self.transform, self.train = urls, transform, train
        self.options = dict(batch_size=d.batch_size, num_workers=d.num_workers, rank=accelerator.process_index,
                            world_size=accelerator.num_processes, seed=cfg.train.seed if train else 0,
                            in_chans=cfg.model.in_chans)
        self.loader_options = dict(shuffle=train, shuffle_buffer=d.shuffle_buffer if train else 0,
                                   with_labels=labels, num_classes=cfg.model.get("num_classes"), drop_last=train,
                                   pin_memory=train and accelerator.device.type == "cuda")
        self.loader = None

    def batches_per_epoch(self, epoch: int) -> int:
        """Full batches every process gets in `epoch` (the fewest of any process)."""
        o = self.options
        return min(rank_batch_counts(self.urls, world_size=o["world_size"], num_workers=o["num_workers"],
                                     batch_size=o["batch_size"], seed=o["seed"], epoch=epoch))

    def batches(self, epoch: int = 0, skip: int = 0) -> Iterable[dict]:
        """This process's batches of `epoch` after the first `skip`. The loader serves one pass at a time: a pass
        started later (another epoch, or this one again) drops what was left of this one."""
        if self.loader is None:
            self.loader = make_loader(self.urls, transform=self.transform, epoch=epoch, skip_batches=skip,
                                      persistent_workers=True, **self.options, **self.loader_options)
        return self.loader.epoch(epoch, skip)


class TensorBatches:
    """Batches of in-memory inputs (N, ...) and labels (N,), e.g. cached features.

    Every process draws the same permutation per (seed, epoch) (file order when not `train`) and takes
    every `world_size`-th entry of it from its `rank`: the shares are disjoint and cover all. The permutation
    is drawn on the CPU (the same order on any device, so a resume replays it anywhere) and this process's
    share moves to the inputs' device once per epoch, without a host sync: indexing a GPU tensor with a CPU
    index would copy the index with a blocking copy at every batch, so the CPU could never run ahead.
    """

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, *, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, train: bool = True):
        if inputs.shape[0] != labels.shape[0]:
            raise ValueError(f"{inputs.shape[0]} inputs but {labels.shape[0]} labels")
        self.inputs, self.labels = inputs, labels
        self.batch_size, self.rank, self.world_size, self.seed, self.train = batch_size, rank, world_size, seed, train

    def batches_per_epoch(self, epoch: int = 0) -> int:
        return (self.inputs.shape[0] // self.world_size) // self.batch_size  # the smallest share's full batches

    def batches(self, epoch: int = 0, skip: int = 0) -> Iterator[dict]:
        n = self.inputs.shape[0]
        if self.train:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        else:
            order = torch.arange(n)
        mine = _to_device(order[self.rank::self.world_size], self.inputs.device)
        count = self.batches_per_epoch(epoch) if self.train else -(-mine.shape[0] // self.batch_size)
        for i in range(skip, count):
            idx = mine[i * self.batch_size:(i + 1) * self.batch_size]
            yield {"image": self.inputs[idx], "label": self.labels[idx], "skipped": 0}


def _to_device(index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device`; to a GPU through pinned memory, asynchronously (no host sync)."""
    if device.type == "cuda":
        return index.pin_memory().to(device, non_blocking=True)  # torch keeps the pinned block until the copy ran
    return index.to(device)


def _normaliser(mean, std, device):
    """x -> (x - mean) / std in place, for (B, C, H, W) batches on `device`."""
    mean = torch.tensor(list(mean), dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(list(std), dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return lambda x: x.sub_(mean).div_(std)


class MemoryBatches(TensorBatches):
    """A data set held as one uint8 tensor (N, C, H, W) on the device, cropped, flipped and normalised there.

    Shares and order are TensorBatches' (every sample once per epoch over the processes); each batch's
    augmentation is seeded by (seed, epoch, rank, batch), so a resumed run replays its batches exactly.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, img_size: int, crop_scale, hflip: bool, mean,
                 std, interpolation: str = "bilinear", device=None, **options):
        device = torch.device(device or images.device)
        super().__init__(images.to(device), labels.to(device), **options)
        self.crop = dict(out_size=img_size, scale=tuple(crop_scale), hflip=hflip, mode=interpolation)
        self.normalise = _normaliser(mean, std, device)

    def batches(self, epoch: int = 0, skip: int = 0) -> Iterator[dict]:
        generator = torch.Generator(self.inputs.device)
        for i, batch in enumerate(super().batches(epoch, skip), start=skip):
            generator.manual_seed(((self.seed * 1_000_003 + epoch) * 1_009 + self.rank) * 1_000_003 + i)
            x = random_resized_crop_flip(batch["image"], generator=generator, **self.crop)  # (B, C, img, img)
            yield {**batch, "image": self.normalise(x)}


class NormalisedBatches(TensorBatches):
    """TensorBatches of uint8 images (N, C, H, W), normalised batch by batch on their device: pixel / 255, then
    (x - mean) / std, the arithmetic of the shard path's `ToNormalisedTensor`, so the values are the same."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, mean, std, **options):
        super().__init__(images, labels, **options)
        self.normalise = _normaliser(mean, std, images.device)

    def batches(self, epoch: int = 0, skip: int = 0) -> Iterator[dict]:
        for batch in super().batches(epoch, skip):
            yield {**batch, "image": self.normalise(batch["image"].float().div_(255.0))}


def eval_batches(urls: str, cfg: DictConfig, *, accelerator, img_size: int | None = None):
    """Labelled evaluation batches of `urls` (eval transform, file order, each sample on one process) for a set
    evaluated many times (every epoch, two encoders). With `data.in_memory`: resized and cropped once, held
    as uint8 on the accelerator's device (`NormalisedBatches`), so no later pass decodes anything;
    otherwise a `ShardBatches` whose loader keeps its workers."""
    if not cfg.data.get("in_memory", False):
        return ShardBatches(urls, cfg, transform_for(cfg, "eval", img_size), accelerator=accelerator, train=False)
    m, d = cfg.model, cfg.data
    images, targets = decode_all(urls, m.in_chans, labels=True, num_classes=m.get("num_classes"),
                                 transform=transform_for(cfg, "eval", img_size, normalise=False))
    device = accelerator.device
    return NormalisedBatches(images.to(device), targets.to(device), mean=d.mean, std=d.std, batch_size=d.batch_size,
                             rank=accelerator.process_index, world_size=accelerator.num_processes, train=False)


class GpuDecodeBatches(ShardBatches):
    """ShardBatches whose workers leave the JPEGs encoded: each batch is decoded (one nvJPEG call on a GPU),
    cropped, flipped and normalised on the accelerator's device (`mae_vit.data.gpu_decode`). Shares, order
    and epoch coverage are the shard path's; images that cannot be decoded count in `skipped`."""

    def __init__(self, urls: str, cfg: DictConfig, *, accelerator, img_size: int, labels: bool = True):
        super().__init__(urls, cfg, TF.pil_to_tensor, accelerator=accelerator, labels=labels)  # non-JPEGs: uint8
        self.loader_options["keep_jpeg"] = True
        d, device = cfg.data, accelerator.device
        self.decoder = JpegDecoder(cfg.model.in_chans, device)
        self.crop = dict(out_size=img_size, scale=tuple(d.crop_scale), hflip=d.hflip, interpolation=d.interpolation)
        self.normalise = _normaliser(d.mean, d.std, device)

    def batches(self, epoch: int = 0, skip: int = 0) -> Iterator[dict]:
        generator = torch.Generator()  # CPU: the boxes follow from the images' sizes, with no host sync
        o = self.options
        for i, batch in enumerate(super().batches(epoch, skip), start=skip):
            generator.manual_seed(((o["seed"] * 1_000_003 + epoch) * 1_009 + o["rank"]) * 1_000_003 + i)
            items = batch.pop("encoded")
            images, kept = self.decoder(items, batch["key"])
            batch["skipped"] += len(items) - len(kept)
            if not kept:
                continue
            if len(kept) < len(items):
                batch["key"] = [batch["key"][j] for j in kept]
                if "label" in batch:
                    batch["label"] = batch["label"][kept]
            yield {**batch, "image": self.normalise(crop_flip_each(images, generator=generator, **self.crop))}


def train_batches(urls: str, cfg: DictConfig, kind: str, *, accelerator, img_size: int | None = None,
                  labels: bool = True):
    """The training batches of `kind` (pretrain | finetune | linprobe): `ShardBatches` with its transform; with
    `data.in_memory` the decoded data set on the accelerator's device (`MemoryBatches`, crop + flip only); with
    `data.gpu_decode` shards whose JPEGs are decoded on that device (`GpuDecodeBatches`, crop + flip only)."""
    d = cfg.data
    if d.get("gpu_decode", False) and not d.get("in_memory", False):
        if accelerator.device.type != "cuda":
            log.info("data.gpu_decode=true without a GPU: the JPEGs are decoded on the CPU in the training process "
                     "(the fallback), where the decode shares the cores with the model")
        return GpuDecodeBatches(urls, cfg, accelerator=accelerator, img_size=img_size or cfg.model.img_size,
                                labels=labels)
    if not d.get("in_memory", False):
        return ShardBatches(urls, cfg, transform_for(cfg, kind, img_size), accelerator=accelerator, labels=labels)
    images, targets = decode_all(urls, cfg.model.in_chans, labels=labels, num_classes=cfg.model.get("num_classes"))
    log.info("in memory: %d images of %s px (%.1f MiB) on %s, augmented there", images.shape[0],
             "x".join(map(str, images.shape[1:])), images.numel() / 2**20, accelerator.device)
    return MemoryBatches(images, targets, img_size=img_size or cfg.model.img_size, crop_scale=d.crop_scale,
                         hflip=d.hflip, mean=d.mean, std=d.std, interpolation=d.interpolation,
                         device=accelerator.device, batch_size=d.batch_size, rank=accelerator.process_index,
                         world_size=accelerator.num_processes, seed=cfg.train.seed)


def step_batches(data, plan: Plan) -> Iterator[list[dict]]:
    """For every optimizer step after `plan.first_step`, its `plan.accum` micro-batches of this process.

    Step s (1-based) belongs to epoch (s - 1) // steps_per_epoch; a resumed run starts inside its epoch
    after the micro-batches the earlier steps used.
    """
    step = plan.first_step
    while True:
        epoch, done = divmod(step, plan.steps_per_epoch)
        batches = _epoch_batches(data, epoch, skip=done * plan.accum, planned=plan.steps_per_epoch * plan.accum)
        for _ in range(done, plan.steps_per_epoch):
            yield [next(batches) for _ in range(plan.accum)]
            step += 1


def _epoch_batches(data, epoch: int, skip: int, planned: int) -> Iterator[dict]:
    """This process's batches of `epoch` after the first `skip`; then its share again, as long as needed (the samples
    it cannot read count as skipped on the first pass only).
    DataError when the share holds less than half of the `planned` batches: the plan was wrong, not a few samples."""
    got = skip
    for batch in data.batches(epoch, skip):
        got += 1
        yield batch
    if got < planned / 2:
        raise DataError(
            f"epoch {epoch}: this process's share of the training data gave {got} of the {planned} batches the plan "
            "counts on (from the shard index, else the tar headers): the index overstates the samples, or most of "
            "them are unreadable (see the warnings above). Write the shards again with tools/make_shards.py, or check "
            "the data.")
    log.warning("epoch %d: this process's share of the data ran out before the planned end of the epoch (unreadable "
                "samples, uneven shards or a resume with another layout); reading it again from the start so that "
                "every process takes the same number of steps", epoch)
    while True:
        count = 0
        for batch in data.batches(epoch, 0):
            count += 1
            # this epoch's unreadable samples were counted on the first pass: a second reading loses none of its data
            yield {**batch, "skipped": 0, "skipped_shards": 0}
        if count == 0:
            raise DataError("no readable samples left in this process's share of the training data; check the data "
                            "(see the warnings above).")
