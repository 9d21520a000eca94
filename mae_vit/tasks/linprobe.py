"""Linear probing: a BatchNorm + linear head on the frozen features of a pretrained encoder (MAE recipe).

The classifier has `probe_bn=True` (BatchNorm1d without affine parameters, eps 1e-6, before the
linear layer: keys `head.0` / `head.1` as in the official probe) and the class token (or, with
model.global_pool=true, the mean of the patch tokens) as features. Everything but the head is frozen
and stays in eval mode; only the head's parameters reach the optimizer: LARS with momentum, lr =
0.1 x effective batch / 256, warmup + cosine. Training images get RandomResizedCrop + flip.

`feature_cache=true` (small data sets): the features of the training set (evaluation transform, no
augmentation) and of the validation set are computed once, kept in memory and saved to
`features.pt` in the run directory (reused by a resumed run when they were made for the same model,
data and checkpoint); the epochs then run over the cached features -- many epochs in seconds. The
test split (`data.test`, evaluated once at the end) is not cached: its images go through the encoder.
The loop is `train/loop.py`; evaluation and the best/last export are `tasks/classify.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mae_vit.checkpoint import LoadReport, load_weights
from mae_vit.errors import ConfigError
from mae_vit.eval.features import extract_features
from mae_vit.eval.probe_sweep import probe_sweep
from mae_vit.files import write_atomic
from mae_vit.tasks.classify import FEATURES_NAME, ClassifierTask
from mae_vit.train.batches import ShardBatches, TensorBatches, train_batches, transform_for
from mae_vit.train.build import build_model, check_encoder_loaded
from mae_vit.train.loop import train
from mae_vit.train.monitor import on_main_process
from mae_vit.train.optim import build_optimizer, param_groups
from mae_vit.train.run_config import FromRun, encoder_config_from_run, naming_given_keys, user_set_keys

log = logging.getLogger("mae_vit")


def linprobe(cfg: DictConfig, *, user_keys: Collection[str] | None = None) -> dict:
    """Run (or resume) linear probing as configured (a LinprobeConfig); returns the summary of the run.

    The encoder's architecture and normalisation come from the checkpoint's run as in fine-tuning
    (`encoder_config_from_run`; `user_keys` win, None: the keys that differ from the defaults).
    """
    if cfg.data.batch_size < 2:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size}: the probe's BatchNorm needs at least 2 samples "
                          "per batch; use data.batch_size=2 or more.")
    cfg, origin = encoder_config_from_run(cfg, user_set_keys(cfg) if user_keys is None else user_keys)
    return train(cfg, Linprobe(cfg, origin))


class LinearProbe(nn.Module):
    """A ViT classifier of which only the head trains.

    Every parameter but the head's is frozen (requires_grad False) and the encoder always stays in
    eval mode: `train()` switches the head only (its BatchNorm collects batch statistics). Features
    are computed under torch.no_grad(). With `on_features = True` the inputs are precomputed
    features (B, D) instead of images (the feature cache). The classifier is held as `module` (the
    DDP convention), so checkpoint keys are `module.<classifier key>`, which `load_weights` reads.
    """

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.module = classifier
        self.on_features = False
        classifier.requires_grad_(False)
        classifier.head.requires_grad_(True)
        self.train()

    @property
    def classifier(self) -> nn.Module:
        return self.module

    def train(self, mode: bool = True) -> "LinearProbe":
        self.training = mode
        self.module.eval()
        self.module.head.train(mode)
        return self

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, D): what the head sees."""
        return self.module.pool(self.module.forward_features(images))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W), or features (B, D) when `on_features`, -> logits (B, K)."""
        features = inputs if self.on_features else self.features(inputs)
        return self.module.head(features)


def build_probe(model: DictConfig, *, num_classes: int, pretrained: dict | None,
                source: str | None = None) -> tuple[LinearProbe, LoadReport | None]:
    """The probe for `model` with `pretrained` (a state dict, or None: a random encoder) loaded.

    The head is then initialised afresh as the official probe does (weight ~ truncated normal,
    std 0.01, bias 0), even when the checkpoint had one. CheckpointError when the encoder's weights
    are not in `pretrained`; `source` names the checkpoint in messages.
    """
    net = build_model(model, mae=False, num_classes=num_classes, probe_bn=True)
    report = None
    if pretrained is not None:
        report = load_weights(net, pretrained, verbose=False)
        check_encoder_loaded(report, source or "the checkpoint")
    linear = net.head[1]
    nn.init.trunc_normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    return LinearProbe(net), report


def build_lars(probe: nn.Module, lr: float, *, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    """LARS over the trainable (head) parameters only."""
    return build_optimizer("lars", param_groups(probe, weight_decay), lr=lr, momentum=momentum)


class Linprobe(ClassifierTask):
    """The linear-probing parts of classifier training."""

    name = "linprobe"

    def __init__(self, cfg: DictConfig, origin: FromRun | None = None):
        super().__init__(cfg, img_size=cfg.model.img_size)
        self.origin = origin  # what the config took from the checkpoint's run

    def make_model(self, num_classes: int, pretrained: dict | None) -> tuple[nn.Module, nn.Module]:
        if self.origin is not None:
            log.info("%s", self.origin)
        with naming_given_keys(self.origin):
            probe, report = build_probe(self.cfg.model, num_classes=num_classes, pretrained=pretrained,
                                        source=self.checkpoint)
        if pretrained is not None:
            log.info("loaded %s: %s", self.checkpoint, report)
        elif self.checkpoint is None:
            log.warning("no --checkpoint given: probing a RANDOMLY INITIALISED encoder (a baseline, not a measure of "
                        "pretraining). Pass --checkpoint RUN_DIR_OR_FILE to probe pretrained features.")
        return probe, probe.classifier

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        o = self.cfg.optim
        return build_lars(model, 0.0, weight_decay=o.weight_decay, momentum=o.momentum)  # lr: set every step

    def make_train_data(self, val: ShardBatches | None, resumed: bool) -> tuple:
        cfg, a = self.cfg, self.accelerator
        if not cfg.feature_cache:
            return train_batches(self.train_urls, cfg, "linprobe", accelerator=a), val
        plain = ShardBatches(self.train_urls, cfg, transform_for(cfg, "eval"), accelerator=a, train=False)
        path = self.run.path / FEATURES_NAME
        cache = cached_features(self.model, a, plain, val, meta=self._cache_meta(), path=path, reuse=resumed)
        self.model.on_features = True
        self.cache = cache
        options = dict(batch_size=cfg.data.batch_size, rank=a.process_index, world_size=a.num_processes)
        train = TensorBatches(*cache["train"], seed=cfg.train.seed, **options)
        if cache["val"] is not None:
            val = TensorBatches(*cache["val"], train=False, **options)
        return train, val

    def image_model(self) -> nn.Module:
        self.model.on_features = False  # the test split is not cached: its images go through the frozen encoder
        return self.model

    def extra_results(self) -> dict:
        cache = getattr(self, "cache", None)
        if not (self.cfg.probe_sweep and cache and cache["val"] is not None):
            return {}
        result = probe_sweep(*cache["train"], *cache["val"], num_classes=self.num_classes, seed=self.cfg.train.seed)
        chosen = result["chosen"]
        log.info("probe sweep: %d heads (lr x weight decay) trained on %d cached training features; chosen on the "
                 "held-out %d: lr %g, weight decay %g (held-out top-1 %.2f%%) -> val top-1 %.2f%%",
                 len(result["heads"]), result["fit"], result["holdout"], chosen["lr"], chosen["weight_decay"],
                 chosen["heldout_top1"], result["test_top1"])
        return {"probe_sweep": result}

    def _cache_meta(self) -> dict:
        """What the cached features depend on: a cache made for other values is not reused."""
        d = self.cfg.data
        return {"model": OmegaConf.to_container(self.cfg.model), "checkpoint": self.checkpoint,
                "train": self.train_urls, "val": self.val_urls,
                "transform": {"mean": list(d.mean), "std": list(d.std), "crop_pct": d.crop_pct,
                              "interpolation": d.interpolation}}


def cached_features(probe: LinearProbe, accelerator, train: ShardBatches, val: ShardBatches | None, *, meta: dict,
                    path: Path, reuse: bool) -> dict:
    """{"train": (features (N, D), labels (N,)), "val": (...) or None}, the whole sets on every process.

    With `reuse` (a resumed run) `path` is read when it was made with the same `meta`; otherwise the
    features are extracted (each process its share, then gathered) and saved to `path` atomically.
    """
    if reuse and path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("meta") == meta:
            log.info("feature cache: reusing %s (%d train, %d val features)", path, saved["train_labels"].shape[0],
                     0 if saved["val_labels"] is None else saved["val_labels"].shape[0])
            return {"train": (saved["train_features"], saved["train_labels"]),
                    "val": None if saved["val_labels"] is None else (saved["val_features"], saved["val_labels"])}
        log.info("feature cache: %s was made for other settings; extracting the features again", path)

    def encode(images: torch.Tensor) -> torch.Tensor:
        with accelerator.autocast():
            return probe.features(images).float()  # (B, D)

    probe.eval()
    train_f, train_y = extract_features(encode, train.batches(), accelerator)
    val_f, val_y = extract_features(encode, val.batches(), accelerator) if val is not None else (None, None)
    probe.train()
    log.info("feature cache: extracted %d train and %d val features of width %d", train_y.shape[0],
             0 if val_y is None else val_y.shape[0], train_f.shape[1])
    saved = {"meta": meta, "train_features": train_f, "train_labels": train_y, "val_features": val_f,
             "val_labels": val_y}
    on_main_process(accelerator, lambda: write_atomic(path, lambda f: torch.save(saved, f)))
    return {"train": (train_f, train_y), "val": None if val_y is None else (val_f, val_y)}
