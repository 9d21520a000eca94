"""Visualise a checkpoint: the ViT-paper figures of what its encoder learned and, for an MAE, reconstructions.

The model is the one the checkpoint's run was trained as (`model_config_from_run`: defaults < the
run's config.yaml < the user's model.* keys; the weights decide probe_bn / global_pool / num_classes).
`num_images` images are drawn from data.val (else data.train; the synthetic demo shards without
--data), picked by `seed` through the loader's shuffle, and prepared with the evaluation transform
(the whole image unless data.crop_pct is set). `write_all_figures` then writes the figures and
summary.json into output_dir. One process on the CPU: a handful of images needs no accelerator.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from pathlib import Path

import torch
from omegaconf import DictConfig

from mae_vit.checkpoint import read_file, to_state_dict
from mae_vit.data import eval_transform, make_loader, read_index
from mae_vit.errors import ConfigError, DataError
from mae_vit.train.build import model_from_weights, resolve_data
from mae_vit.train.monitor import setup_logging
from mae_vit.train.run_config import model_config_from_run
from mae_vit.viz import write_all_figures

log = logging.getLogger("mae_vit")


def visualize(cfg: DictConfig, *, user_keys: Collection[str] = ()) -> dict:
    """Write the figures of `cfg.checkpoint` (VisualizeConfig) into `cfg.output_dir`; returns the summary dict.

    `user_keys`: the dotted keys the user set (`build.user_set_keys`); they win over the run's config.yaml.
    """
    setup_logging(True)
    if cfg.checkpoint is None:
        raise ConfigError("no checkpoint to visualise: pass --checkpoint PATH (a run directory such as "
                          "runs/pretrain, a .safetensors file in one, or an official MAE / timm weights file).")
    cfg = model_config_from_run(cfg.checkpoint, cfg, user_keys=user_keys)
    state_dict = to_state_dict(read_file(cfg.checkpoint))  # a bad path fails here, before any data is touched
    train_urls, val_urls = resolve_data(cfg)
    urls = val_urls or train_urls
    index = read_index(urls)
    # a classifier whose head is neither in the weights nor configured: any size will do, the head is not drawn
    fallback_classes = (index or {}).get("num_classes") or 1
    m, d = cfg.model, cfg.data
    model, _ = model_from_weights(m, state_dict, source=cfg.checkpoint, num_classes=fallback_classes)
    imgs = sample_images(urls, num_images=cfg.num_images, seed=cfg.seed, img_size=m.img_size, in_chans=m.in_chans,
                         mean=list(d.mean), std=list(d.std), crop_pct=d.crop_pct if d.crop_pct is not None else 1.0,
                         interpolation=d.interpolation, shuffle_buffer=d.shuffle_buffer)
    out_dir = Path(cfg.output_dir).expanduser()
    summary = write_all_figures(model, imgs, out_dir, mean=list(d.mean), std=list(d.std),
                                mask_ratios=list(cfg.mask_ratios), max_images=cfg.num_images, seed=cfg.seed)
    print(f"{m.name} from {cfg.checkpoint}, {imgs.shape[0]} images of {urls}:")
    for name in summary["files"]:
        print(f"  {out_dir / name}")
    for name, why in summary["skipped"].items():
        print(f"  ({name} skipped: {why})")
    return summary


def sample_images(urls: str, *, num_images: int, seed: int, img_size: int, in_chans: int, mean, std,
                  crop_pct: float | None, interpolation: str, shuffle_buffer: int) -> torch.Tensor:
    """`num_images` normalised images (B, C, img_size, img_size) from the shards, chosen by `seed`.

    The shards' order and a shuffle buffer of `shuffle_buffer` samples are seeded, so the same seed
    gives the same images. Fewer images come back when the shards hold fewer; none is a DataError.
    """
    tf = eval_transform(img_size, in_chans=in_chans, mean=mean, std=std, crop_pct=crop_pct,
                        interpolation=interpolation)
    loader = make_loader(urls, transform=tf, batch_size=num_images, num_workers=0, seed=seed, shuffle=True,
                         shuffle_buffer=shuffle_buffer, with_labels=False, in_chans=in_chans, drop_last=False)
    batch = next(iter(loader), None)
    if batch is None:
        raise DataError(f"no readable image in {urls}; check the data path (see the warnings above).")
    return batch["image"][:num_images]
