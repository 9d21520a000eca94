"""A run's directory: its layout, the start-or-resume decision, atomic checkpoints and what they record.

Layout (`train.output_dir`):
    config.yaml                 the resolved config of the run
    checkpoints/step_0000500/   Accelerate `save_state` (model, optimizer, RNG states per process)
                                + `trainer_state.json` (a `TrainState`) + `COMPLETE`
    logs/                       TensorBoard event files
    model.safetensors           the exported weights (official key names), written at the end

What survives a kill at any moment:
- a checkpoint is written to `checkpoints/.tmp-step_N`, its files fsynced, then `COMPLETE` lists every
  file with its size, and only then the folder is renamed to `step_N`. A folder counts as complete
  only when every listed file is there with its size, so a half-written or half-deleted checkpoint is
  never resumed: the run falls back to the newest one that is whole.
- re-saving a step already on disk first moves the old folder to `.old-step_N`; whichever of the two
  is complete when a run starts is kept (a finished `.tmp-` is promoted the same way).
- pruning removes a folder's `COMPLETE` first; a start deletes such left-overs.
- a fresh start never runs over a folder that holds results without a checkpoint (exported weights,
  metrics), and `train.overwrite=true` deletes only the files this project writes there.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mae_vit.config.cli import save_config
from mae_vit.config.schema import flat_dict
from mae_vit.errors import CheckpointError, ConfigError
from mae_vit.files import fsync_dir, write_json
from mae_vit.train.monitor import on_main_process

log = logging.getLogger("mae_vit")

COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
# What tools/sweep.py writes into a pretraining run (its own, so an overwrite of the run removes them too).
SWEEP_FILES = ("sweep.json", "sweep.png", "best_encoder.safetensors")
_STEP_DIR = re.compile(r"^step_(\d+)$")

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
    skipped_samples: int = 0      # unreadable samples passed over
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
        self.path = Path(path).expanduser()
        self.outputs = tuple(outputs)
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
            if m and is_complete(p):
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

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
        if found and is_main:
            self.delete_run_files()
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
            elif kind == "" and _STEP_DIR.match(p.name) and p.is_dir() and not (p / COMPLETE).exists():
                shutil.rmtree(p, ignore_errors=True)  # a prune that was interrupted
            elif _STEP_DIR.match(p.name) and not is_complete(p):
                log.warning("checkpoint %s is damaged (files missing or truncated); it is ignored", p)

    def delete_run_files(self) -> None:
        """`train.overwrite=true`: delete the checkpoints, event files, pictures and outputs this project wrote."""
        for p in [*self.checkpoints.glob("step_*"), *self.checkpoints.glob(".tmp-step_*"),
                  *self.checkpoints.glob(".old-step_*")]:
            shutil.rmtree(p, ignore_errors=True)
        for p in [*self.logs.rglob("events.out.tfevents.*"), *(self.path / "reconstructions").glob("step_*.png")]:
            p.unlink(missing_ok=True)
        for name in ("model.safetensors", "config.yaml", "lineage.json", *self.outputs):
            (self.path / name).unlink(missing_ok=True)
        log.info("train.overwrite=true: deleted the earlier run's files in %s", self.path)

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
            log.info("changed since the checkpoint: %s", ", ".join(f"{k} {_text(a)} -> {_text(b)}" for k, a, b in changed))

    def save_config(self, cfg: DictConfig) -> None:
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
    write_json(tmp / COMPLETE, {"step": state.step, "saved": time.strftime("%Y-%m-%d %H:%M:%S"), "files": files})
    old = run.checkpoints / f".old-step_{state.step:07d}"
    if final.exists():  # the same step saved again: the old copy stays whole until the new one is in place
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(run.checkpoints)
    shutil.rmtree(old, ignore_errors=True)
    for stale in run.complete_checkpoints()[:-keep_last]:
        (stale / COMPLETE).unlink()  # first: a prune cut short leaves an incomplete folder, never a "complete" one
        shutil.rmtree(stale, ignore_errors=True)


def is_complete(folder: Path) -> bool:
    """A checkpoint whose `COMPLETE` manifest lists files that are all there with their sizes."""
    try:
        manifest = json.loads((folder / COMPLETE).read_text())
        return all((folder / name).stat().st_size == size for name, size in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def save_checkpoint(accelerator, run: RunDir, state: TrainState, keep_last: int) -> Path:
    """Atomically write a checkpoint of the prepared objects plus `state`; keep the last `keep_last`.

    Every process must call this (Accelerate saves each process's RNG state).
    """
    final = run.checkpoints / f"step_{state.step:07d}"
    tmp = run.checkpoints / f".tmp-step_{state.step:07d}"
    on_main_process(accelerator, lambda: (shutil.rmtree(tmp, ignore_errors=True), tmp.mkdir(parents=True)))
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    on_main_process(accelerator, lambda: _complete(run, tmp, final, state, keep_last))
    accelerator.wait_for_everyone()
    return final
