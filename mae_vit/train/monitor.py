"""What watches a training loop without slowing it: loss meter, non-finite guard, stop signal, logging setup.

None of them syncs the host per step: sums and flags stay on the device until a logging step.
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

import torch

from mae_vit.errors import NonFiniteLossError


def setup_logging(is_main: bool) -> None:
    """Our messages at INFO on the main process only; Accelerate's per-save chatter stays quiet."""
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, format="%(message)s", force=True)
    logging.getLogger("accelerate").setLevel(logging.WARNING)


class NonFiniteGuard:
    """Remembers the first step whose loss was not finite, without a host sync per step.

    `update` runs on the device; `check` (at logging and before every checkpoint) syncs once and raises
    `NonFiniteLossError` naming the step, so a bad state is never saved over a good checkpoint.
    """

    def __init__(self, device):
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def update(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss.detach())
        self.first_bad = torch.where(bad & (self.first_bad < 0), torch.full_like(self.first_bad, step), self.first_bad)

    def check(self, accelerator, last_good: Path | None) -> None:
        first = accelerator.reduce(self.first_bad.clone(), reduction="max")
        if int(first) >= 0:
            self.first_bad.fill_(-1)  # reported once; a recovered run starts clean
            where = (f"the last good checkpoint, untouched, is {last_good}" if last_good else
                     "no checkpoint had been written yet")
            raise NonFiniteLossError(
                f"the loss became NaN or infinite at optimizer step {int(first)}; the run stopped and {where}. "
                "Common fixes: a lower learning rate (optim.base_lr), gradient clipping (optim.clip_grad=1.0), "
                "train.mixed_precision=bf16 instead of fp16, or checking the input data for broken images.",
                step=int(first),
            )


class StopSignal:
    """SIGTERM / SIGUSR1 (cluster pre-emption) ask the run to save a checkpoint and stop cleanly.

    One per run (`restore` puts the earlier handlers back at its end). The loop agrees on the stop between
    steps (`agreed`); evaluation and feature loops check `stop_requested()` between batches.
    """

    def __init__(self):
        _stop["signal"] = None
        self.previous = {}
        for sig in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
            if sig is not None:
                try:
                    self.previous[sig] = signal.signal(sig, self._handler)
                except ValueError:  # not in the main thread
                    pass

    @staticmethod
    def _handler(signum, frame):
        _stop["signal"] = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return _stop["signal"] is not None

    @property
    def reason(self) -> str:
        """The signal that arrived here, e.g. "SIGTERM" (or "a stop signal on another process")."""
        return _stop["signal"] or "a stop signal on another process"

    def agreed(self, accelerator) -> bool:
        """True when any process got the signal (so that all stop at the same step)."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor(int(self.requested), device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum") > 0)

    def restore(self) -> None:
        """The handlers from before the run; the flag is forgotten."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        _stop["signal"] = None


_stop: dict = {"signal": None}  # the signal that asked this process to stop (StopSignal's handler sets it)


def stop_requested() -> bool:
    """Whether SIGTERM / SIGUSR1 arrived during this run: the `should_stop` of evaluation and feature loops."""
    return _stop["signal"] is not None


class TrainMeter:
    """Loss, throughput and skipped samples between logging steps; the loss sum stays on the device."""

    def __init__(self, device):
        self.device = device
        self._reset()

    def _reset(self):
        self.loss_sum = torch.zeros((), device=self.device)
        self.count = 0
        self.images = 0
        self.data_time = 0.0
        self.skipped = 0
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, batch: dict) -> None:
        self.loss_sum += loss.detach().float()
        self.count += 1
        self.images += batch["image"].shape[0]
        self.skipped += batch.get("skipped", 0)

    def flush(self, accelerator) -> dict:
        """Mean loss over all processes since the last flush, images/s, data time, skipped samples (a collective)."""
        world = accelerator.num_processes
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        totals = torch.tensor([self.count, self.skipped, self.data_time], device=self.device, dtype=torch.float64)
        loss = accelerator.reduce(self.loss_sum.clone(), reduction="sum").item()
        totals = accelerator.reduce(totals, reduction="sum").tolist()
        stats = {"loss": loss / max(totals[0], 1), "skipped": int(totals[1]), "img_s": self.images * world / elapsed,
                 "data_time": totals[2] / world / max(self.count, 1)}
        self._reset()
        return stats


def on_main_process(accelerator, work) -> None:
    """Run `work()` on the main process only; if it fails, every process stops at once with that error.

    Without this, an exception in main-process-only code (writing a checkpoint or the exported weights)
    leaves the other processes waiting at the next collective until its timeout (30 minutes).
    """
    error = None
    if accelerator.is_main_process:
        try:
            work()
        except Exception as e:  # re-raised below, after every process has heard of it
            error = e
    if accelerator.num_processes > 1:
        failed = accelerator.reduce(torch.tensor(int(error is not None), device=accelerator.device), reduction="sum")
        if error is None and int(failed) > 0:
            raise RuntimeError("the main process failed while writing the run's files (its error is shown by the "
                               "main process); this process stops with it")
    if error is not None:
        raise error
