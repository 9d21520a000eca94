"""Export to ONNX, for serving without PyTorch (onnxruntime, TensorRT, OpenVINO, ...).

    classifier  image (B, C, H, W) -> logits (B, K)
    MAE         image (B, C, H, W) -> features (B, 1 + L, D): the encoder without masking, after its final
                norm; token 0 is the class token (what kNN and the linear probe read)

The batch size is dynamic; the image size is the model's. Inputs are normalised images, as the model sees
them in training (the run's data.mean / data.std; they are written into the file's metadata). The graph
comes from torch's TorchScript-based exporter (`dynamo=False`: it needs no onnxscript) at opset 17, where
the fused attention has an ONNX form. When the `onnx` package is installed, the file is checked with
`onnx.checker` before it replaces anything.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from mae_vit.checkpoint import refuse_nonfinite
from mae_vit.errors import ConfigError
from mae_vit.files import atomic_path

OPSET = 17


class EncoderFeatures(nn.Module):
    """An MAE's encoder on whole images: (B, C, H, W) -> (B, 1 + L, D)."""

    def __init__(self, mae: nn.Module):
        super().__init__()
        self.mae = mae

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mae.forward_features(x)


def export_onnx(model: nn.Module, path: str | os.PathLike, *, mean=None, std=None) -> Path:
    """Write `model` (a classifier, or an MAE as its encoder) to `path` as ONNX; returns the path."""
    is_mae = hasattr(model, "decoder_blocks")
    net = (EncoderFeatures(model) if is_mae else model).eval()
    size = model.patch_embed.img_size
    example = torch.zeros(1, model.in_chans, *size)  # (not the projection's: a hybrid's takes the ResNet's map)
    output = "features" if is_mae else "logits"
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--output {path} is a folder; give the file to write, e.g. {path / 'model.onnx'}.")
    refuse_nonfinite(model.state_dict(), path)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the shape check is constant for a fixed size
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter: chosen, see the module doc
        torch.onnx.export(net, (example,), str(tmp), dynamo=False, opset_version=OPSET, input_names=["image"],
                          output_names=[output], dynamic_axes={"image": {0: "batch"}, output: {0: "batch"}})
        _check_and_describe(tmp, {"mae_vit.output": output, "mae_vit.mean": str(mean), "mae_vit.std": str(std)})
    return path


def _check_and_describe(file: Path, metadata: dict) -> None:
    """Add `metadata` and run onnx.checker when the onnx package is there (else the file stays as torch wrote it)."""
    try:
        import onnx
    except ImportError:
        return
    proto = onnx.load(str(file))
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(file))
