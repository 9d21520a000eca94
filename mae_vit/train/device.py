"""The device side of a run: the Accelerator (mixed precision, TF32, trackers) and torch.compile.

    fast_bf16(device)        whether bf16 autocast is fast there (train.mixed_precision=auto)
    auto_precision()         what train.mixed_precision=auto means on this process's device
    make_accelerator(...)    the run's Accelerator, trackers checked first
    load_state(acc, folder)  accelerator.load_state, also for an fp16 resume of a checkpoint without scaler.pt
    compiled(model, on)      torch.compile with an eager fallback (train.compile)
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import SCALER_NAME, InitProcessGroupKwargs, ProjectConfiguration

from mae_vit.config.schema import TRACKERS
from mae_vit.errors import ConfigError

log = logging.getLogger("mae_vit")


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast speeds `device` up: a GPU with bf16 tensor cores (compute capability 8.0 and later:
    A100, L4, L40S, H100, H200; any ROCm GPU), or a CPU with AMX tiles (Intel Xeon 4th generation and later: the
    demo's step takes half the fp32 time). V100 and T4 (7.x) only emulate bf16, as other CPUs do: slower.

    This is `torch.cuda.is_bf16_supported(including_emulation=False)` asked of `device` itself: torch's function
    asks the current device (cuda:0 in every process until Accelerate picks each one's own), and with emulation
    counted it makes a tensor there, a CUDA context of several hundred MiB on cuda:0 from every process."""
    if device.type == "cuda":
        if torch.version.hip:
            return True
        index = device.index if device.index is not None else own_cuda_device().index
        return torch.cuda.get_device_properties(index).major >= 8  # reads properties: makes no context
    return device.type == "cpu" and getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


def own_cuda_device() -> torch.device:
    """The GPU Accelerate gives this process (its LOCAL_RANK under a launcher, else cuda:0), known before any
    process group or CUDA context exists."""
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def auto_precision() -> str:
    """train.mixed_precision=auto: "bf16" where `fast_bf16`; on a GPU before Ampere (V100, T4) "fp16", which
    Accelerate runs with a GradScaler (loss scaling): their fp16 tensor cores are about 8 times their fp32
    rate (V100 125 against 15.7 TFLOP/s), it is how the official MAE trained on V100s, and the run's non-finite
    loss guard and gradient clipping cover fp16's overflow risk; "no" (fp32) on a CPU without AMX."""
    if torch.cuda.is_available():
        device = own_cuda_device()
        choice = "bf16" if fast_bf16(device) else "fp16"
        if choice == "fp16":
            log.info("train.mixed_precision=auto: %s has no bf16 tensor cores (compute capability %d.x): fp16 with "
                     "loss scaling (a GradScaler)", device, torch.cuda.get_device_properties(device.index).major)
        return choice
    return "bf16" if fast_bf16(torch.device("cpu")) else "no"


def make_accelerator(output_dir: str, mixed_precision: str = "no", tf32: bool = True,
                     trackers: Sequence[str] = ("tensorboard",), collective_timeout: float = 1800.0) -> Accelerator:
    """The run's Accelerator: mixed_precision "auto" as `auto_precision` picks it; `tf32`
    for fp32 matmuls on a GPU; `trackers` (train.trackers) are Accelerate's `log_with`, each checked first;
    `collective_timeout` (seconds, train.collective_timeout): how long a collective waits for the other processes."""
    missing = [t for t in trackers if importlib.util.find_spec(TRACKERS[t]) is None]
    if missing:
        packages = [TRACKERS[t] for t in missing]
        raise ConfigError(f"train.trackers lists {', '.join(missing)}, but this Python has no {', '.join(packages)} "
                          f"package: install it (pip install {' '.join(packages)}) or remove it from "
                          f"train.trackers (now {list(trackers)}). Nothing was written.")
    if mixed_precision == "auto":
        mixed_precision = auto_precision()
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
                       cpu=not torch.cuda.is_available(),
                       kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=collective_timeout))])


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


def load_state(accelerator: Accelerator, folder) -> None:
    """`accelerator.load_state(folder)`, whatever precision saved it. Under fp16 the Accelerator holds a GradScaler
    and Accelerate loads `scaler.pt` unchecked; a checkpoint saved under bf16 or fp32 has none (FileNotFoundError),
    yet mixed precision may change on resume. Then everything else is restored, and the scaler the run has (a
    fresh one at a start) is kept, with a log line."""
    scaler = accelerator.scaler
    if scaler is None or (Path(folder) / SCALER_NAME).is_file():
        accelerator.load_state(str(folder))
        return
    log.info("%s has no %s (it was saved without fp16): restoring the rest and training on with a fresh GradScaler "
             "(initial loss scale %g)", folder, SCALER_NAME, scaler.get_scale())
    accelerator.scaler = None
    try:
        accelerator.load_state(str(folder))
    finally:
        accelerator.scaler = scaler
