"""Speed yardstick for the MAE pretraining train step: images/s, FLOPs per image, FLOP/s, peak memory.

One train step is what pretraining does per batch, with pretraining's default switches: forward with random
masking (under bf16 autocast when chosen), backward, a fused AdamW step over the real parameter groups
(`param_groups(model, 0.05)`, betas 0.9 / 0.95) and `zero_grad(set_to_none=True)`, on the same random batch
every step. After `warmup` untimed steps (which also absorb torch.compile's compilation) each of `steps`
steps is timed on its own, with a CUDA synchronize on both sides on GPU; the median is reported, so that
one slow step (a page fault, a busy neighbour process) does not move the number.

FLOPs are counted by `flops.py`; MFU divides the achieved FLOP/s by the GPU's peak for the precision run
(`peaks.py`: bf16 dense, or TF32 / CUDA-core fp32 for fp32 rows).
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import sys
import time
from typing import Callable, ContextManager, List, Optional

import torch

from mae_vit.bench.flops import FLOP_NOTE, count_flops
from mae_vit.bench.peaks import peak_for
from mae_vit.errors import ConfigError
from mae_vit.models import MaskedAutoencoderViT, create_model
from mae_vit.train.optim import build_optimizer, param_groups

WEIGHT_DECAY = 0.05  # the MAE pretraining recipe; decides the parameter groups
LR, BETAS = 1.5e-4, (0.9, 0.95)  # the value of lr does not change the speed of a step


@dataclasses.dataclass
class BenchmarkResult:
    """The numbers of one benchmark run (all FLOP figures per image; see the module doc)."""

    model: str
    params: int                      # all parameters, fixed position tables included
    trainable_params: int
    device: str                      # e.g. "cpu (2 threads)" or the GPU's name
    precision: str                   # "fp32" | "bf16" (autocast)
    batch_size: int
    img_size: int
    mask_ratio: float
    compiled: bool
    warmup: int
    step_seconds: List[float]        # each timed step, in order
    step_seconds_median: float
    images_per_s: float              # batch_size / median step time
    train_flops_per_image: float     # forward + backward of the train step
    forward_flops_per_image: float   # forward only (encoder + decoder)
    encoder_forward_flops_per_image: float
    achieved_flops_per_s: float      # train_flops_per_image x images_per_s
    peak_memory_bytes: Optional[int]
    peak_memory_kind: str            # what peak_memory_bytes measures
    flop_note: str = FLOP_NOTE
    peak_flops_per_s: Optional[float] = None  # the GPU's peak for `precision` (peaks.py); None on a CPU
    peak_kind: str = ""                      # e.g. "H100 SXM bf16 dense", or why there is no peak
    mfu: Optional[float] = None              # achieved_flops_per_s / peak_flops_per_s


# ---------------------------------------------------------------------------------------------- choices


def resolve_device(device: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; "cpu", "cuda", "cuda:N" as given (ConfigError if absent)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not one of auto, cpu, cuda (or cuda:N).")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device 'cuda' was asked for, but torch sees no CUDA GPU on this machine (or this torch build "
            "has no CUDA support). Use --device cpu or --device auto."
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r} does not exist: torch sees {torch.cuda.device_count()} GPU(s).")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> bf16 where it is fast (train.device.fast_bf16: a CUDA GPU with bf16, a CPU with AMX), else
    fp32; "bf16" on any CPU is allowed (autocast)."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"precision {precision!r} is not one of auto, fp32, bf16.")
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "auto":
        from mae_vit.train.device import fast_bf16
        return "bf16" if fast_bf16(device) else "fp32"
    if precision == "bf16" and device.type == "cuda" and not cuda_bf16:
        raise ConfigError("this GPU does not support bf16; use --precision fp32 (or auto).")
    return precision


def autocast_factory(device: torch.device, precision: str) -> Callable[[], ContextManager]:
    """A function returning a fresh context for the forward pass: bf16 autocast or nothing."""
    if precision == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _check_sizes(batch_size: int, img_size: int, mask_ratio: float, steps: int, warmup: int) -> None:
    for name, value, low in (("batch size", batch_size, 1), ("image size", img_size, 1),
                             ("steps", steps, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name} must be an integer of at least {low}, got {value!r}.")
    if not 0 <= mask_ratio < 1:
        raise ConfigError(f"mask ratio must be in [0, 1), e.g. 0.75; got {mask_ratio!r}.")


def build_mae(name: str, img_size: int, **options) -> MaskedAutoencoderViT:
    """An MAE by name at `img_size` with norm_pix_loss (as pretrained); ConfigError for other models or sizes.

    `options` go to create_model (e.g. decoder_depth=2, in_chans=1).
    """
    if name.startswith("vit_"):
        raise ConfigError(
            f"{name} is a classifier; the benchmark measures MAE pretraining, so give an MAE model name "
            f"such as mae_{name} or mae_vit_base_patch16."
        )
    try:
        model = create_model(name, **{"img_size": img_size, "norm_pix_loss": True, **options})
    except ValueError as e:  # e.g. an image size the patch size does not divide
        raise ConfigError(f"cannot build {name} at {img_size} px: {e}") from None
    return model


# ---------------------------------------------------------------------------------------------- timing


def train_step(model, optimizer, imgs: torch.Tensor, mask_ratio: float, autocast) -> torch.Tensor:
    """One MAE pretraining step; returns the (detached) loss."""
    with autocast():
        loss = model(imgs, mask_ratio=mask_ratio)[0]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_rss_bytes() -> Optional[int]:
    """The process's peak resident set size so far (ru_maxrss: KiB on Linux, bytes on macOS); None on Windows."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"cpu ({threads} thread{'s' if threads != 1 else ''})"


def benchmark_train_step(
    model_name: str = "mae_vit_base_patch16",
    *,
    batch_size: int = 8,
    img_size: int = 224,
    mask_ratio: float = 0.75,
    device: str = "auto",
    precision: str = "auto",
    steps: int = 10,
    warmup: int = 3,
    compile_model: bool = False,
    seed: int = 0,
    model_options: Optional[dict] = None,
) -> BenchmarkResult:
    """Build the MAE `model_name`, count the FLOPs of its train step, then time `steps` steps.

    `model_options` are extra create_model options, e.g. {"decoder_depth": 2, "in_chans": 1}.
    Peak memory: on CUDA torch.cuda.max_memory_allocated over warmup and timed steps (model,
    optimizer state and activations); on CPU the growth of the process's peak RSS (ru_maxrss) from
    before the model is built -- zero when the process already peaked higher before this call.
    """
    _check_sizes(batch_size, img_size, mask_ratio, steps, warmup)
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)
    autocast = autocast_factory(dev, precision)
    rss_before = _peak_rss_bytes()

    torch.manual_seed(seed)
    model = build_mae(model_name, img_size, **(model_options or {})).to(dev).train()
    imgs = torch.randn(batch_size, model.in_chans, img_size, img_size, device=dev)  # (B, C, H, W)
    train_flops, forward_flops, encoder_flops = count_flops(model, imgs, mask_ratio, autocast)

    optimizer = build_optimizer("adamw", param_groups(model, WEIGHT_DECAY), lr=LR, betas=BETAS, fused=True)
    step_model = torch.compile(model) if compile_model else model
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for i in range(warmup + steps):
        synchronize(dev)
        start = time.perf_counter()
        train_step(step_model, optimizer, imgs, mask_ratio, autocast)
        synchronize(dev)
        if i >= warmup:
            times.append(time.perf_counter() - start)

    if dev.type == "cuda":
        peak, peak_kind = torch.cuda.max_memory_allocated(dev), "CUDA max_memory_allocated"
    else:
        rss_after = _peak_rss_bytes()
        peak = None if rss_before is None else rss_after - rss_before
        peak_kind = "CPU peak RSS growth (ru_maxrss)"

    median = statistics.median(times)
    per_image = train_flops / batch_size
    top, kind = peak_for(device_name(dev), precision) if dev.type == "cuda" else (None, "a CPU: no peak table")
    return BenchmarkResult(
        model=model_name,
        params=sum(p.numel() for p in model.parameters()),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        device=device_name(dev),
        precision=precision,
        batch_size=batch_size,
        img_size=img_size,
        mask_ratio=mask_ratio,
        compiled=compile_model,
        warmup=warmup,
        step_seconds=times,
        step_seconds_median=median,
        images_per_s=batch_size / median,
        train_flops_per_image=per_image,
        forward_flops_per_image=forward_flops / batch_size,
        encoder_forward_flops_per_image=encoder_flops / batch_size,
        achieved_flops_per_s=per_image * batch_size / median,
        peak_memory_bytes=peak,
        peak_memory_kind=peak_kind,
        peak_flops_per_s=top,
        peak_kind=kind,
        mfu=top and per_image * batch_size / median / top,
    )


# ---------------------------------------------------------------------------------------------- output
