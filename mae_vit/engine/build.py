"""Turning a resolved config into the objects a loop needs: data URLs, model, optimizer, Accelerator.

This is the one place where config sections are unpacked into explicit arguments; the library below
(models, data, optim) never sees a config object.
"""

from __future__ import annotations

import logging

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from omegaconf import DictConfig

from ..data import ensure_demo_shards, expand_urls
from ..errors import ConfigError
from ..models import create_model
from .optim import build_optimizer, param_groups
from .schedule import accumulation_steps, scaled_lr

log = logging.getLogger("mae_vit")
DEMO_IMG_SIZE = 32  # the synthetic demo images are drawn at 32 px; transforms resize them to the model's size


def resolve_data(data: DictConfig, accelerator: Accelerator | None = None) -> tuple[str, str | None]:
    """(train_urls, val_urls). No `data.train`: the synthetic demo shards (written once into the cache).

    Local paths are checked here, before any model is built, so a typo fails in a second.
    """
    if data.train is None:
        def make():
            return ensure_demo_shards(data.cache_dir, num_samples=data.synthetic_samples,
                                      num_classes=data.synthetic_classes, img_size=DEMO_IMG_SIZE)
        if accelerator is not None:
            with accelerator.main_process_first():
                train, val = make()
        else:
            train, val = make()
        return train, data.val if data.val is not None else val
    expand_urls(data.train)
    if data.val is not None:
        expand_urls(data.val)
    return data.train, data.val


def model_kwargs(model: DictConfig, *, mae: bool, img_size: int | None = None) -> dict:
    """Explicit create_model options from the `model` config section."""
    kw = dict(img_size=img_size or model.img_size, patch_size=model.patch_size, in_chans=model.in_chans,
              pos_embed=model.pos_embed, drop_path_rate=model.drop_path_rate,
              grad_checkpointing=model.grad_checkpointing)
    if mae:
        kw.update(norm_pix_loss=model.norm_pix_loss, decoder_embed_dim=model.decoder_embed_dim,
                  decoder_depth=model.decoder_depth, decoder_num_heads=model.decoder_num_heads)
    else:
        kw.update(num_classes=model.num_classes, global_pool=model.global_pool)
    return {k: v for k, v in kw.items() if v is not None}


def build_model(model: DictConfig, *, mae: bool, **extra) -> torch.nn.Module:
    if model.name.startswith("mae_") != mae:
        want = "an MAE model (mae_vit_...)" if mae else "a classifier (vit_..., without the mae_ prefix)"
        raise ConfigError(f"model.name={model.name!r}, but this tool needs {want}.")
    return create_model(model.name, **{**model_kwargs(model, mae=mae), **extra})


def make_accelerator(mixed_precision: str, output_dir: str) -> Accelerator:
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.mixed_precision=fp16 needs a CUDA GPU; on CPU use 'no' or 'bf16'.")
    project = ProjectConfiguration(project_dir=output_dir, logging_dir=output_dir)
    return Accelerator(mixed_precision=mixed_precision, log_with="tensorboard", project_config=project)


def batch_plan(optim: DictConfig, batch_size: int, world_size: int) -> tuple[int, int, float]:
    """(effective batch, accumulation steps, peak lr): lr = base_lr x effective batch / 256 unless optim.lr."""
    effective = optim.effective_batch or batch_size * world_size
    accum = accumulation_steps(effective, batch_size, world_size)
    lr = optim.lr if optim.lr is not None else scaled_lr(optim.base_lr, effective)
    return effective, accum, lr


def build_adamw(model: torch.nn.Module, optim: DictConfig, lr: float, *, layer_decay: float = 1.0):
    groups = param_groups(model, optim.weight_decay, layer_decay=layer_decay)
    return build_optimizer("adamw", groups, lr=lr, betas=tuple(optim.betas))
