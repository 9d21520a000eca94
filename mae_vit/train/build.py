"""Turning a resolved config into the objects a loop needs: data URLs, normalisation, model, optimizer.

This is the one place where config sections are unpacked into explicit arguments; the library below
(models, data, optim) never sees a config object.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from accelerate import Accelerator
from omegaconf import DictConfig, OmegaConf

from mae_vit.checkpoint import LoadReport, load_weights
from mae_vit.config.checks import validate_config
from mae_vit.data import ensure_demo_shards, expand_urls, read_index
from mae_vit.data.urls import require_index, use_index
from mae_vit.errors import CheckpointError, ConfigError
from mae_vit.models import create_model
from mae_vit.train.optim import build_optimizer, param_groups
from mae_vit.train.run_config import model_config_from_run, user_set_keys

log = logging.getLogger("mae_vit")
DEMO_IMG_SIZE = 32  # the synthetic demo images are drawn at 32 px; transforms resize them to the model's size


def resolve_data(cfg: DictConfig, accelerator: Accelerator | None = None, *, counted: bool = True
                 ) -> tuple[str, str | None]:
    """(train_urls, val_urls). No `data.train`: the synthetic demo shards (written once into the cache).

    Local paths are checked here, before any model is built, so a typo fails in a second; so is `data.index` (read
    and matched to the data.train shards) and, when the training shards must be `counted` (the epoch plan), the
    index of remote ones. A null data.mean / data.std is filled in here (`fill_normalisation`), so config.yaml
    holds the numbers used.
    """
    train, val = _data_urls(cfg.data, accelerator)
    if cfg.data.train is not None and cfg.data.get("index"):
        use_index(train, cfg.data.index)
    if cfg.data.train is not None and counted:
        require_index(train)  # remote shards are counted from their index alone
    fill_normalisation(cfg, train if cfg.data.train is not None else None)  # the demo: ImageNet's (tuned with them)
    return train, val


# Used where neither the config nor the shards' index says: ImageNet's, per channel count
IMAGENET_MEAN, IMAGENET_STD = {3: [0.485, 0.456, 0.406], 1: [0.449]}, {3: [0.229, 0.224, 0.225], 1: [0.226]}


def shard_stats(urls: str | None, in_chans: int) -> dict | None:
    """The shards' own {"mean", "std"} from their index (make_shards' statistics), grey or RGB; None if absent."""
    stats = ((read_index(urls) if urls else None) or {}).get("stats") or {}
    return stats.get("grey" if in_chans == 1 else "rgb")


def fill_normalisation(cfg: DictConfig, urls: str | None) -> None:
    """Set a null data.mean / data.std to the shards' own statistics (make_shards' index: RGB or grey by
    model.in_chans), else to ImageNet's (0.5 for other channel counts); say which. `urls` None (the synthetic
    demo, whose recipe was tuned with ImageNet's: its kNN margin fell from +17.6 to +10.7 with its own): ImageNet's."""
    d, channels = cfg.data, cfg.model.in_chans
    if d.mean is not None and d.std is not None:
        return
    own = shard_stats(urls, channels)
    if own and len(own["mean"]) == channels:
        mean, std, source = own["mean"], own["std"], f"the statistics of the training shards ({urls}: their index)"
    else:
        mean, std = IMAGENET_MEAN.get(channels, [0.5] * channels), IMAGENET_STD.get(channels, [0.5] * channels)
        source = ("ImageNet's (the demo recipe was tuned with them)" if urls is None else
                  "ImageNet's (the training shards' index has no statistics: make_shards records them)")
    OmegaConf.update(cfg, "data.mean", list(mean) if d.mean is None else list(d.mean), merge=False)
    OmegaConf.update(cfg, "data.std", list(std) if d.std is None else list(d.std), merge=False)
    log.info("data.mean %s, data.std %s: %s", list(cfg.data.mean), list(cfg.data.std), source)
    validate_config(cfg)


def _data_urls(data: DictConfig, accelerator: Accelerator | None) -> tuple[str, str | None]:
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
    """Explicit create_model options from a `model` config section (a tool's section holds only what it uses)."""
    names = ["patch_size", "in_chans", "embed_dim", "depth", "num_heads", "pos_embed", "drop_path_rate",
             "grad_checkpointing"]
    names += ["norm_pix_loss", "decoder_embed_dim", "decoder_depth", "decoder_num_heads"] if mae else ["num_classes",
                                                                                                       "global_pool"]
    kw = {name: model.get(name) for name in names}
    return {"img_size": img_size or model.img_size, **{k: v for k, v in kw.items() if v is not None}}


def build_model(model: DictConfig, *, mae: bool, **extra) -> torch.nn.Module:
    if model.name.startswith("mae_") != mae:
        want = "an MAE model (mae_vit_...)" if mae else "a classifier (vit_..., without the mae_ prefix)"
        raise ConfigError(f"model.name={model.name!r}, but this tool needs {want}.")
    try:
        return create_model(model.name, **{**model_kwargs(model, mae=mae), **extra})
    except ValueError as e:  # sizes that do not fit together: patch vs image size, width vs heads
        raise ConfigError(f"the model settings do not fit together: {e}. Change model.img_size / model.patch_size "
                          "or model.embed_dim / model.num_heads (see --help).") from None


def build_adamw(model: torch.nn.Module, optim: DictConfig, *, layer_decay: float = 1.0):
    """AdamW over `param_groups`; its lr is set before every step by the loop's schedule."""
    groups = param_groups(model, optim.weight_decay, layer_decay=layer_decay)
    return build_optimizer("adamw", groups, lr=0.0, betas=tuple(optim.betas), fused=optim.fused)


# --------------------------------------------------------------------------------------------
# The model a checkpoint was trained as (evaluate, visualize, exports): see run_config.py
# --------------------------------------------------------------------------------------------

ENCODER_PREFIXES = ("patch_embed.", "blocks.", "cls_token")  # weights without which features mean nothing


def classifier_options(state_dict: dict, num_classes: int | None) -> dict:
    """Classifier options the weights decide: `probe_bn`, `global_pool` and (when not given) `num_classes`.

    - `head.1.weight` (a BatchNorm `head.0` before the linear layer): a linear-probe classifier.
    - `fc_norm.*`: global average pooling; a final `norm.*` without `fc_norm`: the class token.
    - `num_classes`: the given value, else the rows of the head's weight; None when neither.
    """
    probe_bn = "head.1.weight" in state_dict
    head = state_dict.get("head.1.weight" if probe_bn else "head.weight")
    out = {"probe_bn": probe_bn}
    if any(k.startswith("fc_norm.") for k in state_dict):
        out["global_pool"] = True
    elif any(k.startswith("norm.") for k in state_dict):
        out["global_pool"] = False
    if num_classes is None and head is not None and head.ndim == 2:
        num_classes = int(head.shape[0])
    out["num_classes"] = num_classes
    return out


def build_model_for_weights(model: DictConfig, state_dict: dict, *, num_classes: int | None = None) -> torch.nn.Module:
    """The model of `model.name` (MAE or classifier) shaped to take `state_dict` (see `classifier_options`).

    `num_classes` is the fallback for a classifier when neither `model.num_classes` nor the weights say.
    """
    mae = model.name.startswith("mae_")
    if mae:
        return build_model(model, mae=True)
    options = classifier_options(state_dict, model.num_classes)
    if options["num_classes"] is None:
        options["num_classes"] = num_classes
    if options["num_classes"] is None:
        raise ConfigError(f"cannot tell how many classes the classifier {model.name} has: the checkpoint has no head "
                          "and model.num_classes is not set. Set model.num_classes=K.")
    return create_model(model.name, **{**model_kwargs(model, mae=False), **options})


def model_from_weights(model: DictConfig, state_dict: dict, *, source: str | os.PathLike,
                       num_classes: int | None = None) -> tuple[torch.nn.Module, LoadReport]:
    """Build the model for `state_dict` (`build_model_for_weights`), load it, check the encoder was in it.

    Returns (model in eval mode, the LoadReport); the report is logged by `load_weights`. `source` (the
    checkpoint path) only names the file in errors. Note: `state_dict` may be changed (resized entries).
    """
    net = build_model_for_weights(model, state_dict, num_classes=num_classes)
    report = load_weights(net, state_dict)
    check_encoder_loaded(report, source)
    return net.eval(), report


def checkpoint_model(cfg: DictConfig, argv: Sequence[str]) -> tuple[DictConfig, torch.nn.Module]:
    """For the export tools: (cfg with the run's model section, the model loaded from cfg.checkpoint)."""
    from mae_vit.checkpoint import read_file, to_state_dict
    if cfg.checkpoint is None:
        raise ConfigError("nothing to export: pass --checkpoint PATH (a run directory or a weights file).")
    cfg = model_config_from_run(cfg.checkpoint, cfg, user_keys=user_set_keys(cfg, argv))
    model, _ = model_from_weights(cfg.model, to_state_dict(read_file(cfg.checkpoint)), source=cfg.checkpoint)
    return cfg, model


def check_encoder_loaded(report: LoadReport, checkpoint: str | os.PathLike) -> None:
    """CheckpointError when the encoder's own weights were not in the checkpoint (wrong file or model)."""
    missing = [k for k in report.missing if k.startswith(ENCODER_PREFIXES)]
    if missing:
        raise CheckpointError(
            f"{checkpoint} holds no weights for the encoder's {', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''} ({len(missing)} encoder tensors missing), so the results would "
            "describe a random network. Pass a checkpoint of this model (a run directory, its .safetensors, an "
            "official MAE .pth or timm weights) and set model.name to the model it was trained as."
        )
