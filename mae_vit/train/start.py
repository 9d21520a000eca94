"""The start of a run, the same on every process: the main process decides, every process checks that it
sees the same run directory, each gets its own random stream, and the start says what runs.

    main_decides(accelerator, decide)     the main process's answer (or its error) on every process
    check_same_run_dir(run, accelerator)  every process sees the directory the main process writes to
    begin(...)                            fix the epoch on a fresh start, save config and lineage, say what runs
    write_stopped(...)                    stopped.json: where a run stopped by a signal saved (a requeue reads it)

Multi-node runs need `train.output_dir` on a file system every node sees (the same path everywhere):
the main process alone decides between a fresh start and a resume (and which checkpoint), and the
other processes load that checkpoint from their own view of the directory.
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate.utils import broadcast_object_list
from omegaconf import DictConfig

from mae_vit.errors import ConfigError, UserError
from mae_vit.files import write_json
from mae_vit.train.build import shard_stats
from mae_vit.train.lineage import LINEAGE_NAME, lineage, note_resume
from mae_vit.train.monitor import on_main_process
from mae_vit.train.rundir import RunDir, TrainState
from mae_vit.train.schedule import Plan

log = logging.getLogger("mae_vit")
STOPPED_NAME = "stopped.json"  # {"step", "checkpoint", "reason", "time"}: removed when the run starts again
TOKEN_NAME = ".start-token"    # written by the main process, read back by all, removed at once
TOKEN_WAIT_S = 10.0            # a shared file system may show a new file to other nodes a little later


def main_decides(accelerator, decide: Callable[[], Any]) -> Any:
    """`decide()` on the main process only; its result on every process. A `UserError` it raises is raised on
    every process (same type, same message: exit 2 everywhere); any other failure stops the others too."""
    if accelerator.num_processes == 1:
        return decide()
    answer: list = [None]
    failure = None
    if accelerator.is_main_process:
        try:
            answer = [("ok", decide())]
        except UserError as error:
            answer = [("error", type(error), str(error))]
        except Exception as error:  # re-raised below on the main process, after the others have heard of it
            failure, answer = error, [("failed", type(error).__name__)]
    broadcast_object_list(answer, from_process=0)
    kind, *rest = answer[0]
    if failure is not None:
        raise failure
    if kind == "error":
        raise rest[0](rest[1])
    if kind == "failed":
        raise RuntimeError(f"the main process failed while deciding how the run starts ({rest[0]}; its error is shown "
                           "by the main process); this process stops with it")
    return rest[0]


def check_same_run_dir(run: RunDir, accelerator) -> None:
    """ConfigError on every process unless every process sees the run directory the main process writes to: the
    main process writes a random token there and each process reads it back. Nothing is left behind (the token,
    and folders made only for it, are removed at once), so this runs first, before any decision."""
    if accelerator.num_processes == 1:
        return
    token_file = run.path / TOKEN_NAME
    existing = next(p for p in (run.path, *run.path.parents) if p.exists())

    def write_token() -> str:
        token = uuid.uuid4().hex
        run.path.mkdir(parents=True, exist_ok=True)
        token_file.write_text(token)
        return token

    token = main_decides(accelerator, write_token)
    deadline = time.monotonic() + TOKEN_WAIT_S
    while not (seen := _read(token_file) == token) and time.monotonic() < deadline:
        time.sleep(0.2)
    blind = accelerator.gather(torch.tensor([int(not seen)], device=accelerator.device)).tolist()  # one per process
    if accelerator.is_main_process:
        token_file.unlink(missing_ok=True)
        _remove_made(run.path, existing)
    if any(blind):
        ranks = [r for r, b in enumerate(blind) if b]
        raise ConfigError(
            f"process(es) {ranks} do not see the same run directory as the main process: {run.path} on their "
            f"machine does not hold the file the main process has just written there (waited {TOKEN_WAIT_S:.0f} s). "
            "A run on several nodes needs train.output_dir on a file system that every node shares (NFS, Lustre, "
            "a mounted bucket), at the same path on each node; a node-local disk makes each node decide alone "
            "whether to resume. Nothing was written.")


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _remove_made(path: Path, existing: Path) -> None:
    """Remove the empty folders from `path` up to (not including) `existing`, the folder that was there before."""
    while path != existing and path.is_dir() and not any(path.iterdir()):
        path.rmdir()
        path = path.parent


def write_stopped(accelerator, run: RunDir, state: TrainState, checkpoint: Path | None, reason: str) -> None:
    """stopped.json in the run directory: the run stopped on a signal after saving `checkpoint` (a requeue script
    needs no exit status: the file says to re-run; the next start removes it)."""
    record = {"step": state.step, "checkpoint": str(checkpoint), "reason": reason,
              "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    on_main_process(accelerator, lambda: (run.files.update(add=[run.path / STOPPED_NAME]),
                                          write_json(run.path / STOPPED_NAME, record)))


def begin(cfg: DictConfig, plan: Plan, state: TrainState, accelerator, resume_from, run: RunDir, task) -> None:
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
