"""`create_model(name, **overrides)`: every model of the toolkit by name.

Names:
- `mae_vit_{size}_patch{P}`: MAE pretraining model (official aliases `mae_vit_base_patch16`,
  `mae_vit_large_patch16`, `mae_vit_huge_patch14` are members of this family);
- `vit_{size}_patch{P}`: classifier (zero-initialised head);
- `mae_vit_{size}_hybrid_{r18,r34,r50}`, `vit_{size}_hybrid_{r18,r34,r50}`: the ViT paper's hybrid,
  tokens from the first `hybrid_stages` (default 3, stride 16) stages of a ResNet;
with size in mini (the CPU demo's: 128 wide, 6 blocks) / tiny / small / base / large / huge and any
patch size P.
"""

from __future__ import annotations

import difflib
import re

from torch import nn

from mae_vit.errors import ConfigError
from mae_vit.models.classifier import ViTClassifier
from mae_vit.models.hybrid import RESNETS
from mae_vit.models.mae import MaskedAutoencoderViT
from mae_vit.models.vit import SIZES

_NAME = re.compile(r"^(?P<mae>mae_)?vit_(?P<size>[a-z]+)_(?:patch(?P<patch>\d+)|hybrid_(?P<cnn>r\d+))$")

ENCODER_OPTIONS = {"img_size", "patch_size", "in_chans", "drop_path_rate", "pos_embed", "grad_checkpointing",
                   "hybrid_stages", "mlp_ratio", "embed_dim", "depth", "num_heads"}
MAE_OPTIONS = {"norm_pix_loss", "decoder_embed_dim", "decoder_depth", "decoder_num_heads"}
CLASSIFIER_OPTIONS = {"num_classes", "global_pool", "probe_bn"}
# the MAE paper's decoder: 512 wide, 8 deep, 16 heads
MAE_DECODER = {"decoder_embed_dim": 512, "decoder_depth": 8, "decoder_num_heads": 16}


def model_names(patch_sizes=(4, 8, 14, 16)) -> list[str]:
    """Example names (any patch size is accepted; these are listed in errors and help)."""
    out = []
    for prefix in ("mae_vit", "vit"):
        for size in SIZES:
            out += [f"{prefix}_{size}_patch{p}" for p in patch_sizes]
            out += [f"{prefix}_{size}_hybrid_{cnn}" for cnn in RESNETS]
    return out


def _unknown(name: str) -> ConfigError:
    close = difflib.get_close_matches(name, model_names(), n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ConfigError(
        f"unknown model name {name!r}.{hint} Known names are mae_vit_{{size}}_patch{{P}} (MAE) and "
        f"vit_{{size}}_patch{{P}} (classifier) for size in {', '.join(SIZES)} and any patch size P, "
        f"and their hybrids {{mae_vit,vit}}_{{size}}_hybrid_{{{','.join(RESNETS)}}}; e.g. "
        "mae_vit_base_patch16, mae_vit_large_patch16, mae_vit_huge_patch14, vit_tiny_patch4."
    )


def create_model(name: str, **overrides) -> nn.Module:
    """Build a model by name; `overrides` change any constructor option (see the *_OPTIONS sets)."""
    m = _NAME.match(name)
    if m is None or m["size"] not in SIZES or (m["cnn"] and m["cnn"] not in RESNETS):
        raise _unknown(name)
    is_mae = m["mae"] is not None
    allowed = ENCODER_OPTIONS | (MAE_OPTIONS if is_mae else CLASSIFIER_OPTIONS)
    bad = sorted(set(overrides) - allowed)
    if bad:
        kind = "an MAE model" if is_mae else "a classifier"
        raise ConfigError(f"option(s) {', '.join(bad)} do not apply to {kind} ({name}); "
                          f"valid: {', '.join(sorted(allowed))}")
    width, depth, heads = SIZES[m["size"]]
    kwargs = dict(embed_dim=width, depth=depth, num_heads=heads, img_size=224)
    stages = overrides.pop("hybrid_stages", 3)
    if m["cnn"]:
        kwargs["hybrid"] = (m["cnn"], stages)
        if overrides.pop("patch_size", None) not in (None, 2 ** (stages + 1)):
            raise ConfigError(f"{name}: the patch size of a hybrid is its CNN stride, 2 ** (hybrid_stages + 1)")
    else:
        kwargs["patch_size"] = int(m["patch"])
    if is_mae:
        kwargs.update(MAE_DECODER)
    for key, value in overrides.items():
        if value is not None:
            kwargs[key] = value
    return (MaskedAutoencoderViT if is_mae else ViTClassifier)(**kwargs)
