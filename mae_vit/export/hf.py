"""Export to the Hugging Face transformers layout: `ViTMAEForPreTraining` (an MAE) and
`ViTForImageClassification` (a class-token classifier), as a folder that `from_pretrained` loads.

    export_hf(model, "runs/pretrain/hf")   # config.json + model.safetensors

The weights are renamed to the hub's layout (the one of facebook/vit-mae-base): fused `qkv` split into
query / key / value, `blocks.i` -> `encoder.layer.i`, norms and MLP to their HF names. The config carries
our LayerNorm eps (1e-6, HF's default is 1e-12) and exact GELU, so the HF model computes what ours does:
with the same `noise` the MAE gives the same loss, prediction and mask (tested when transformers is
installed). A classifier with global average pooling (`fc_norm`) or a linear-probe BatchNorm has no HF
counterpart and is refused, and so is a hybrid (a ResNet stem instead of the patch projection: transformers'
ViT has no such stem). An MAE's config carries its mask ratio (`export_hf(..., mask_ratio=0.5)`; HF's default
is the paper's 0.75).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from mae_vit.checkpoint import export_safetensors
from mae_vit.errors import CheckpointError, ConfigError
from mae_vit.files import write_text
from mae_vit.layers import LN_EPS
from mae_vit.models.hybrid import HybridEmbed

_BLOCK = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
          "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}


def _blocks(sd: dict, ours: str, theirs: str, out: dict) -> None:
    """Transformer blocks `ours.i.*` -> `theirs.i.*`, the fused qkv split into query, key and value."""
    for key, value in sd.items():
        if not key.startswith(ours + "."):
            continue
        i, rest = key[len(ours) + 1:].split(".", 1)
        name, kind = rest.rsplit(".", 1)  # e.g. ("attn.qkv", "weight")
        if name == "attn.qkv":
            for part, chunk in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                out[f"{theirs}.{i}.attention.attention.{part}.{kind}"] = chunk.clone()
        else:
            out[f"{theirs}.{i}.{_BLOCK[name]}.{kind}"] = value


def _refuse_hybrid(model: nn.Module) -> None:
    if isinstance(model.patch_embed, HybridEmbed):
        raise ConfigError("this is a hybrid model: its tokens come from the stages of a ResNet stem, not from a "
                          "patch projection, and transformers' ViTMAE / ViT have no such stem, so a Hugging Face "
                          "export would lose it. Export it to ONNX instead (tools/export_onnx.py), or use its "
                          ".safetensors weights with this toolkit.")


def hf_state_dict(model: nn.Module) -> dict:
    """Our weights under the HF names of `ViTMAEForPreTraining` (an MAE) or `ViTForImageClassification`."""
    _refuse_hybrid(model)
    sd, out = model.state_dict(), {}
    out["vit.embeddings.cls_token"] = sd["cls_token"]
    out["vit.embeddings.position_embeddings"] = sd["pos_embed"]
    out["vit.embeddings.patch_embeddings.projection.weight"] = sd["patch_embed.proj.weight"]
    out["vit.embeddings.patch_embeddings.projection.bias"] = sd["patch_embed.proj.bias"]
    _blocks(sd, "blocks", "vit.encoder.layer", out)
    if hasattr(model, "decoder_blocks"):
        out["vit.layernorm.weight"], out["vit.layernorm.bias"] = sd["norm.weight"], sd["norm.bias"]
        for name in ("mask_token", "decoder_pos_embed", "decoder_embed.weight", "decoder_embed.bias",
                     "decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"):
            out[f"decoder.{name}"] = sd[name]
        _blocks(sd, "decoder_blocks", "decoder.decoder_layers", out)
        return out
    if "fc_norm.weight" in sd or "head.1.weight" in sd:
        raise CheckpointError("this classifier pools the patch tokens (fc_norm) or has a linear-probe BatchNorm: "
                              "HF's ViTForImageClassification reads the class token only. Export a classifier "
                              "trained with model.global_pool=false, or export the encoder as an MAE.")
    out["vit.layernorm.weight"], out["vit.layernorm.bias"] = sd["norm.weight"], sd["norm.bias"]
    out["classifier.weight"], out["classifier.bias"] = sd["head.weight"], sd["head.bias"]
    return out


def hf_config(model: nn.Module, *, mask_ratio: float = 0.75) -> dict:
    """The config.json that describes `model` to transformers; an MAE's with `mask_ratio`."""
    _refuse_hybrid(model)
    block = model.blocks[0]
    config = {"hidden_size": model.embed_dim, "num_hidden_layers": len(model.blocks),
              "num_attention_heads": block.attn.num_heads, "intermediate_size": block.mlp.fc1.out_features,
              "hidden_act": "gelu", "layer_norm_eps": LN_EPS, "qkv_bias": True,
              "image_size": model.grid_size[0] * model.patch_size,
              "patch_size": model.patch_size, "num_channels": model.in_chans,
              "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    if hasattr(model, "decoder_blocks"):
        dec = model.decoder_blocks[0]
        config.update(architectures=["ViTMAEForPreTraining"], model_type="vit_mae",
                      decoder_hidden_size=model.decoder_embed.out_features,
                      decoder_num_hidden_layers=len(model.decoder_blocks),
                      decoder_num_attention_heads=dec.attn.num_heads,
                      decoder_intermediate_size=dec.mlp.fc1.out_features, norm_pix_loss=model.norm_pix_loss,
                      mask_ratio=mask_ratio)
    else:
        config.update(architectures=["ViTForImageClassification"], model_type="vit",
                      num_labels=model.head.out_features)
    return config


def export_hf(model: nn.Module, folder: str | os.PathLike, *, mask_ratio: float = 0.75) -> Path:
    """Write `config.json` and `model.safetensors` that transformers' `from_pretrained(folder)` loads; an MAE
    masks `mask_ratio` of the patches there (the ratio it was trained with)."""
    folder = Path(folder)
    weights = {k: v.detach().cpu().contiguous() for k, v in hf_state_dict(model).items()}
    config = hf_config(model, mask_ratio=mask_ratio)
    export_safetensors(weights, folder / "model.safetensors")
    write_text(folder / "config.json", json.dumps(config, indent=1) + "\n")
    return folder

