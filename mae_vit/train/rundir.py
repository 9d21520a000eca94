"""A run's directory: its layout, the start-or-resume decision, atomic checkpoints and what they record.

Layout (`train.output_dir`):
    config.yaml                 the resolved config of the run
    checkpoints/step_0000500/   Accelerate `save_state` (model, optimizer, RNG states per process)
                                + `trainer_state.json` (a `TrainState`) + `COMPLETE`
    logs/                       TensorBoard event files
    model.safetensors           the exported weights (official key names), written at the end
    run_files.json              what the run wrote here, recorded as it writes (`run_files.py`)

What survives a kill at any moment:
- a checkpoint is written to `checkpoints/.tmp-step_N`, its files fsynced, then `COMPLETE` lists every
  file with its size, and only then the folder is renamed to `step_N`. A folder counts as complete
  only when every listed file is there with its size, so a half-written or half-deleted checkpoint is
  never resumed: the run falls back to the newest one that is whole.
- re-saving a step already on disk first moves the old folder to `.old-step_N`; whichever of the two
  is complete when a run starts is kept (a finished `.tmp-` is promoted the same way).
- pruning removes a folder's `COMPLETE` first; a start deletes such left-overs.
- a fresh start never runs over a folder that holds results without a checkpoint (exported weights,
  metrics), and `train.overwrite=true` deletes only what the earlier run recorded in `run_files.json`
  (never by a name pattern, never through a symlink); results missing from that record are refused.
- checkpoints are ordered by the samples they have seen (then a save counter), never by step number:
  a resume with a bigger batch restarts the step count lower, and its checkpoints are still the newest.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mae_vit.checkpoint import COMPLETE, STATE_FILE, STEP_DIR, complete_checkpoints, is_complete
from mae_vit.config.checks import flat_dict
from mae_vit.config.cli import save_config
from mae_vit.errors import CheckpointError, ConfigError
from mae_vit.files import fsync_dir, write_json
from mae_vit.train.monitor import on_main_process
from mae_vit.train.run_files import RECORD_NAME, RunFiles, check_output_dir

log = logging.getLogger("mae_vit")

# What tools/sweep.py writes into a pretraining run (its own, so an overwrite of the run removes them too).
SWEEP_FILES = ("sweep.json", "sweep.png", "best_encoder.safetensors")

# Keys whose change alters the shapes of the weights: a checkpoint of the old value cannot be resumed.
SHAPE_KEYS = ("model.name", "model.img_size", "model.patch_size", "model.embed_dim", "model.depth",
              "model.num_heads", "model.in_chans", "model.pos_embed", "model.decoder_embed_dim",
              "model.decoder_depth", "model.decoder_num_heads", "model.global_pool", "model.num_classes",
              "resolution")
_NOT_COMPARED = ("train.resume", "train.overwrite")


@dataclass
class TrainState:
    """Where a run is. The epoch and the position inside it are derived from `samples_seen`."""

    step: int = 0                 # optimizer steps done
    samples_seen: int = 0         # training samples behind those steps, all processes together
    samples_per_epoch: int = 0    # the schedule's epoch, fixed when the run first starts (0: not yet)
    layout: dict = field(default_factory=dict)  # processes, batch size, accumulation, workers when saved
    skipped_samples: int = 0      # unreadable samples passed over (once an epoch)
    first_loss: float | None = None
    last_loss: float | None = None
    budget: dict | None = None    # optim.time_budget: {"seconds", "step_s", "steps"}, fixed after measuring
    best: dict | None = None      # classifier training: the evaluation with the best top-1 so far
    last_eval: dict | None = None

    @property
    def epoch(self) -> int:
        """Epochs completed."""
        return self.samples_seen // self.samples_per_epoch if self.samples_per_epoch else 0


def read_state(ckpt: Path) -> TrainState:
    data = json.loads((ckpt / STATE_FILE).read_text())
    if "samples_seen" not in data:
        raise CheckpointError(
            f"{ckpt} was written by an older version of mae_vit (no sample count in {STATE_FILE}), so this version "
            "cannot tell where to continue. Finish it with the version that wrote it, or start over with "
            "train.resume=false train.overwrite=true.")
    names = {f.name for f in fields(TrainState)}
    return TrainState(**{k: v for k, v in data.items() if k in names})


class RunDir:
    """A run's output directory. `outputs`: further files a task writes into it (`best.safetensors`,
    `metrics.json`, ...); an explicit overwrite deletes them with the rest."""

    def __init__(self, path: str | os.PathLike, outputs: tuple[str, ...] = ()):
        self.path = check_output_dir(path)
        self.outputs = tuple(outputs)
        self.files = RunFiles(self.path)  # what this run wrote here: all that train.overwrite=true deletes
        self.checkpoints = self.path / "checkpoints"
        self.logs = self.path / "logs"
        self.config_file = self.path / "config.yaml"

    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoint folders, oldest first: by the samples they hold, never by step number."""
        return complete_checkpoints(self.path)

    def latest(self) -> Path | None:
        ckpts = self.complete_checkpoints()
        return ckpts[-1] if ckpts else None

    def results(self) -> list[Path]:
        """What a finished run leaves besides checkpoints: exported weights, metrics, best weights."""
        return [self.path / n for n in ("model.safetensors", *self.outputs) if (self.path / n).exists()]

    def prepare(self, cfg: DictConfig, *, is_main: bool) -> Path | None:
        """Decide between a fresh start and a resume; returns the checkpoint to resume from (or None).

        - train.resume and a complete checkpoint: resume from the newest one, if `cfg` fits its weights.
        - otherwise, if the directory holds results (checkpoints, exported weights, metrics): refuse unless
          train.overwrite=true, which deletes the files this project wrote there (and nothing else).
        - otherwise: a fresh start.
        """
        t = cfg.train
        if is_main:
            self.recover()
        latest = self.latest()
        if latest is not None and t.resume:
            self.check_resumable(cfg)
            return latest
        found = ([latest] if latest else []) + self.results()
        if found and not t.overwrite:
            why = ("train.resume=false asks to start over" if latest else
                   "it has no checkpoint to resume, so this command would start over and replace them")
            raise ConfigError(
                f"the output directory {self.path} already holds results ({', '.join(p.name for p in found[:3])}), "
                f"and {why}. Nothing was changed. Choose another --output-dir, re-run without train.resume=false "
                "to continue a run, or add train.resume=false train.overwrite=true to delete that run's files and "
                "start over.")
        if found:
            self.delete_run_files(found, is_main=is_main)
        if is_main:
            self.record_names()
        return None

    def recover(self) -> None:
        """After a kill: keep whichever copy of each step is complete, drop half-written and half-pruned folders."""
        if not self.checkpoints.is_dir():
            return
        for p in sorted(self.checkpoints.iterdir(), key=lambda q: not q.name.startswith(".tmp-")):  # newest copy first
            kind, _, step = p.name.partition("step_")
            final = self.checkpoints / f"step_{step}"
            if kind in (".tmp-", ".old-") and p.is_dir():
                if is_complete(p) and not is_complete(final):  # the newer copy of this step was not finished
                    shutil.rmtree(final, ignore_errors=True)
                    os.replace(p, final)
                    log.info("kept %s as %s (a save or re-save of that step was interrupted)", p.name, final.name)
                else:
                    shutil.rmtree(p, ignore_errors=True)
            elif kind == "" and STEP_DIR.match(p.name) and p.is_dir() and not (p / COMPLETE).exists():
                shutil.rmtree(p, ignore_errors=True)  # a prune that was interrupted
            elif STEP_DIR.match(p.name) and not is_complete(p):
                log.warning("checkpoint %s is damaged (files missing or truncated); it is ignored", p)

    def delete_run_files(self, found: list[Path], *, is_main: bool) -> None:
        """`train.overwrite=true`: delete what the earlier run recorded as its own (`run_files.py`), nothing else;
        ConfigError (nothing deleted) when some of its results `found` are not in that record."""
        strays = [p for p in found if not self.files.owns(p)]
        if strays:
            raise ConfigError(
                f"train.overwrite=true deletes only the files a run recorded as its own ({RECORD_NAME}), and "
                f"{', '.join(str(p) for p in strays[:3])} in {self.path} is not recorded there: this project did not "
                "write it, or wrote it before it kept that record. Nothing was deleted. Move or delete it yourself, "
                "or choose another --output-dir.")
        if is_main:
            self.files.delete()
            log.info("train.overwrite=true: deleted the earlier run's files in %s", self.path)

    def record_names(self) -> None:
        """Record the names a run writes at its top level (before it writes them) as its own."""
        self.files.update(add=[self.config_file, self.path / "lineage.json", self.path / "model.safetensors",
                               *(self.path / name for name in self.outputs)])

    def check_resumable(self, cfg: DictConfig) -> None:
        """Refuse a resume whose config changes the weights' shapes; log every other change."""
        if not self.config_file.is_file():
            return
        before = flat_dict(OmegaConf.to_container(OmegaConf.load(self.config_file)))
        now = flat_dict(OmegaConf.to_container(cfg))
        for flat in (before, now):  # fine-tuning: no --resolution means the model's own size
            if flat.get("resolution", 0) is None:
                flat["resolution"] = flat.get("model.img_size")
        changed = [(k, before[k], now[k]) for k in now if k in before and before[k] != now[k]
                   and k not in _NOT_COMPARED]
        refused = [f"{k} {_text(a)} -> {_text(b)}" for k, a, b in changed if k in SHAPE_KEYS]
        if refused:
            raise ConfigError(
                f"{self.path} holds a run whose weights have other shapes than this command asks for "
                f"({', '.join(refused)}; see {self.config_file}), so its checkpoint cannot be resumed. Use the run's "
                "values for these keys, another --output-dir, or train.resume=false train.overwrite=true to start "
                "over there.")
        if changed:
            log.info("changed since the checkpoint: %s",
                     ", ".join(f"{k} {_text(a)} -> {_text(b)}" for k, a, b in changed))
        fixed = (read_state(self.latest()).budget or {}) if self.latest() else {}
        if fixed.get("steps") and any(k == "optim.time_budget" for k, _, _ in changed):
            log.warning("optim.time_budget changed, but the schedule fixed by the first start is kept (%d steps in "
                        "all, measured for its budget): a resumed run never re-plans. To plan for the new budget, "
                        "start over (train.resume=false train.overwrite=true) or use another --output-dir.",
                        fixed["steps"])

    def save_config(self, cfg: DictConfig) -> None:
        self.record_names()
        save_config(cfg, self.config_file)


def _text(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _complete(run: RunDir, tmp: Path, final: Path, state: TrainState, keep_last: int) -> None:
    """Main process: the manifest, the rename into place (keeping an older copy of the step until then), the prune."""
    write_json(tmp / STATE_FILE, asdict(state))
    files = {}
    for p in sorted(tmp.rglob("*")):  # Accelerate's files reach the disk before the manifest says "complete"
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
            files[str(p.relative_to(tmp))] = p.stat().st_size
    serial = 1 + max((json.loads((p / COMPLETE).read_text()).get("serial", 0) for p in run.complete_checkpoints()),
                     default=0)  # the save counter: orders checkpoints of equal samples seen
    write_json(tmp / COMPLETE, {"step": state.step, "samples_seen": state.samples_seen, "serial": serial,
                                "saved": time.strftime("%Y-%m-%d %H:%M:%S"), "files": files})
    old = run.checkpoints / f".old-step_{state.step:07d}"
    if final.exists():  # the same step saved again: the old copy stays whole until the new one is in place
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(run.checkpoints)
    shutil.rmtree(old, ignore_errors=True)
    for stale in run.complete_checkpoints()[:-keep_last]:
        (stale / COMPLETE).unlink()  # first: a prune cut short leaves an incomplete folder, never a "complete" one
        shutil.rmtree(stale, ignore_errors=True)
        run.files.update(drop=[stale])


def save_checkpoint(accelerator, run: RunDir, state: TrainState, keep_last: int) -> Path:
    """Atomically write a checkpoint of the prepared objects plus `state`; keep the last `keep_last`.

    Every process must call this (Accelerate saves each process's RNG state).
    """
    final = run.checkpoints / f"step_{state.step:07d}"
    tmp = run.checkpoints / f".tmp-step_{state.step:07d}"
    on_main_process(accelerator, lambda: (run.files.update(add=[final, *_event_files(accelerator)]),
                                          shutil.rmtree(tmp, ignore_errors=True), tmp.mkdir(parents=True)))
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    on_main_process(accelerator, lambda: _complete(run, tmp, final, state, keep_last))
    accelerator.wait_for_everyone()
    return final


def _event_files(accelerator) -> list[Path]:
    """The TensorBoard event file each tracker of this start writes (recorded as the run's own)."""
    found = []
    for tracker in getattr(accelerator, "trackers", ()):
        writer = getattr(getattr(tracker, "writer", None), "file_writer", None)
        name = getattr(getattr(writer, "event_writer", None), "_file_name", None)  # tensorboard's EventFileWriter
        if name:
            found.append(Path(name).absolute())
    return found
