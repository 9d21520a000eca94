"""Supervised fine-tuning of a (pretrained) ViT classifier: the official MAE fine-tuning recipe.

AdamW with weight-decay exemptions and layer-wise lr decay (each block's lr scaled by
layer_decay ** (depth + 1 - block id)), lr = base_lr x effective batch / 256 with per-step warmup and
cosine decay to min_lr, drop path, RandAugment + random erasing, MixUp / CutMix with label smoothing
(soft-target cross entropy; plain cross entropy with label smoothing when both are off), optional
gradient clipping and mixed precision. The classifier may run at another resolution than the
checkpoint (`--resolution`): its position embeddings are resized on loading. The loop itself
(checkpoints, resume, evaluation, best/last export) is `engine/classify.py`.
"""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..checkpoint import LoadReport, load_weights
from ..data import finetune_transform, mixup_cutmix
from ..errors import ConfigError
from .build import build_adamw, build_model, check_encoder_loaded
from .classify import (ClassifierMode, DataContext, ShardBatches, eval_batches, soft_target_cross_entropy,
                       train_classifier)
from .runtime import RunDir

log = logging.getLogger("mae_vit")


def finetune(cfg: DictConfig) -> dict:
    """Run (or resume) fine-tuning as configured (a FinetuneConfig); returns the summary of the run."""
    _check_same_resolution(cfg)
    return train_classifier(cfg, Finetune(cfg))


def build_finetune_model(model: DictConfig, *, img_size: int, num_classes: int, pretrained: dict | None,
                         source: str | None = None) -> tuple[nn.Module, LoadReport | None]:
    """The classifier of `model` at `img_size` px with `num_classes` outputs, with `pretrained` loaded.

    `pretrained` is a state dict (e.g. `read_pretrained(path)`), or None to train from scratch.
    Position embeddings of another grid are resized; a head of another shape keeps its zero
    initialisation. CheckpointError when the encoder weights are not in `pretrained`. `source`
    names the checkpoint in messages.
    """
    net = build_model(model, mae=False, img_size=img_size, num_classes=num_classes)
    if pretrained is None:
        return net, None
    report = load_weights(net, pretrained, verbose=False)
    check_encoder_loaded(report, source or "the checkpoint")
    return net, report


class Finetune(ClassifierMode):
    """The fine-tuning parts of the classifier loop."""

    name = "finetune"

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.checkpoint = cfg.checkpoint
        self.img_size = cfg.resolution or cfg.model.img_size
        self.mixer = None
        self.criterion = None

    def build_model(self, num_classes: int, pretrained: dict | None) -> tuple[nn.Module, nn.Module]:
        a = self.cfg.augment
        self.mixer = mixup_cutmix(num_classes, mixup=a.mixup, cutmix=a.cutmix, label_smoothing=a.label_smoothing)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=a.label_smoothing)
        net, report = build_finetune_model(self.cfg.model, img_size=self.img_size, num_classes=num_classes,
                                           pretrained=pretrained, source=self.checkpoint)
        if pretrained is not None:
            log.info("loaded %s: %s", self.checkpoint, report)
        elif self.checkpoint is None:
            log.warning("no --checkpoint given: the model trains FROM SCRATCH (random initialisation), the baseline "
                        "that pretraining is measured against. Pass --checkpoint RUN_DIR_OR_FILE to fine-tune "
                        "pretrained weights.")
        return net, net

    def build_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        o = self.cfg.optim
        return build_adamw(model, o, lr, layer_decay=o.layer_decay)

    def data(self, ctx: DataContext) -> tuple:
        d, m, a = self.cfg.data, self.cfg.model, self.cfg.augment
        transform = finetune_transform(self.img_size, in_chans=m.in_chans, mean=list(d.mean), std=list(d.std),
                                       randaug_num_ops=a.randaug_num_ops, randaug_magnitude=a.randaug_magnitude,
                                       reprob=a.reprob, crop_scale=tuple(d.crop_scale),
                                       interpolation=d.interpolation, hflip=d.hflip)
        train = ShardBatches(ctx.train_urls, transform=transform, batch_size=d.batch_size,
                             num_workers=d.num_workers, rank=ctx.rank, world_size=ctx.world_size,
                             seed=self.cfg.train.seed, shuffle_buffer=d.shuffle_buffer, in_chans=m.in_chans,
                             pin_memory=ctx.accelerator.device.type == "cuda")
        val = None
        if ctx.val_urls is not None:
            val = eval_batches(ctx.val_urls, img_size=self.img_size, data=d, in_chans=m.in_chans, rank=ctx.rank,
                               world_size=ctx.world_size)
        return train, val

    def mix(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (inputs, labels) if self.mixer is None else self.mixer(inputs, labels)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.mixer is None:
            return self.criterion(logits.float(), targets)
        return soft_target_cross_entropy(logits, targets)


def _check_same_resolution(cfg: DictConfig) -> None:
    """A run resumed at another --resolution would not fit its own position embeddings: say so up front."""
    run = RunDir(cfg.train.output_dir)
    if not cfg.train.resume or run.latest() is None or not run.config_file.is_file():
        return
    saved = OmegaConf.load(run.config_file)
    if "resolution" not in saved:
        return
    before = saved.resolution or saved.get("model", {}).get("img_size")
    now = cfg.resolution or cfg.model.img_size
    if before is not None and before != now:
        raise ConfigError(
            f"{cfg.train.output_dir} holds a fine-tuning run at {before} px, but this command asks for {now} px; "
            "resuming it at another resolution would not fit its weights. Use the same --resolution, another "
            "--output-dir, or train.resume=false train.overwrite=true to start over there."
        )
