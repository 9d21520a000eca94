"""Reading and writing model weights.

`load_weights(model, source)` is the one entry point for every format a user holds:
- this project's runs (a run directory: its exported `.safetensors`, else the newest checkpoint),
- official MAE `.pth` files (pretrain full / encoder-only, visualize, fine-tuned, linear probe),
- timm ViT state dicts, and any `.safetensors` file.
It unwraps `model` / `state_dict`, strips `module.` and `_orig_mod.` prefixes, resizes position
embeddings to the model's grid (2-D bicubic, as the official `interpolate_pos_embed`) and reports
missing and unexpected keys by name.

Safety: pickled files are read with `torch.load(weights_only=True)`. A file that needs arbitrary code
to unpickle is refused with a `CheckpointError`; its payload never runs. `argparse.Namespace` (the
`args` entry of official training checkpoints) is the one extra type allowed: it only holds values.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from mae_vit.errors import CheckpointError, NonFiniteLossError
from mae_vit.files import atomic_path
from mae_vit.layers import resize_pos_embed

log = logging.getLogger(__name__)

WRAPPER_KEYS = ("model", "state_dict", "model_state_dict", "module")
PREFIXES = ("module.", "_orig_mod.")
ONLINE_PROBE_PREFIX = "mae."  # checkpoints of pretraining with an online probe: the MAE, then the probe's head
EXPORT_NAME = "model.safetensors"  # what a pretraining / fine-tuning run exports into its directory
RUN_METADATA = "mae_vit.run"  # an export's metadata key: its run's model section (train/run_config.py)
CHECKPOINTS = "checkpoints"  # a run directory's checkpoint folders: checkpoints/step_N (see train/rundir.py)
COMPLETE = "COMPLETE"  # a checkpoint's manifest, written last: its files and their sizes
STATE_FILE = "trainer_state.json"  # a checkpoint's TrainState (train/rundir.py)
STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class LoadReport:
    """What `load_weights` did: keys the model kept at their own values, keys ignored, resizes."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # present but of another shape (e.g. a new head)

    def __str__(self) -> str:
        parts = []
        for label, keys in (("missing (kept as initialised)", self.missing), ("unexpected (ignored)", self.unexpected),
                            ("resized", self.resized), ("shape differs, kept as initialised", self.skipped)):
            if keys:
                parts.append(f"{label}: {_summarise(keys)}")
        return "; ".join(parts) if parts else "all keys matched"


def _summarise(keys: list[str]) -> str:
    """Collapse `blocks.3.attn.qkv.weight`-style lists into a readable line."""
    shown = ", ".join(keys[:8])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")


def is_complete(folder: Path) -> bool:
    """A checkpoint whose `COMPLETE` manifest lists files that are all there with their sizes."""
    return _manifest(folder) is not None


def _manifest(folder: Path) -> dict | None:
    """The `COMPLETE` manifest of a whole checkpoint folder (every listed file there with its size), else None."""
    try:
        manifest = json.loads((folder / COMPLETE).read_text())
        whole = all((folder / name).stat().st_size == size for name, size in manifest["files"].items())
        return manifest if whole else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The whole checkpoints (`checkpoints/step_N`) of a run directory, oldest first.

    Ordered by what they hold: the training samples seen (`trainer_state.json`), then the order they were
    saved in (the manifest's `serial`); never by the step number, which a resume with a bigger batch restarts
    lower. Pruning, resuming and `load_weights` of a run directory all use this order.
    """
    found = []
    for folder in (run_dir / CHECKPOINTS).glob("step_*") if (run_dir / CHECKPOINTS).is_dir() else ():
        manifest = _manifest(folder) if STEP_DIR.match(folder.name) else None
        if manifest is not None:
            try:
                samples = int(json.loads((folder / STATE_FILE).read_text())["samples_seen"])
            except (OSError, ValueError, KeyError, TypeError):
                samples = -1  # an older checkpoint: first, where resuming it is refused with a clear message
            found.append((samples, manifest.get("serial", -1), folder.name, folder))
    return [folder for *_, folder in sorted(found)]


def weights_in_run_dir(path: Path) -> Path:
    """A run directory -> its exported weights, else the model file of its newest whole checkpoint."""
    export = path / EXPORT_NAME
    if export.is_file():
        return export
    for ckpt in reversed(complete_checkpoints(path)):
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (ckpt / name).is_file():
                return ckpt / name
    candidates = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.pth")) + sorted(path.glob("*.pt"))
    if len(candidates) == 1:
        return candidates[0]
    raise CheckpointError(
        f"{path} is a directory without weights this toolkit can find: expected {EXPORT_NAME}, a completed "
        "checkpoints/step_* folder, or exactly one .safetensors/.pth/.pt file. Pass the weights file itself."
    )


def read_file(path: str | os.PathLike) -> dict:
    """Read a weights file (or a run directory) safely into a dict, without unwrapping."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path (a file or a run directory).")
    if path.is_dir():
        path = weights_in_run_dir(path)
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise CheckpointError(f"{path} is not a readable .safetensors file ({e}).") from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = re.findall(r"GLOBAL ([\w.]+)", str(e))
        if not unsafe:
            raise CheckpointError(f"{path} is not a readable checkpoint (it is not a PyTorch or pickle file).") \
                from None
        raise CheckpointError(
            f"refused to load {path}: unpickling it would call {unsafe[0]}, which is not part of plain tensors and "
            "containers. Such a file can run arbitrary code, so it is never executed here. If you trust "
            "it, re-save its state dict with torch.save(state_dict) or as .safetensors."
        ) from None
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e)[:200]}).") from None


def to_state_dict(obj) -> dict[str, torch.Tensor]:
    """Unwrap `{'model': ...}` / `{'state_dict': ...}` layers and strip DDP / compile prefixes; of a checkpoint
    with an online probe (`mae.*` and `head.*`), the MAE alone."""
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError("the checkpoint holds no tensors under 'model', 'state_dict' or at its top level.")
    out = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        changed = True
        while changed:
            changed = False
            for prefix in PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    if any(key.startswith(ONLINE_PROBE_PREFIX) for key in out):  # a pretraining checkpoint with its online probe
        out = {key[len(ONLINE_PROBE_PREFIX):]: v for key, v in out.items() if key.startswith(ONLINE_PROBE_PREFIX)}
    return out


def load_weights(model: nn.Module, source, *, strict: bool = False, verbose: bool = True) -> LoadReport:
    """Load `source` (path, run directory or state dict) into `model`; returns a `LoadReport`.

    Position embeddings of another grid are resized (`pos_embed` bicubic; the fixed
    `decoder_pos_embed` keeps the model's own table). A classifier head of another shape is left at
    its zero initialisation (fine-tuning on a new label set). Any other shape mismatch is an error.
    With `strict`, missing or unexpected keys are an error too.
    """
    sd = to_state_dict(read_file(source) if not isinstance(source, dict) else source)
    own = model.state_dict()
    report = LoadReport()
    for key in list(sd):
        if key not in own or sd[key].shape == own[key].shape:
            continue
        if key == "pos_embed" and hasattr(model, "grid_size"):
            sd[key] = resize_pos_embed(sd[key], model.grid_size)
            if sd[key].shape != own[key].shape:
                raise CheckpointError(f"pos_embed of shape {tuple(sd[key].shape)} cannot be resized to "
                                      f"{tuple(own[key].shape)}.")
            report.resized.append(key)
        elif key == "decoder_pos_embed" or key.startswith("head."):
            report.skipped.append(key)
            del sd[key]
        else:
            raise CheckpointError(
                f"checkpoint key {key} has shape {tuple(sd[key].shape)} but the model expects {tuple(own[key].shape)}: "
                "the checkpoint is for another model size, patch size or channel count. Build the matching model "
                "(model.name, model.patch_size, model.in_chans) or pick the matching checkpoint."
            )
    result = model.load_state_dict(sd, strict=False)
    report.missing = [k for k in result.missing_keys if k not in report.skipped]
    report.unexpected = list(result.unexpected_keys)
    if strict and (report.missing or report.unexpected):
        raise CheckpointError(f"checkpoint does not match the model exactly: {report}.")
    if verbose:
        if any(k.startswith("decoder") for k in report.missing):
            log.warning("the checkpoint has no decoder weights (an encoder-only file such as "
                        "mae_pretrain_vit_base.pth?): the decoder keeps its fresh initialisation")
        log.info("loaded weights: %s", report)
    return report


def export_safetensors(model_or_sd, path: str | os.PathLike, *, metadata: dict[str, str] | None = None) -> Path:
    """Write weights as `.safetensors` atomically (temp file in the same folder, then rename), with `metadata`
    in the file's header (a run's exports: its architecture under `RUN_METADATA`)."""
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, nn.Module) else model_or_sd
    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in to_state_dict(sd).items()}
    refuse_nonfinite(sd, path)
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata=metadata)
    return Path(path)


def nonfinite_tensors(sd: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of `sd` that hold a NaN or an infinity."""
    return [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def refuse_nonfinite(sd: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """NonFiniteLossError when `sd` holds a NaN or an infinity: a diverged model is never exported, in any format."""
    bad = nonfinite_tensors(sd)
    if bad:
        raise NonFiniteLossError(f"refused to write {path}: {len(bad)} of {len(sd)} tensors hold NaN or infinite "
                                 f"values ({_summarise(bad)}): the model diverged. Nothing was written.")


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a `.safetensors` file's header (the tensors are not read); CheckpointError if unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path} is not a readable .safetensors file ({e}).") from None
