"""The one training loop: pretraining, fine-tuning and linear probing differ only in the `Task` they hand it.

Counted in optimizer steps: the lr, logging, checkpoints, epoch ends and the end of the run are
functions of the global step; the data position saved in a checkpoint is the number of samples the
steps used, so a run resumed with another number of processes, workers or batch size continues after
the same number of samples (`Plan`, `step_batches`). Per step, in order:

    lr -> accum micro-batches (no gradient all-reduce but on the last) -> clip -> optimizer step
       -> log (every train.log_every) -> task.after_step (epoch-end evaluation, pictures)
       -> checkpoint (every train.save_every, after an evaluation, at an epoch end when the task asks)
       -> stop on SIGTERM / SIGUSR1
          (after a checkpoint; `StoppedBySignal`, exit status 75: re-run to resume)

The loop never syncs the host per step: loss sums and the non-finite check stay on the device until
a logging step (`monitor.py`). Checkpoints and the start-or-resume decision are `rundir.py`.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from mae_vit.errors import NonFiniteLossError, StoppedBySignal
from mae_vit.files import write_json
from mae_vit.train.batches import step_batches
from mae_vit.train.build import shard_stats
from mae_vit.train.device import compiled, load_state, make_accelerator
from mae_vit.train.lineage import LINEAGE_NAME, lineage, note_resume
from mae_vit.train.monitor import NonFiniteGuard, StopSignal, TrainMeter, on_main_process, setup_logging
from mae_vit.train.optim import set_lr
from mae_vit.train.rundir import RunDir, TrainState, read_state, save_checkpoint
from mae_vit.train.schedule import Plan, budget_steps, make_plan, seconds

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
    resuming = t.resume and run.latest() is not None
    task.check(resuming)
    accelerator = make_accelerator(str(run.path), t.mixed_precision, t.tf32, t.trackers)
    setup_logging(accelerator.is_main_process)
    torch.manual_seed(t.seed)  # the same initial weights on every process
    model = task.build_model(accelerator, resuming)
    resume_from = run.prepare(cfg, is_main=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    model, optimizer = accelerator.prepare(model, task.build_optimizer(model))
    state = TrainState()
    if resume_from is not None:
        load_state(accelerator, resume_from)
        state = read_state(resume_from)
    data = task.build_data(run, resumed=resume_from is not None)
    plan = make_plan(cfg.optim, batch_size=cfg.data.batch_size, world_size=accelerator.num_processes,
                     max_steps=t.max_steps, samples_per_epoch=state.samples_per_epoch,
                     samples_seen=state.samples_seen, batches_per_epoch=lambda: data.batches_per_epoch(0),
                     total_steps=state.budget and state.budget["steps"])
    _start(cfg, plan, state, accelerator, resume_from, run, task)
    # The steps run the compiled model (train.compile); checkpoints and evaluations use `model`, same parameters.
    loop = Loop(cfg, task, accelerator, compiled(model, t.compile), optimizer, plan, state, run,
                last_ckpt=resume_from, started=started)  # a time budget counts from `started`
    if run_recovering(loop, data, retries=t.nan_retries):
        accelerator.end_training()
        raise StoppedBySignal(f"a stop signal (SIGTERM / SIGUSR1) arrived; the run saved its checkpoint at step "
                              f"{state.step} ({loop.last_ckpt}). Run the same command again to resume.")
    if loop.saved_step != state.step:
        loop.save()
    summary = task.finish(state)
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


def _start(cfg: DictConfig, plan: Plan, state: TrainState, accelerator, resume_from, run: RunDir, task: Task) -> None:
    """Fix the run's epoch on a fresh start, note a new process layout, save the config, say what runs."""
    d, world = cfg.data, accelerator.num_processes
    layout = {"processes": world, "batch_size": d.batch_size, "accumulation": plan.accum, "num_workers": d.num_workers}
    if resume_from is None:
        state.samples_per_epoch = plan.steps_per_epoch * plan.effective_batch
        log.info("starting a new run in %s", run.path)
        record = lineage(cfg, task.name, task.parent, {"train": task.train_urls, "val": task.val_urls})
        on_main_process(accelerator, lambda: write_json(run.path / LINEAGE_NAME, record))
    else:
        log.info("resuming from %s (step %d, epoch %d, %d samples seen)", resume_from, state.step, state.epoch,
                 state.samples_seen)
        on_main_process(accelerator, lambda: note_resume(run.path, cfg, state.step))  # lineage.json: changes now
        if state.layout and state.layout != layout and state.samples_seen % state.samples_per_epoch:
            log.warning("the process layout changed since the checkpoint (%s -> %s): the epoch goes on after the same "
                        "number of samples, but not exactly with the samples the old layout had left",
                        state.layout, layout)
    state.step, state.layout = plan.first_step, layout
    on_main_process(accelerator, lambda: run.save_config(cfg))
    _mention_data_stats(cfg, task.train_urls if cfg.data.train is not None else None)
    accelerator.init_trackers("logs")
    log.info("%d process(es) x batch %d x %d accumulation = effective batch %d, peak lr %.3g, %d steps/epoch, %d steps "
             "in all", world, d.batch_size, plan.accum, plan.effective_batch, plan.peak_lr, plan.steps_per_epoch,
             plan.total_steps)
    log.info("precision: %s%s", {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast with loss scaling"}.get(
        accelerator.mixed_precision, accelerator.mixed_precision), " (train.mixed_precision=auto: bf16 is fast on this "
             "device)" if cfg.train.mixed_precision == "auto" and accelerator.mixed_precision == "bf16" else "")


def _mention_data_stats(cfg: DictConfig, urls: str | None) -> None:
    """Say which normalisation the run uses, and when the shards' own statistics (make_shards records them)
    differ from the data.mean / data.std it was given."""
    d = cfg.data
    own = shard_stats(urls, cfg.model.in_chans)
    if own and all(abs(a - b) < 1e-6 for a, b in zip([*own["mean"], *own["std"]], [*d.mean, *d.std])):
        log.info("normalising with the training shards' own statistics: data.mean %s, data.std %s", list(d.mean),
                 list(d.std))
    elif own and any(abs(a - b) > 0.01 for a, b in zip([*own["mean"], *own["std"]], [*d.mean, *d.std])):
        log.info("the training shards' own statistics are mean %s std %s (data.mean %s, data.std %s are used); to "
                 "normalise with them: data.mean=%s data.std=%s", own["mean"], own["std"], list(d.mean),
                 list(d.std), own["mean"], own["std"])
    else:
        log.info("normalising with data.mean %s, data.std %s", list(d.mean), list(d.std))


class Loop:
    """The state of one training loop: `run` is the loop; `save`, `log` and `fit_budget` are what it calls."""

    def __init__(self, cfg, task, accelerator, model, optimizer, plan: Plan, state: TrainState, run: RunDir,
                 last_ckpt, started: float):
        self.t, self.clip_grad = cfg.train, cfg.optim.clip_grad
        self.budget = seconds(cfg.optim.time_budget) if cfg.optim.time_budget else None
        self.budget_text = cfg.optim.time_budget
        self.task, self.accelerator, self.model, self.optimizer = task, accelerator, model, optimizer
        self.plan, self.state, self.run_dir = plan, state, run
        self.last_ckpt, self.saved_step = last_ckpt, (state.step if last_ckpt else None)
        self.guard, self.meter = NonFiniteGuard(accelerator.device), TrainMeter(accelerator.device)
        self.started = started

    def run(self, data) -> bool:
        """Train from `plan.first_step` to `plan.last_step`; True when stopped early by a signal."""
        a, t, state = self.accelerator, self.t, self.state
        if self.plan.first_step >= self.plan.last_step:
            return False
        stop = StopSignal()
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
                self.task.after_step(step, state, epoch_end=epoch_end, last=last)
                evaluated = state.last_eval is not None and state.last_eval.get("step") == step
                if step % t.save_every == 0 or evaluated or (epoch_end and self.task.save_at_epoch_end):
                    self.save()
                if (a.num_processes == 1 or step % STOP_CHECK_EVERY == 0 or step % t.log_every == 0) and stop.agreed(a):
                    log.info("stop signal received: saving a checkpoint at step %d and stopping", step)
                    if self.saved_step != step:
                        self.save()
                    return True
                if step >= self.plan.last_step:
                    return False
                tick = time.perf_counter()
        finally:
            bar.close()

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
        measured = torch.tensor((now - self.timer) / MEASURED_STEPS, device=self.accelerator.device)
        step_s = float(self.accelerator.reduce(measured, reduction="max"))  # the slowest process sets the pace
        total = max(budget_steps(self.budget, now - self.started, step, step_s), step)
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
