"""The MAE pretraining loop (Accelerate: one CPU, one or many GPUs, many nodes, the same code).

Per optimizer step: `accum` micro-batches (no gradient all-reduce but on the last), optional
gradient clipping, AdamW step with the lr of a pure per-step schedule. The loop never syncs the
host per step: loss sums and the non-finite check stay on the device until a logging step.
"""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig

from ..checkpoint import EXPORT_NAME, export_safetensors
from ..data import eval_transform, make_loader, pretrain_transform, read_index, steps_per_epoch
from ..eval import extract_features, knn_accuracy
from ..progress import Progress
from ..viz.io import save_png
from ..viz.reconstruction import reconstruction_grid
from .build import batch_plan, build_adamw, build_model, make_accelerator, resolve_data
from .optim import set_lr
from .runtime import (EpochBatches, log_training, NonFiniteGuard, optimizer_step, plan_steps, restore, RunDir,
                      save_checkpoint, setup_logging, StopSignal, TrainMeter, write_json)
from .schedule import lr_at

log = logging.getLogger("mae_vit")
METRICS_NAME = "metrics.json"  # the loss at the start and the end, and the pretrained-vs-random kNN check


def pretrain(cfg: DictConfig) -> dict:
    """Run (or resume) MAE pretraining as configured; returns a summary dict."""
    t = cfg.train
    run = RunDir(t.output_dir, extra_outputs=(METRICS_NAME,))
    train_urls, val_urls = resolve_data(cfg.data)  # bad paths fail here, before anything is built
    accelerator = make_accelerator(t.mixed_precision, str(run.path))
    setup_logging(accelerator.is_main_process)
    world, rank = accelerator.num_processes, accelerator.process_index
    resume_from = run.prepare(cfg, resume=t.resume, overwrite=t.overwrite, is_main=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    if cfg.data.train is None:
        train_urls, val_urls = resolve_data(cfg.data, accelerator)
        log.info("no data.train given: using the synthetic demo shards %s", train_urls)

    d, m, o = cfg.data, cfg.model, cfg.optim
    effective, accum, peak_lr = batch_plan(o, d.batch_size, world)
    micro_per_epoch = steps_per_epoch(train_urls, world_size=world, num_workers=d.num_workers,
                                      batch_size=d.batch_size, seed=t.seed)
    steps_per_ep, warmup_steps, total_steps, last_step = plan_steps(
        micro_per_epoch, accum=accum, epochs=o.epochs, warmup_epochs=o.warmup_epochs, max_steps=t.max_steps,
        what=f"{train_urls} ({d.batch_size} per batch, {world} process(es))")

    torch.manual_seed(t.seed)  # the same initial weights on every process
    model = build_model(m, mae=True)
    optimizer = build_adamw(model, o, peak_lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = restore(accelerator, resume_from, run)
    if accelerator.is_main_process:
        run.save_config(cfg)
    accelerator.init_trackers("logs")
    log.info("model %s (%.1fM parameters), %d process(es) x batch %d x %d accumulation = effective batch %d, "
             "peak lr %.3g, %d steps/epoch, %d steps in all", m.name, sum(p.numel() for p in model.parameters()) / 1e6,
             world, d.batch_size, accum, effective, peak_lr, steps_per_ep, total_steps)

    unwrapped = accelerator.unwrap_model(model)
    vis_imgs = _fixed_images(val_urls or train_urls, cfg) if accelerator.is_main_process else None
    guard = NonFiniteGuard(accelerator.device)
    stop = StopSignal()
    transform = pretrain_transform(m.img_size, in_chans=m.in_chans, mean=list(d.mean), std=list(d.std),
                                   crop_scale=tuple(d.crop_scale), interpolation=d.interpolation, hflip=d.hflip)
    bar = Progress(last_step, "pretrain", unit="step", initial=state.step) if accelerator.is_main_process else None
    last_ckpt = resume_from
    first_loss = last_loss = knn_top1 = None
    meter = TrainMeter(accelerator.device)
    model.train()

    def checkpoint() -> None:
        nonlocal last_ckpt
        guard.check(accelerator, last_ckpt)  # never save a diverged state over a good one
        last_ckpt = save_checkpoint(accelerator, run, state, t.keep_last)

    def compute_loss(batch):
        imgs = batch["image"].to(accelerator.device, non_blocking=True)
        loss, _, _ = model(imgs, mask_ratio=m.mask_ratio)
        return loss, imgs.shape[0]

    while state.step < last_step and state.epoch < o.epochs:
        epoch_micro = steps_per_epoch(train_urls, world_size=world, num_workers=d.num_workers,
                                      batch_size=d.batch_size, seed=t.seed, epoch=state.epoch) // accum * accum
        batches = EpochBatches(lambda skip: make_loader(
            train_urls, transform=transform, batch_size=d.batch_size, num_workers=d.num_workers, rank=rank,
            world_size=world, seed=t.seed, epoch=state.epoch, shuffle_buffer=d.shuffle_buffer, with_labels=False,
            in_chans=m.in_chans, pin_memory=accelerator.device.type == "cuda", skip_batches=skip),
            state.batches_in_epoch)
        while state.batches_in_epoch < epoch_micro and state.step < last_step:
            lr = lr_at(state.step, peak_lr=peak_lr, min_lr=o.min_lr, warmup_steps=warmup_steps, total_steps=total_steps)
            set_lr(optimizer, lr)
            optimizer_step(accelerator, model, optimizer, batches, meter, guard, state, accum=accum,
                           clip_grad=o.clip_grad, compute_loss=compute_loss)
            if bar:
                bar.update()
            if state.step % t.log_every == 0 or state.step == last_step:
                stats = log_training(accelerator, meter, guard, state, bar=bar, last_step=last_step, lr=lr,
                                     epoch_micro=epoch_micro, last_ckpt=last_ckpt)
                first_loss = stats["loss"] if first_loss is None else first_loss
                last_loss = stats["loss"]
                if stop.agreed(accelerator):
                    log.info("stop signal received: saving a checkpoint at step %d and stopping", state.step)
                    checkpoint()
                    accelerator.end_training()
                    return {"stopped": True, "step": state.step, "checkpoint": str(last_ckpt)}
            if state.step % t.vis_every == 0 and accelerator.is_main_process:
                _visualise(accelerator, unwrapped, vis_imgs, cfg, run, state.step)
            if state.step % t.save_every == 0:
                checkpoint()
        if state.batches_in_epoch >= epoch_micro:
            state.epoch += 1
            state.batches_in_epoch = 0
            if cfg.knn.every and val_urls and state.epoch % cfg.knn.every == 0:
                knn_top1 = knn_monitor(accelerator, unwrapped, train_urls, val_urls, cfg)
                accelerator.log({"val/knn_top1": knn_top1}, step=state.step)
                log.info("epoch %d: kNN top-1 %.2f%% (k=%d, T=%g)", state.epoch, knn_top1, cfg.knn.k,
                         cfg.knn.temperature)

    if bar:
        bar.close()
    checkpoint()
    if accelerator.is_main_process:
        _visualise(accelerator, unwrapped, vis_imgs, cfg, run, state.step)
        export_safetensors(unwrapped, run.path / EXPORT_NAME)
    versus = encoder_vs_random(accelerator, unwrapped, train_urls, val_urls, cfg) if cfg.knn.vs_random else None
    if versus:
        accelerator.log({"val/knn_top1": versus["pretrained"], "val/knn_top1_random_init": versus["random_init"]},
                        step=state.step)
    summary = {"task": "pretrain", "step": state.step, "epoch": state.epoch, "first_loss": first_loss,
               "last_loss": last_loss, "knn_top1": knn_top1, "vs_random": versus}
    if accelerator.is_main_process:
        write_json(run.path / METRICS_NAME, summary)
    log.info("done: step %d, loss %s -> %s; weights exported to %s", state.step, _fmt(first_loss),
             _fmt(last_loss), run.path / EXPORT_NAME)
    accelerator.end_training()
    return {**summary, "checkpoint": str(last_ckpt), "weights": str(run.path / EXPORT_NAME)}


def _fmt(x) -> str:
    return "?" if x is None else f"{x:.4f}"


def knn_monitor(accelerator, model, train_urls: str, val_urls: str, cfg: DictConfig) -> float:
    """kNN top-1 (%) of the encoder's class-token features: labelled train shards as the memory bank.

    Every process encodes its share of both sets (eval transform, no masking); the features are
    gathered once so that each process holds all of them, then classified with the weighted kNN.
    """
    m, d = cfg.model, cfg.data
    tf = eval_transform(m.img_size, in_chans=m.in_chans, mean=list(d.mean), std=list(d.std),
                        crop_pct=d.crop_pct, interpolation=d.interpolation)

    def features(urls):
        loader = make_loader(urls, transform=tf, batch_size=d.batch_size, num_workers=d.num_workers,
                             rank=accelerator.process_index, world_size=accelerator.num_processes, shuffle=False,
                             with_labels=True, in_chans=m.in_chans, drop_last=False)
        with accelerator.autocast():
            return extract_features(lambda x: model.forward_features(x)[:, 0].float(), loader, accelerator)

    was_training = model.training
    model.eval()
    (train_f, train_y), (val_f, val_y) = features(train_urls), features(val_urls)
    model.train(was_training)
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    return knn_accuracy(train_f, train_y, val_f, val_y, num_classes=num_classes, k=cfg.knn.k,
                        temperature=cfg.knn.temperature)


def encoder_vs_random(accelerator, model, train_urls: str, val_urls: str | None, cfg: DictConfig) -> dict | None:
    """kNN top-1 on the validation split of the trained encoder and of the same encoder at its random init.

    "Is my loss normal?" has no answer in the loss alone; this one does: an encoder that learned
    something useful beats its own starting point by a wide margin. The random encoder is rebuilt with
    the run's seed, so it is exactly the run's step 0. Needs labelled train and validation shards.
    """
    labelled = val_urls is not None and all((read_index(u) or {}).get("num_classes") for u in (train_urls, val_urls))
    if not labelled:
        log.info("no pretrained-vs-random kNN check: it needs labelled data.train and data.val shards (with index)")
        return None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)  # the same draw as the run's initial weights
        random_init = build_model(cfg.model, mae=True).to(accelerator.device)
    versus = {"pretrained": knn_monitor(accelerator, model, train_urls, val_urls, cfg),
              "random_init": knn_monitor(accelerator, random_init, train_urls, val_urls, cfg)}
    versus["gain"] = versus["pretrained"] - versus["random_init"]
    log.info("encoder check, kNN top-1 on the validation split (k=%d): pretrained %.1f%% vs the same encoder at "
             "random init %.1f%% (%+.1f points)", cfg.knn.k, versus["pretrained"], versus["random_init"],
             versus["gain"])
    return versus


def _fixed_images(urls: str, cfg: DictConfig, n: int = 8):
    """The first `n` images of the validation (else training) shards and a fixed mask, for the grids."""
    m, d = cfg.model, cfg.data
    tf = eval_transform(m.img_size, in_chans=m.in_chans, mean=list(d.mean), std=list(d.std), crop_pct=1.0,
                        interpolation=d.interpolation)
    loader = make_loader(urls, transform=tf, batch_size=n, num_workers=0, shuffle=False, with_labels=False,
                         in_chans=m.in_chans, drop_last=False)
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
    save_png(grid, run.path / "reconstructions" / f"step_{step:07d}.png")
    tracker = accelerator.get_tracker("tensorboard", unwrap=True)
    if hasattr(tracker, "add_image"):
        tracker.add_image("reconstruction", grid, step)
