"""MAE pretraining: what it hands the training loop (`loop.py`), and the checks it runs on the encoder.

The task: build the MAE (`model.*`) and AdamW (weight decay off for biases, norms and tokens), read
the unlabelled training shards with the pretraining transform (random resized crop + flip), and
compute the model's masked-patch loss. At epoch ends it can run a kNN monitor (`knn.every`), every
`train.vis_every` steps it draws the reconstructions of a fixed set of images, and at the end it
exports the weights and compares the encoder with its own random initialisation (`knn.vs_random`).
"""

from __future__ import annotations

import logging
import math

import torch
from omegaconf import DictConfig, OmegaConf

from mae_vit.checkpoint import EXPORT_NAME, export_safetensors
from mae_vit.data import make_loader, read_index
from mae_vit.eval import classifier_metrics, extract_features, knn_accuracy
from mae_vit.files import write_json
from mae_vit.tasks.online_probe import OnlineProbe, ProbeClassifier, probe_param_groups
from mae_vit.train.batches import eval_batches, train_batches, transform_for
from mae_vit.train.build import build_adamw, build_model, resolve_data
from mae_vit.train.loop import Task, train
from mae_vit.train.monitor import on_main_process, stop_requested
from mae_vit.train.run_config import run_metadata
from mae_vit.train.rundir import SWEEP_FILES, RunDir, TrainState
from mae_vit.viz.io import save_png
from mae_vit.viz.reconstruction import reconstruction_grid

log = logging.getLogger("mae_vit")
METRICS_NAME = "metrics.json"  # the loss at the start and the end, and the pretrained-vs-random kNN check


def pretrain(cfg: DictConfig) -> dict:
    """Run (or resume) MAE pretraining as configured; returns a summary dict."""
    return train(cfg, Pretrain(cfg))


class Pretrain(Task):
    name = "pretrain"
    outputs = (METRICS_NAME, *SWEEP_FILES)

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.knn_top1 = self.probe = self.probe_top1 = self.probe_loss = None
        self.probe_loss_sum, self.probe_batches = 0.0, 0  # the head's cross-entropy this epoch (on the device)
        self.eval_data = {}  # shards -> their evaluation batches, built once: in memory, or a loader with kept workers

    def eval_batches(self, urls: str):
        """Labelled batches of `urls` for evaluation (eval transform, file order); built once per set."""
        if urls not in self.eval_data:
            self.eval_data[urls] = eval_batches(urls, self.cfg, accelerator=self.accelerator)
        return self.eval_data[urls]

    def check(self, resuming: bool) -> None:
        if self.cfg.data.in_memory is None:  # the default: the small synthetic demo set in memory, shards streamed
            OmegaConf.update(self.cfg, "data.in_memory", self.cfg.data.train is None, merge=False)
        resolve_data(self.cfg)  # bad paths fail here, before anything is built

    def build_model(self, accelerator, resuming: bool) -> torch.nn.Module:
        self.accelerator = accelerator
        self.train_urls, self.val_urls = resolve_data(self.cfg, accelerator)
        if self.cfg.data.train is None:
            log.info("no data.train given: using the synthetic demo shards %s", self.train_urls)
        self.model = build_model(self.cfg.model, mae=True)  # the MAE: exported, checked, drawn
        log.info("model %s (%.1fM parameters)", self.cfg.model.name,
                 sum(p.numel() for p in self.model.parameters()) / 1e6)
        classes = (read_index(self.train_urls) or {}).get("num_classes")
        if self.cfg.online_probe and classes:
            self.probe = OnlineProbe(self.model, classes)  # trained together; the probe cannot change the MAE
            log.info("online probe: a linear head on the masked encoder's class token, %d classes", classes)
        return self.probe or self.model

    def build_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        optimizer = build_adamw(self.model, self.cfg.optim)
        if self.probe is not None:
            for group in probe_param_groups(self.probe):
                optimizer.add_param_group(group)
        return optimizer

    def build_data(self, run: RunDir, resumed: bool):
        self.run = run
        main = self.accelerator.is_main_process
        self.fixed = _fixed_images(self.val_urls or self.train_urls, self.cfg) if main else None
        return train_batches(self.train_urls, self.cfg, "pretrain", accelerator=self.accelerator,
                             labels=self.probe is not None)

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        imgs = batch["image"].to(self.accelerator.device, non_blocking=True)
        if self.probe is None:
            return model(imgs, mask_ratio=self.cfg.model.mask_ratio)[0]
        labels = batch["label"].to(self.accelerator.device, non_blocking=True)
        loss, probe_loss = model(imgs, labels, self.cfg.model.mask_ratio)
        self.probe_loss_sum, self.probe_batches = self.probe_loss_sum + probe_loss.detach(), self.probe_batches + 1
        return loss + (probe_loss - probe_loss.detach())  # the MAE loss in value; both in the gradient

    def after_step(self, step: int, state: TrainState, *, epoch_end: bool, last: bool) -> None:
        cfg = self.cfg
        if step % cfg.train.vis_every == 0 or last:
            on_main_process(self.accelerator, lambda: _visualise(self.accelerator, self.model, self.fixed, cfg,
                                                                 self.run, step))
        epoch = state.epoch
        if epoch_end and self.probe is not None:
            mean = self.accelerator.reduce(self.probe_loss_sum / max(self.probe_batches, 1), reduction="mean")
            self.probe_loss, self.probe_loss_sum, self.probe_batches = float(mean), 0.0, 0
            self.accelerator.log({"train/online_probe_loss": self.probe_loss}, step=step)
        if epoch_end and self.probe is not None and self.val_urls and _labelled(self.val_urls):
            probe = ProbeClassifier(self.probe, cfg.model.mask_ratio)
            self.probe_top1 = classifier_metrics(probe, self.eval_batches(self.val_urls).batches(), self.accelerator,
                                                 stop_requested)["top1"]
            self.accelerator.log({"val/online_probe_top1": self.probe_top1}, step=step)
            log.info("epoch %d: online probe top-1 %.2f%% on the validation split (its training cross-entropy %.3f; "
                     "chance: %.3f)", epoch, self.probe_top1, self.probe_loss,
                     math.log(self.probe.head[1].out_features))
        if epoch_end and cfg.knn.every and self.val_urls and epoch % cfg.knn.every == 0:
            self.knn_top1 = knn_monitor(self.accelerator, self.model, self.train_urls, self.val_urls, cfg,
                                        data=self.eval_batches)
            self.accelerator.log({"val/knn_top1": self.knn_top1}, step=step)
            log.info("epoch %d: kNN top-1 %.2f%% (k=%d, T=%g)", epoch, self.knn_top1, cfg.knn.k, cfg.knn.temperature)

    def finish(self, state: TrainState) -> dict:
        a, cfg = self.accelerator, self.cfg
        weights = self.run.path / EXPORT_NAME
        on_main_process(a, lambda: export_safetensors(self.model, weights, metadata=run_metadata(cfg)))
        versus = None
        if cfg.knn.vs_random:
            versus = encoder_vs_random(a, self.model, self.train_urls, self.val_urls, cfg, data=self.eval_batches)
        if versus:
            a.log({"val/knn_top1": versus["pretrained"], "val/knn_top1_random_init": versus["random_init"]},
                  step=state.step)
        summary = {"task": "pretrain", "step": state.step, "epoch": state.epoch, "first_loss": state.first_loss,
                   "last_loss": state.last_loss, "knn_top1": self.knn_top1, "online_probe_top1": self.probe_top1,
                   "online_probe_loss": self.probe_loss,
                   "vs_random": versus}
        on_main_process(a, lambda: write_json(self.run.path / METRICS_NAME, summary))
        log.info("done: step %d, loss %s -> %s; weights exported to %s", state.step, _fmt(state.first_loss),
                 _fmt(state.last_loss), weights)
        return {**summary, "weights": str(weights)}


def _labelled(urls: str) -> bool:
    return bool((read_index(urls) or {}).get("num_classes"))


def _fmt(x) -> str:
    return "?" if x is None else f"{x:.4f}"


def knn_monitor(accelerator, model, train_urls: str, val_urls: str, cfg: DictConfig,
                should_stop=stop_requested, data=None) -> float:
    """kNN top-1 (%) of the encoder's class-token features: labelled train shards as the memory bank.

    Every process encodes its share of both sets (eval transform, no masking); the features are
    gathered once on the device, so that each process holds all of them there, and each process scores
    its share of the validation features with the weighted kNN.
    A stop signal breaks it off (`should_stop`, the run's pre-emption flag): `StoppedBySignal` on every process.
    `data`: urls -> their evaluation batches (a run passes its kept ones); default: new ones (`eval_batches`).
    """
    data = data or (lambda urls: eval_batches(urls, cfg, accelerator=accelerator))

    def features(urls):
        with accelerator.autocast():
            return extract_features(lambda x: model.forward_features(x)[:, 0].float(), data(urls).batches(),
                                    accelerator, on_device=True, should_stop=should_stop)

    was_training = model.training
    model.eval()
    try:
        (train_f, train_y), (val_f, val_y) = features(train_urls), features(val_urls)
    finally:
        model.train(was_training)
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    return knn_accuracy(train_f, train_y, val_f, val_y, accelerator, num_classes=num_classes, k=cfg.knn.k,
                        temperature=cfg.knn.temperature)


def encoder_vs_random(accelerator, model, train_urls: str, val_urls: str | None, cfg: DictConfig,
                      data=None) -> dict | None:
    """kNN top-1 on the validation split of the trained encoder and of the same encoder at its random init.

    "Is my loss normal?" has no answer in the loss alone; this one does: an encoder that learned
    something useful beats its own starting point by a wide margin. The random encoder is rebuilt with
    the run's seed, so it is exactly the run's step 0. Needs labelled train and validation shards.
    """
    if val_urls is None or not (_labelled(train_urls) and _labelled(val_urls)):
        log.info("no pretrained-vs-random kNN check: it needs labelled data.train and data.val shards (with index)")
        return None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)  # the same draw as the run's initial weights
        random_init = build_model(cfg.model, mae=True).to(accelerator.device)
    versus = {"pretrained": knn_monitor(accelerator, model, train_urls, val_urls, cfg, data=data),
              "random_init": knn_monitor(accelerator, random_init, train_urls, val_urls, cfg, data=data)}
    versus["gain"] = versus["pretrained"] - versus["random_init"]
    log.info("encoder check, kNN top-1 on the validation split (k=%d): pretrained %.1f%% vs the same encoder at "
             "random init %.1f%% (%+.1f points)", cfg.knn.k, versus["pretrained"], versus["random_init"],
             versus["gain"])
    return versus


def _fixed_images(urls: str, cfg: DictConfig, n: int = 8):
    """The first `n` images of the validation (else training) shards and a fixed mask, for the grids."""
    loader = make_loader(urls, transform=transform_for(cfg, "eval", crop_pct=1.0), batch_size=n, num_workers=0,
                         shuffle=False, with_labels=False, in_chans=cfg.model.in_chans, drop_last=False)
    batch = next(iter(loader), None)
    return None if batch is None else batch["image"][:n]


def _visualise(accelerator, model, imgs, cfg: DictConfig, run: RunDir, step: int) -> None:
    """Original / masked / reconstruction grid of the fixed images (the same mask every time): TensorBoard + PNG."""
    if imgs is None:
        return
    noise = torch.rand(imgs.shape[0], model.patch_embed.num_patches, generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    with torch.no_grad(), accelerator.autocast():
        grid = reconstruction_grid(model, imgs.to(accelerator.device), mask_ratio=cfg.model.mask_ratio,
                                   mean=list(cfg.data.mean), std=list(cfg.data.std), noise=noise.to(accelerator.device))
    model.train(was_training)
    grid = grid.float().cpu()
    picture = run.path / "reconstructions" / f"step_{step:07d}.png"
    run.files.update(add=[picture])  # the run's own: an overwrite deletes it
    save_png(grid, picture)
    tracker = accelerator.get_tracker("tensorboard", unwrap=True)
    if hasattr(tracker, "add_image"):
        tracker.add_image("reconstruction", grid, step)
