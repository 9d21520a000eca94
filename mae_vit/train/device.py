"""The device side of a run: the Accelerator (mixed precision, TF32, trackers) and torch.compile.

    fast_bf16(device)        whether bf16 autocast is fast there (train.mixed_precision=auto)
    make_accelerator(...)    the run's Accelerator, trackers checked first
    compiled(model, on)      torch.compile with an eager fallback (train.compile)
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from collections.abc import Sequence

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration

from mae_vit.config.schema import TRACKERS
from mae_vit.errors import ConfigError

log = logging.getLogger("mae_vit")


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast speeds `device` up: a CUDA GPU with bf16, or a CPU with AMX tiles (Intel Xeon 4th
    generation and later: the demo's step takes half the fp32 time). On other CPUs bf16 is emulated, and slower."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


def make_accelerator(output_dir: str, mixed_precision: str = "no", tf32: bool = True,
                     trackers: Sequence[str] = ("tensorboard",)) -> Accelerator:
    """The run's Accelerator: mixed_precision "auto" is bf16 where it is fast (`fast_bf16`), else "no"; `tf32`
    for fp32 matmuls on a GPU; `trackers` (train.trackers) are Accelerate's `log_with`, each checked first."""
    missing = [t for t in trackers if importlib.util.find_spec(TRACKERS[t]) is None]
    if missing:
        raise ConfigError(f"train.trackers lists {', '.join(missing)}, but this Python has no {', '.join(TRACKERS[t] for t in missing)} "
                          f"package: install it (pip install {' '.join(TRACKERS[t] for t in missing)}) or remove it from "
                          f"train.trackers (now {list(trackers)}). Nothing was written.")
    if mixed_precision == "auto":
        mixed_precision = "bf16" if fast_bf16(torch.device("cuda" if torch.cuda.is_available() else "cpu")) else "no"
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.mixed_precision=fp16 needs a CUDA GPU; on CPU use 'no' or 'bf16'.")
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(tf32)
    # Accelerate keeps one mixed-precision setting per process; a second run in the same Python process (a
    # notebook: pretrain, then probe) may ask for another one. Keep the process group, forget the rest.
    AcceleratorState._reset_state(reset_partial_state=False)
    project = ProjectConfiguration(project_dir=output_dir, logging_dir=output_dir)
    # cpu=True without CUDA: processes started by `accelerate launch --multi_gpu` or torchrun on a machine
    # without GPUs then form a gloo (MULTI_CPU) group instead of each running alone.
    return Accelerator(mixed_precision=mixed_precision, log_with=list(trackers), project_config=project,
                       cpu=not torch.cuda.is_available())


def compiled(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """`torch.compile(model)` when enabled and torch can compile here; else the model, with one log line.

    Dynamo's suppress_errors makes a graph that fails to compile run eagerly instead of stopping the run.
    The compiled wrapper shares its parameters with `model`: checkpoints and evaluation use `model`.
    """
    if not enabled:
        return model
    try:
        import torch._dynamo
        torch._dynamo.config.suppress_errors = True
        if not torch.cuda.is_available() and shutil.which(os.environ.get("CXX", "c++")) is None:
            raise RuntimeError("torch.compile needs a C++ compiler on a CPU and none was found")
        return torch.compile(model)
    except Exception as error:  # an unsupported Python or platform: train eagerly, say so once
        log.warning("train.compile=true, but torch cannot compile here (%s): training without it", error)
        return model
