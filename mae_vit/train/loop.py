"""The one training loop: pretraining, fine-tuning and linear probing differ only in the `Task` they hand it.

Counted in optimizer steps: the lr, logging, checkpoints, epoch ends and the end of the run are
functions of the global step; the data position saved in a checkpoint is the number of samples the
steps used, so a run resumed with another number of processes, workers or batch size continues after
the same number of samples (`Plan`, `step_batches`). Per step, in order:

    lr -> accum micro-batches (no gradient all-reduce but on the last) -> clip -> optimizer step
       -> log (every train.log_every) -> task.after_step (epoch-end evaluation, pictures)
       -> checkpoint (every train.save_every, after an evaluation, at an epoch end when the task asks)
       -> stop on SIGTERM / SIGUSR1
          (after a checkpoint and stopped.json; `StoppedBySignal`, exit status 75: re-run to resume)

Evaluations and the final checks break off on such a signal too (`stop_if_asked`). The loop never syncs
the host per step: loss sums and the non-finite check stay on the device until a logging step
(`monitor.py`). Checkpoints are `rundir.py`; how a run starts on every process (the main process
decides whether and where to resume, all check they see its directory, seed + rank) is `start.py`.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate.utils import set_seed
from omegaconf import DictConfig
from tqdm.auto import tqdm

from mae_vit.errors import NonFiniteLossError, StoppedBySignal
from mae_vit.train.batches import step_batches
from mae_vit.train.device import compiled, load_state, make_accelerator
from mae_vit.train.monitor import NonFiniteGuard, StopSignal, TrainMeter, setup_logging
from mae_vit.train.optim import set_lr
from mae_vit.train.rundir import RunDir, TrainState, read_state, save_checkpoint
from mae_vit.train.schedule import Plan, budget_steps, checked_peak_lr, make_plan, seconds
from mae_vit.train.start import STOPPED_NAME, begin, check_same_run_dir, main_decides, write_stopped

log = logging.getLogger("mae_vit")
# With several processes, agreeing to stop is a collective: every few steps, not every step. Launchers and
# schedulers kill about 30 s after SIGTERM; a single process checks its own flag every step.
STOP_CHECK_EVERY = 5
MEASURED_STEPS = 20  # optim.time_budget: steps timed (after 2 that warm caches up) before the total is fixed


class Task:
    """What a training mode hands the loop (see `pretrain.py`, `classify.py`)."""

    name = "train"
    outputs: tuple[str, ...] = ()  # files it writes into the run directory (deleted by an overwrite)
    parent: str | None = None      # the checkpoint it starts from (lineage.json)
    save_at_epoch_end = False      # a checkpoint at every epoch end (classifiers: it holds the best evaluation)
    train_urls: str | None = None  # the data it reads, set by build_model (lineage.json)
    val_urls: str | None = None

    def check(self, resuming: bool) -> None:
        """Read what can be wrong (data paths, a pretrained checkpoint) before anything is written."""

    def build_model(self, accelerator, resuming: bool) -> torch.nn.Module:
        raise NotImplementedError

    def build_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """Its lr is set before every step from the plan."""
        raise NotImplementedError

    def build_data(self, run: RunDir, resumed: bool):
        """Training batches: `.batches_per_epoch(epoch)` and `.batches(epoch, skip)` (see batches.py)."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def after_step(self, step: int, state: TrainState, *, epoch_end: bool, last: bool) -> None:
        """Epoch-end work and pictures. An evaluation that the loop should checkpoint sets `state.last_eval`
        (with its "step")."""

    def finish(self, state: TrainState) -> dict:
        """After the last checkpoint: exports, final checks, metrics.json; returns the run's summary."""
        return {}


def train(cfg: DictConfig, task: Task) -> dict:
    """Run (or resume) `task` as configured; returns its summary."""
    started, t = time.perf_counter(), cfg.train
    run = RunDir(t.output_dir, outputs=task.outputs)
    stop = StopSignal()  # from now on SIGTERM / SIGUSR1 stop the run cleanly
    try:
        accelerator = make_accelerator(str(run.path), t.mixed_precision, t.tf32, t.trackers,
                                       collective_timeout=seconds(t.collective_timeout))
        setup_logging(accelerator.is_main_process)
        check_same_run_dir(run, accelerator)
        # The main process decides, once, for all: each process reading the directory itself could disagree.
        resuming = main_decides(accelerator, lambda: _will_resume(run, t.resume))
        task.check(resuming)
        checked_peak_lr(cfg.optim, cfg.data.batch_size, accelerator.num_processes)  # before anything is deleted
        torch.manual_seed(t.seed)  # the same initial weights on every process
        model = task.build_model(accelerator, resuming)
        set_seed(t.seed, device_specific=True)  # then a stream per process (masks, drop path, mixing): seed + rank
        resume_from = main_decides(accelerator, lambda: _prepare(run, cfg))
        return _train(cfg, task, accelerator, model, run, resume_from, started, stop)
    finally:
        stop.restore()


def _will_resume(run: RunDir, resume: bool) -> bool:
    """The main process: tidy what a kill left among the checkpoints, then whether a complete one is resumed."""
    run.recover()
    return resume and run.latest() is not None


def _prepare(run: RunDir, cfg: DictConfig) -> Path | None:
    """The main process: the checkpoint to resume from, or None (a fresh start); an earlier stop is forgotten."""
    resume_from = run.prepare(cfg, is_main=True)
    (run.path / STOPPED_NAME).unlink(missing_ok=True)
    return resume_from


def _train(cfg: DictConfig, task: Task, accelerator, model, run: RunDir, resume_from, started, stop) -> dict:
    t = cfg.train
    model, optimizer = accelerator.prepare(model, task.build_optimizer(model))
    state = TrainState()
    if resume_from is not None:
        load_state(accelerator, resume_from)  # with each process's own random state
        state = read_state(resume_from)
    data = task.build_data(run, resumed=resume_from is not None)
    plan = make_plan(cfg.optim, batch_size=cfg.data.batch_size, world_size=accelerator.num_processes,
                     max_steps=t.max_steps, samples_per_epoch=state.samples_per_epoch,
                     samples_seen=state.samples_seen, batches_per_epoch=lambda: data.batches_per_epoch(0),
                     total_steps=state.budget and state.budget["steps"])
    begin(cfg, plan, state, accelerator, resume_from, run, task)
    # The steps run the compiled model (train.compile); checkpoints and evaluations use `model`, same parameters.
    loop = Loop(cfg, task, accelerator, compiled(model, t.compile), optimizer, plan, state, run,
                last_ckpt=resume_from, started=started, stop=stop)  # a time budget counts from `started`
    if run_recovering(loop, data, retries=t.nan_retries):
        accelerator.end_training()
        raise StoppedBySignal(f"{stop.reason} arrived; the run saved its checkpoint at step "
                              f"{state.step} ({loop.last_ckpt}). Run the same command again to resume.")
    if loop.saved_step != state.step:
        loop.save()
    try:
        summary = task.finish(state)
    except StoppedBySignal:  # every process broke off a final check (`stop_if_asked`)
        write_stopped(accelerator, run, state, loop.last_ckpt, f"{stop.reason} during the final export and checks")
        accelerator.end_training()
        raise StoppedBySignal(f"{stop.reason} arrived during the final export and checks; every step "
                              f"is saved ({loop.last_ckpt}). Run the same command again to finish them.") from None
    accelerator.end_training()
    return {**summary, "checkpoint": str(loop.last_ckpt), "resumed_from": resume_from and str(resume_from)}


def run_recovering(loop: "Loop", data, retries: int) -> bool:
    """`loop.run(data)`, recovering from a non-finite loss up to `retries` times: reload the last checkpoint,
    skip the steps whose data led there (their samples count as seen) and go on from the step after."""
    while True:
        try:
            return loop.run(data)
        except NonFiniteLossError as error:
            if retries == 0 or loop.last_ckpt is None:
                raise
            retries -= 1
            log.warning("the loss became NaN or infinite at step %d; reloading %s and going on from step %d with "
                        "the data after the steps that diverged (%d retries left)", error.step, loop.last_ckpt,
                        error.step + 1, retries)
            loop.rewind(loop.last_ckpt, error.step)


class Loop:
    """The state of one training loop: `run` is the loop; `save`, `log` and `fit_budget` are what it calls."""

    def __init__(self, cfg, task, accelerator, model, optimizer, plan: Plan, state: TrainState, run: RunDir,
                 last_ckpt, started: float, stop: StopSignal):
        self.t, self.clip_grad = cfg.train, cfg.optim.clip_grad
        self.budget = seconds(cfg.optim.time_budget) if cfg.optim.time_budget else None
        self.budget_text = cfg.optim.time_budget
        self.task, self.accelerator, self.model, self.optimizer = task, accelerator, model, optimizer
        self.plan, self.state, self.run_dir = plan, state, run
        self.last_ckpt, self.saved_step = last_ckpt, (state.step if last_ckpt else None)
        self.guard, self.meter = NonFiniteGuard(accelerator.device), TrainMeter(accelerator.device)
        self.started, self.stop = started, stop

    def run(self, data) -> bool:
        """Train from `plan.first_step` to `plan.last_step`; True when stopped early by a signal."""
        a, t, state, stop = self.accelerator, self.t, self.state, self.stop
        if self.plan.first_step >= self.plan.last_step:
            return False
        bar = tqdm(total=self.plan.last_step, initial=self.plan.first_step, desc=self.task.name, unit="step",
                   dynamic_ncols=True, disable=None if a.is_main_process else True)
        self.model.train()
        tick = time.perf_counter()
        try:
            for step, micro_batches in zip(itertools.count(self.plan.first_step + 1), step_batches(data, self.plan)):
                self.meter.data_time += time.perf_counter() - tick
                lr = self.step(step, micro_batches)
                bar.update()
                if self.budget and state.budget is None and step - self.plan.first_step in (2, MEASURED_STEPS + 2):
                    self.fit_budget(step, bar)
                last, epoch_end = step == self.plan.last_step, step % self.plan.steps_per_epoch == 0
                if step % t.log_every == 0 or last:
                    self.log(lr, bar)
                try:
                    self.task.after_step(step, state, epoch_end=epoch_end, last=last)
                except StoppedBySignal:  # every process broke off an evaluation (`stop_if_asked`)
                    return self.stop_here(f"{stop.reason} during the evaluation after step {step}")
                evaluated = state.last_eval is not None and state.last_eval.get("step") == step
                if step % t.save_every == 0 or evaluated or (epoch_end and self.task.save_at_epoch_end):
                    self.save()
                if (a.num_processes == 1 or step % STOP_CHECK_EVERY == 0 or step % t.log_every == 0) and stop.agreed(a):
                    return self.stop_here(stop.reason)
                if step >= self.plan.last_step:
                    return False
                tick = time.perf_counter()
        finally:
            bar.close()

    def stop_here(self, reason: str) -> bool:
        """A stop signal: save the state now (unless saved at this step), say where in stopped.json."""
        log.info("stop signal received (%s): saving a checkpoint at step %d and stopping", reason, self.state.step)
        if self.saved_step != self.state.step:
            self.save()
        write_stopped(self.accelerator, self.run_dir, self.state, self.last_ckpt, reason)
        return True

    def step(self, step: int, micro_batches: list[dict]) -> float:
        """One optimizer step: lr, the micro-batches (gradients all-reduced on the last only), clip, update."""
        a, plan = self.accelerator, self.plan
        lr = plan.lr(step)
        set_lr(self.optimizer, lr)
        for i, batch in enumerate(micro_batches):
            with a.no_sync(self.model) if i < plan.accum - 1 else nullcontext():
                loss = self.task.loss(self.model, batch)
                a.backward(loss / plan.accum)
            self.guard.update(loss, step)
            self.meter.add(loss, batch)
        if self.clip_grad:
            a.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step, self.state.samples_seen = step, self.state.samples_seen + plan.effective_batch
        return lr

    def rewind(self, checkpoint: Path, bad_step: int) -> None:
        """Back to `checkpoint`, then on from the step after `bad_step`: the steps in between are skipped, their
        samples count as seen (a non-finite loss: their data led there)."""
        load_state(self.accelerator, checkpoint)
        saved = read_state(checkpoint)
        skipped = (bad_step - saved.step) * self.plan.effective_batch
        vars(self.state).update(vars(saved))
        self.state.step, self.state.samples_seen = bad_step, saved.samples_seen + skipped
        self.plan = dataclasses.replace(self.plan, first_step=bad_step)
        self.meter = TrainMeter(self.accelerator.device)

    def fit_budget(self, step: int, bar) -> None:
        """optim.time_budget: time steps 3..22 of this start, then fix the total steps to end on time."""
        now = time.perf_counter()
        if step - self.plan.first_step == 2:
            self.timer = now
            return
        measured = torch.tensor([(now - self.timer) / MEASURED_STEPS, now - self.started],
                                device=self.accelerator.device)
        # One total for all: the slowest process sets the pace, the one that started first the time spent
        step_s, elapsed = self.accelerator.reduce(measured, reduction="max").tolist()
        total = max(budget_steps(self.budget, elapsed, step, step_s), step)
        self.state.budget = {"seconds": self.budget, "step_s": step_s, "steps": total}
        self.plan = dataclasses.replace(self.plan, total_steps=total, last_step=min(total, self.t.max_steps or total),
                                        warmup_steps=min(self.plan.warmup_steps, total))
        bar.total = self.plan.last_step
        log.info("time budget %s: %.3f s per step measured -> %d steps in all (%.2f epochs); the schedule ends at "
                 "step %d", self.budget_text, step_s, total, total / self.plan.steps_per_epoch, total)

    def save(self) -> None:
        self.guard.check(self.accelerator, self.last_ckpt)  # never save a diverged state over a good one
        self.last_ckpt = save_checkpoint(self.accelerator, self.run_dir, self.state, self.t.keep_last)
        self.saved_step = self.state.step

    def log(self, lr: float, bar) -> None:
        """At a logging step: stop on a non-finite loss, reduce the meter across processes, report."""
        state = self.state
        self.guard.check(self.accelerator, self.last_ckpt)
        stats = self.meter.flush(self.accelerator)
        state.skipped_samples += stats["skipped"]
        state.first_loss = stats["loss"] if state.first_loss is None else state.first_loss
        state.last_loss = stats["loss"]
        epoch = state.samples_seen / state.samples_per_epoch
        self.accelerator.log({"train/loss": stats["loss"], "train/lr": lr, "train/images_per_s": stats["img_s"],
                              "train/data_time": stats["data_time"], "train/skipped_samples": state.skipped_samples,
                              "train/epoch": epoch}, step=state.step)
        text = f"loss {stats['loss']:.4f}  lr {lr:.2e}  {stats['img_s']:.0f} img/s"
        if not bar.disable:
            bar.set_postfix_str(text, refresh=False)
        elif self.accelerator.is_main_process:  # a log file: one line with the time left
            done = state.step - self.plan.first_step
            left = (time.perf_counter() - self.started) / max(done, 1) * (self.plan.last_step - state.step)
            log.info("step %d/%d  epoch %.2f  %s  skipped %d  eta %s", state.step, self.plan.last_step, epoch, text,
                     state.skipped_samples, tqdm.format_interval(left))
