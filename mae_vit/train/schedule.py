"""Learning-rate schedule and batch arithmetic, as pure functions of their arguments.

The schedule is the one of the official MAE recipes (pretraining, fine-tuning and linear probing):
linear warmup from 0 to the peak, then a half-cycle cosine down to `min_lr`. MAE evaluates it at
fractional epochs once per iteration; here it is a function of the optimizer step, which draws the
same curve. The peak follows the linear scaling rule lr = base_lr * effective_batch / 256.
"""

import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

from mae_vit.errors import ConfigError


def lr_at(step: float, *, peak_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate at optimizer step `step` (0-based).

    step < warmup_steps:           peak_lr * step / warmup_steps            (0 at step 0)
    warmup_steps <= step < total:  min_lr + (peak_lr - min_lr) * (1 + cos(pi * t)) / 2,
                                   t = (step - warmup_steps) / (total_steps - warmup_steps)
    step >= total_steps:           min_lr
    """
    if step < 0 or warmup_steps < 0 or total_steps < 0:
        raise ValueError(f"lr_at needs non-negative steps, got step={step}, warmup_steps={warmup_steps}, "
                         f"total_steps={total_steps}")
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def schedule_steps(epochs: float, warmup_epochs: float, steps_per_epoch: int) -> Tuple[int, int]:
    """(warmup_steps, total_steps) for a schedule given in epochs of `steps_per_epoch` optimizer steps.

    Fractional epochs are allowed; both counts are rounded to the nearest whole step.
    """
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    return round(warmup_epochs * steps_per_epoch), round(epochs * steps_per_epoch)


def seconds(duration: str) -> float:
    """'90s', '45m', '36h', '2d' -> seconds."""
    return float(duration[:-1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[duration[-1]]


def budget_steps(budget_s: float, elapsed_s: float, done: int, step_s: float, share: float = 0.95) -> int:
    """Total steps of a run that has `done` steps after `elapsed_s` seconds and takes `step_s` per step from
    now on, such that the steps end within `share` of `budget_s` (the rest is for evaluations and the end)."""
    return done + max(int((share * budget_s - elapsed_s) / step_s), 0)


def scaled_lr(base_lr: float, effective_batch: int) -> float:
    """The linear scaling rule of MAE: base_lr is the lr for a batch of 256 images."""
    return base_lr * effective_batch / 256


def accumulation_steps(effective_batch: Optional[int], batch_size: int, world_size: int) -> int:
    """Micro-batches accumulated per optimizer step so that one step sees `effective_batch` images.

    Each step sees batch_size x world_size images per micro-batch, so `effective_batch` must be a
    whole multiple of that; None means no accumulation (1). Raises ConfigError otherwise, saying
    which numbers would work.
    """
    per_micro_batch = batch_size * world_size
    if effective_batch is None:
        return 1
    if effective_batch <= 0 or per_micro_batch <= 0:
        raise ConfigError(
            f"optim.effective_batch ({effective_batch}), data.batch_size ({batch_size}) and the number of "
            f"processes ({world_size}) must all be positive."
        )
    if effective_batch % per_micro_batch == 0:
        return effective_batch // per_micro_batch
    below = effective_batch // per_micro_batch * per_micro_batch
    nearest = [n for n in (below, below + per_micro_batch) if n > 0]  # closest multiples on each side
    options = "optim.effective_batch=" + " or ".join(map(str, nearest))
    if effective_batch % world_size == 0:
        per_process = effective_batch // world_size
        divisors = [d for d in range(min(batch_size, per_process), 0, -1) if per_process % d == 0][:3]
        options += f", or data.batch_size={' / '.join(map(str, divisors))} (divisors of {per_process})"
    raise ConfigError(
        f"optim.effective_batch={effective_batch} is not a multiple of data.batch_size x processes = "
        f"{batch_size} x {world_size} = {per_micro_batch}, so it cannot be reached by accumulating whole "
        f"micro-batches. Use {options}."
    )


@dataclass(frozen=True)
class Plan:
    """A run's arithmetic, fixed before its first step: batches, steps and the lr schedule.

    One optimizer step takes `accum` micro-batches on each process (`effective_batch` images in
    all); an epoch of the schedule is `steps_per_epoch` steps; the run goes from `first_step` to
    `last_step` (<= `total_steps`, where the cosine ends).
    """

    effective_batch: int
    accum: int
    peak_lr: float
    min_lr: float
    steps_per_epoch: int
    warmup_steps: int
    total_steps: int
    last_step: int
    first_step: int

    def lr(self, step: int) -> float:
        """The lr of optimizer step `step` (1-based: the first step uses the schedule's value at 0)."""
        return lr_at(step - 1, peak_lr=self.peak_lr, min_lr=self.min_lr, warmup_steps=self.warmup_steps,
                     total_steps=self.total_steps)


def checked_peak_lr(optim, batch_size: int, world_size: int) -> float:
    """The schedule's peak lr (optim.lr, else base_lr x effective batch / 256); ConfigError when optim.min_lr is
    above it. The loop asks before it touches the run directory, so a refused run deletes nothing."""
    effective = optim.effective_batch or batch_size * world_size
    peak_lr = optim.lr if optim.lr is not None else scaled_lr(optim.base_lr, effective)
    if optim.min_lr > peak_lr:
        where = ("optim.lr" if optim.lr is not None else
                 f"optim.base_lr {optim.base_lr:g} x effective batch {effective} / 256")
        raise ConfigError(f"optim.min_lr ({optim.min_lr:g}) is above the peak lr ({peak_lr:.3g}, from {where}): the "
                          "schedule would rise instead of decay. Lower optim.min_lr (the MAE recipes use 0 for "
                          "pretraining, 1e-6 for fine-tuning) or raise the lr.")
    return peak_lr


def make_plan(optim, *, batch_size: int, world_size: int, max_steps: Optional[int], samples_per_epoch: int,
              samples_seen: int, batches_per_epoch: Callable[[], int], total_steps: Optional[int] = None) -> Plan:
    """The plan of a run from its `optim` config section and where its data stands.

    A fresh run (`samples_per_epoch` 0) fixes its epoch as the optimizer steps that every process's
    share of the data fills (`batches_per_epoch()`: full batches per process). A resumed run passes
    the saved figures, so that continued with another number of processes, batch size or workers it
    keeps its schedule and goes on after the same number of samples. `total_steps` (a time budget's
    fixed length) replaces the length `optim.epochs` gives.
    """
    effective = optim.effective_batch or batch_size * world_size
    accum = accumulation_steps(effective, batch_size, world_size)
    peak_lr = checked_peak_lr(optim, batch_size, world_size)
    fresh = samples_per_epoch == 0
    steps_per_epoch = batches_per_epoch() // accum if fresh else samples_per_epoch // effective
    if steps_per_epoch == 0:
        raise ConfigError(
            f"one epoch of the training data does not fill one optimizer step of {effective} images "
            f"({world_size} process(es) x data.batch_size {batch_size} x {accum} accumulation); lower data.batch_size "
            "or optim.effective_batch, or use more data.")
    warmup, total = schedule_steps(optim.epochs, optim.warmup_epochs, steps_per_epoch)
    if total_steps is not None:
        warmup, total = min(warmup, total_steps), total_steps
    return Plan(effective_batch=effective, accum=accum, peak_lr=peak_lr, min_lr=optim.min_lr,
                steps_per_epoch=steps_per_epoch, warmup_steps=warmup, total_steps=total,
                last_step=min(total, max_steps) if max_steps else total, first_step=samples_seen // effective)
