"""Supervised fine-tuning of a (pretrained) ViT classifier: the official MAE fine-tuning recipe.

AdamW with weight-decay exemptions and layer-wise lr decay (each block's lr scaled by
layer_decay ** (depth + 1 - block id)), lr = base_lr x effective batch / 256 with per-step warmup and
cosine decay to min_lr, drop path, RandAugment + random erasing, MixUp / CutMix with label smoothing
(soft-target cross entropy; plain cross entropy with label smoothing when both are off), optional
gradient clipping and mixed precision. The classifier may run at another resolution than the
checkpoint (`--resolution`): its position embeddings are resized on loading. The loop itself
is `train/loop.py`; evaluation and the best/last export are `tasks/classify.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

import torch
from omegaconf import DictConfig
from torch import nn

from mae_vit.checkpoint import LoadReport, load_weights
from mae_vit.data import mixup_cutmix
from mae_vit.errors import ConfigError
from mae_vit.tasks.classify import ClassifierTask, soft_target_cross_entropy
from mae_vit.train.batches import ShardBatches, train_batches
from mae_vit.train.build import build_adamw, build_model, check_encoder_loaded
from mae_vit.train.loop import train
from mae_vit.train.run_config import FromRun, encoder_config_from_run, naming_given_keys, user_set_keys

log = logging.getLogger("mae_vit")


def finetune(cfg: DictConfig, *, user_keys: Collection[str] | None = None) -> dict:
    """Run (or resume) fine-tuning as configured (a FinetuneConfig); returns the summary of the run.

    A checkpoint of this project's runs gives the encoder's architecture and normalisation
    (`encoder_config_from_run`) but for the keys the user gave: `user_keys` (`user_set_keys(cfg, argv)`;
    None: those that differ from the defaults).
    """
    cfg, origin = encoder_config_from_run(cfg, user_set_keys(cfg) if user_keys is None else user_keys)
    return train(cfg, Finetune(cfg, origin))


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


class Finetune(ClassifierTask):
    """The fine-tuning parts of classifier training."""

    name = "finetune"

    def __init__(self, cfg: DictConfig, origin: FromRun | None = None):
        super().__init__(cfg, img_size=cfg.resolution or cfg.model.img_size)
        self.mixer, self.origin = None, origin  # origin: what the config took from the checkpoint's run

    def make_model(self, num_classes: int, pretrained: dict | None) -> tuple[nn.Module, nn.Module]:
        a = self.cfg.augment
        self.mixer = mixup_cutmix(num_classes, mixup=a.mixup, cutmix=a.cutmix, label_smoothing=a.label_smoothing)
        self.smoothed = nn.CrossEntropyLoss(label_smoothing=a.label_smoothing)
        if self.origin is not None:
            log.info("%s", self.origin)
        with naming_given_keys(self.origin):
            net, report = build_finetune_model(self.cfg.model, img_size=self.img_size, num_classes=num_classes,
                                               pretrained=pretrained, source=self.checkpoint)
        if pretrained is not None:
            log.info("loaded %s: %s", self.checkpoint, report)
        elif self.checkpoint is None:
            log.warning("no --checkpoint given: the model trains FROM SCRATCH (random initialisation), the baseline "
                        "that pretraining is measured against. Pass --checkpoint RUN_DIR_OR_FILE to fine-tune "
                        "pretrained weights.")
        return net, net

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return build_adamw(model, self.cfg.optim, layer_decay=self.cfg.optim.layer_decay)

    def check(self, resuming: bool) -> None:
        a = self.cfg.augment
        on_device = next((k for k in ("in_memory", "gpu_decode") if self.cfg.data.get(k)), None)
        if on_device and (a.randaug_num_ops or a.reprob):
            raise ConfigError(
                f"data.{on_device}=true augments on the device with crop, flip and MixUp/CutMix only; it has no "
                f"RandAugment (augment.randaug_num_ops={a.randaug_num_ops}) and no random erasing (augment.reprob="
                f"{a.reprob}). Set augment.randaug_num_ops=0 augment.reprob=0 to train without them, or "
                f"data.{on_device}=false to keep them.")
        super().check(resuming)

    def make_train_data(self, val: ShardBatches | None, resumed: bool) -> tuple:
        data = train_batches(self.train_urls, self.cfg, "finetune", accelerator=self.accelerator,
                             img_size=self.img_size)
        return data, val

    def mix(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (inputs, labels) if self.mixer is None else self.mixer(inputs, labels)

    def criterion(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.mixer is None:
            return self.smoothed(logits.float(), targets)
        return soft_target_cross_entropy(logits, targets)
