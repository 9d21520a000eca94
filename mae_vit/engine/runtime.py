"""What every training loop shares: the run directory, atomic checkpoints, resume, logging, guards.

Run directory layout (`train.output_dir`):
    config.yaml                 the resolved config of the run
    checkpoints/step_000500/    Accelerate `save_state` (model, optimizer, scaler, RNG states per
                                process) + `trainer_state.json` (step, epoch, data position) + `COMPLETE`
    logs/                       TensorBoard event files
    model.safetensors           the exported weights (official key names), written at the end

Checkpoints are written to `checkpoints/.tmp-step_N`, completed with a `COMPLETE` marker and only then
renamed to `step_N`; resume only looks at complete `step_*` folders, so a checkpoint that was being
written when the process died is never taken for a good one. The last `keep_last` are kept.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ..config import save_config
from ..errors import ConfigError, DataError, NonFiniteLossError
from ..progress import format_seconds
from .schedule import schedule_steps

log = logging.getLogger("mae_vit")

COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class TrainerState:
    """Where a run is: optimizer steps done, the epoch it is in and how many batches of it were used."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` already consumed (the data position)
    skipped_samples: int = 0
    best_metric: float | None = None
    extra: dict = field(default_factory=dict)


class RunDir:
    """A run's output directory: layout, start-or-resume decision, checkpoint files.

    `extra_outputs`: names of further files a loop writes into the run directory (fine-tuning's
    `best.safetensors`, `metrics.json`, ...); an explicit overwrite deletes them with the rest.
    """

    def __init__(self, path: str | os.PathLike, extra_outputs: tuple[str, ...] = ()):
        self.path = Path(path).expanduser()
        self.extra_outputs = tuple(extra_outputs)
        self.checkpoints = self.path / "checkpoints"
        self.logs = self.path / "logs"
        self.config_file = self.path / "config.yaml"

    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoint folders, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        found = []
        for p in self.checkpoints.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir() and (p / COMPLETE).is_file() and (p / STATE_FILE).is_file():
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        ckpts = self.complete_checkpoints()
        return ckpts[-1] if ckpts else None

    def has_results(self) -> bool:
        """Anything worth keeping: a complete checkpoint or exported weights."""
        return self.latest() is not None or (self.path / "model.safetensors").exists()

    def prepare(self, cfg: DictConfig, *, resume: bool, overwrite: bool, is_main: bool) -> Path | None:
        """Decide between a fresh start and a resume; returns the checkpoint to resume from (or None).

        - resume=true and a complete checkpoint exists: resume from the newest one.
        - resume=false and the directory holds results: refuse unless overwrite=true (then the old
          checkpoints, logs and weights are deleted: the user asked for it by name).
        - otherwise: a fresh start (left-over half-written checkpoints are removed).
        """
        if is_main and self.checkpoints.is_dir():  # half-written checkpoints of a crashed run
            for p in self.checkpoints.glob(".tmp-*"):
                shutil.rmtree(p, ignore_errors=True)
        latest = self.latest()
        if latest is not None and resume:
            self._check_same_model(cfg)
            return latest
        if self.has_results() and not resume:
            if not overwrite:
                raise ConfigError(
                    f"the output directory {self.path} already holds a run (checkpoints or exported weights), and "
                    "train.resume=false asks to start over. Nothing was changed. Re-run without train.resume=false to "
                    "continue it, choose another --output-dir, or add train.overwrite=true to delete that run and start over."
                )
            if is_main:
                for sub in (self.checkpoints, self.logs):
                    shutil.rmtree(sub, ignore_errors=True)
                for name in ("model.safetensors", "config.yaml", *self.extra_outputs):
                    (self.path / name).unlink(missing_ok=True)
        return None

    def _check_same_model(self, cfg: DictConfig) -> None:
        if not self.config_file.is_file() or "model" not in cfg:
            return
        saved = OmegaConf.load(self.config_file)
        if "model" in saved and OmegaConf.to_container(saved.model) != OmegaConf.to_container(cfg.model):
            raise ConfigError(
                f"{self.path} holds a run of another model configuration (see {self.config_file}); resuming it with "
                f"different model.* settings would not fit its weights. Use the same model settings, another "
                "--output-dir, or train.resume=false train.overwrite=true to start over there."
            )

    def save_config(self, cfg: DictConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.config_file)


def read_state(ckpt: Path) -> TrainerState:
    with open(ckpt / STATE_FILE) as f:
        return TrainerState(**json.load(f))


def save_checkpoint(accelerator, run: RunDir, state: TrainerState, keep_last: int) -> Path:
    """Atomically write a checkpoint of the prepared objects plus `state`; keep the last `keep_last`.

    Every process must call this (Accelerate saves each process's RNG state).
    """
    final = run.checkpoints / f"step_{state.step:07d}"
    tmp = run.checkpoints / f".tmp-step_{state.step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(tmp / STATE_FILE, "w") as f:
            json.dump(asdict(state), f, indent=1)
        _fsync_dir(tmp)
        (tmp / COMPLETE).write_text(f"step {state.step} saved {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        if final.exists():  # the same step saved twice (e.g. a final save right after a periodic one)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in run.complete_checkpoints()[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _fsync_dir(path: Path) -> None:
    for p in path.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


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
            where = f"the last good checkpoint, untouched, is {last_good}" if last_good else "no checkpoint had been written yet"
            raise NonFiniteLossError(
                f"the loss became NaN or infinite at optimizer step {int(first) + 1}; the run stopped and {where}. "
                "Common fixes: a lower learning rate (optim.base_lr), gradient clipping (optim.clip_grad=1.0), "
                "train.mixed_precision=bf16 instead of fp16, or checking the input data for broken images."
            )


class StopSignal:
    """SIGTERM / SIGUSR1 (cluster pre-emption) ask the loop to save a checkpoint and stop cleanly."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
            if sig is not None:
                try:
                    signal.signal(sig, self._handler)
                except ValueError:  # not in the main thread
                    pass

    def _handler(self, signum, frame):
        self.requested = True

    def agreed(self, accelerator) -> bool:
        """True when any process got the signal (so that all stop at the same step)."""
        flag = torch.tensor(int(self.requested), device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum") > 0)


def setup_logging(is_main: bool) -> None:
    """Our messages at INFO on the main process only; Accelerate's per-save chatter stays quiet."""
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, format="%(message)s", force=True)
    logging.getLogger("accelerate").setLevel(logging.WARNING)


def write_json(path: str | os.PathLike, obj) -> Path:
    """Write `obj` as indented JSON atomically (a temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


class TrainMeter:
    """Loss and throughput between logging steps; the loss sum stays on the device until `flush`."""

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

    def add(self, loss: torch.Tensor, n: int) -> None:
        self.loss_sum += loss.detach().float()
        self.count += 1
        self.images += n

    def flush(self, accelerator, world: int) -> dict:
        """Mean loss over all processes since the last flush, images/s, data time, skipped samples (a collective)."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        totals = torch.tensor([self.count, self.skipped, self.data_time], device=self.device, dtype=torch.float64)
        loss = accelerator.reduce(self.loss_sum.clone(), reduction="sum").item()
        totals = accelerator.reduce(totals, reduction="sum").tolist()
        stats = {"loss": loss / max(totals[0], 1), "skipped": int(totals[1]), "img_s": self.images * world / elapsed,
                 "data_time": totals[2] / world / max(self.count, 1)}
        self._reset()
        return stats


class EpochBatches:
    """One epoch's batches of this rank, starting after `skip` (the resumed data position).

    `make(skip)` returns an iterable of batch dicts (with `skipped`, the bad samples behind them). The
    number of steps per epoch is planned from the shard index; if bad samples leave this rank short,
    it starts its share over (and says so) rather than leave the other ranks waiting.
    """

    def __init__(self, make, skip: int):
        self.make = make
        self.it = iter(make(skip))

    def next(self, meter: TrainMeter) -> dict:
        t0 = time.perf_counter()
        batch = next(self.it, None)
        if batch is None:
            log.warning("this rank ran out of batches before the planned end of the epoch (skipped samples?); "
                        "re-reading its shards from the start to keep all ranks in step")
            self.it = iter(self.make(0))
            batch = next(self.it, None)
            if batch is None:
                raise DataError("no readable samples left in this rank's shards; check the data (see the warnings).")
        meter.data_time += time.perf_counter() - t0
        meter.skipped += batch["skipped"]
        return batch


def report_progress(bar, state: TrainerState, last_step: int, stats: dict, lr: float) -> None:
    """Training stats on the progress bar (a terminal) or as a log line with the ETA (log files)."""
    text = f"loss {stats['loss']:.4f}  lr {lr:.2e}  {stats['img_s']:.0f} img/s"
    if bar is None:
        return
    if bar.enabled:
        bar.update(0, postfix=text)
    else:
        eta = bar.eta()
        log.info("step %d/%d  epoch %d  %s  skipped %d  eta %s", state.step, last_step, state.epoch, text,
                 state.skipped_samples, format_seconds(eta))


def optimizer_step(accelerator, model, optimizer, batches: EpochBatches, meter: TrainMeter, guard: NonFiniteGuard,
                   state: TrainerState, *, accum: int, clip_grad: float | None, compute_loss) -> None:
    """One optimizer step over `accum` micro-batches: no gradient all-reduce but on the last one.

    `compute_loss(batch) -> (loss, batch_size)` runs the forward pass of one micro-batch.
    """
    for micro in range(accum):
        batch = batches.next(meter)
        with accelerator.no_sync(model) if micro < accum - 1 else nullcontext():
            loss, n = compute_loss(batch)
            accelerator.backward(loss / accum)
        guard.update(loss, state.step)
        meter.add(loss, n)
        state.batches_in_epoch += 1
    if clip_grad:
        accelerator.clip_grad_norm_(model.parameters(), clip_grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state.step += 1


def log_training(accelerator, meter: TrainMeter, guard: NonFiniteGuard, state: TrainerState, *, bar, last_step: int,
                 lr: float, epoch_micro: int, last_ckpt: Path | None) -> dict:
    """At a logging step: stop on a non-finite loss, reduce the meter across processes, log and report."""
    guard.check(accelerator, last_ckpt)
    stats = meter.flush(accelerator, accelerator.num_processes)
    state.skipped_samples += stats["skipped"]
    accelerator.log({"train/loss": stats["loss"], "train/lr": lr, "train/images_per_s": stats["img_s"],
                     "train/data_time": stats["data_time"], "train/skipped_samples": state.skipped_samples,
                     "train/epoch": state.epoch + state.batches_in_epoch / epoch_micro}, step=state.step)
    report_progress(bar, state, last_step, stats, lr)
    return stats


def plan_steps(micro_per_epoch: int, *, accum: int, epochs: int, warmup_epochs: float, max_steps: int | None,
               what: str) -> tuple[int, int, int, int]:
    """(optimizer steps per epoch, warmup steps, total steps of the schedule, the step this run stops at).

    `micro_per_epoch` batches per process make `micro_per_epoch // accum` optimizer steps; the schedule
    spans `epochs`, a run may stop earlier at `max_steps`. `what` names the data in the error.
    """
    steps_per_epoch = micro_per_epoch // accum
    if steps_per_epoch == 0:
        raise DataError(
            f"one epoch of {what} gives {micro_per_epoch} batches per process, fewer than the {accum} needed "
            "for one optimizer step; lower data.batch_size or optim.effective_batch, or use more data."
        )
    warmup, total = schedule_steps(epochs, warmup_epochs, steps_per_epoch)
    return steps_per_epoch, warmup, total, (min(total, max_steps) if max_steps else total)


def restore(accelerator, resume_from: Path | None, run: RunDir) -> TrainerState:
    """Load the prepared objects and the trainer state of `resume_from`, or start a fresh state; say which."""
    if resume_from is None:
        log.info("starting a new run in %s", run.path)
        return TrainerState()
    accelerator.load_state(str(resume_from))
    state = read_state(resume_from)
    log.info("resuming from %s (step %d, epoch %d)", resume_from, state.step, state.epoch)
    return state
