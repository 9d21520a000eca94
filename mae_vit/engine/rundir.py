"""A run's directory: its layout, the start-or-resume decision, atomic checkpoints and what they record.

Layout (`train.output_dir`):
    config.yaml                 the resolved config of the run
    checkpoints/step_0000500/   Accelerate `save_state` (model, optimizer, RNG states per process)
                                + `trainer_state.json` (a `TrainState`) + `COMPLETE`
    logs/                       TensorBoard event files
    model.safetensors           the exported weights (official key names), written at the end

A checkpoint is written to `checkpoints/.tmp-step_N`, completed with a `COMPLETE` marker and only then
renamed to `step_N`; resume only looks at complete `step_*` folders, so a checkpoint that was being
written when the process died is never taken for a good one. The last `keep_last` are kept.
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

from ..config import save_config
from ..errors import CheckpointError, ConfigError
from ..files import write_json, write_text

log = logging.getLogger("mae_vit")

COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
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
            if m and p.is_dir() and (p / COMPLETE).is_file() and (p / STATE_FILE).is_file():
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        ckpts = self.complete_checkpoints()
        return ckpts[-1] if ckpts else None

    def has_results(self) -> bool:
        """Anything worth keeping: a complete checkpoint or exported weights."""
        return self.latest() is not None or (self.path / "model.safetensors").exists()

    def prepare(self, cfg: DictConfig, *, is_main: bool) -> Path | None:
        """Decide between a fresh start and a resume; returns the checkpoint to resume from (or None).

        - train.resume and a complete checkpoint: resume from the newest one, if `cfg` fits its weights.
        - not train.resume and the directory holds results: refuse unless train.overwrite (then the old
          checkpoints, logs and outputs are deleted: the user asked for it by name).
        - otherwise: a fresh start (left-over half-written checkpoints are removed).
        """
        t = cfg.train
        if is_main and self.checkpoints.is_dir():  # half-written checkpoints of a crashed run
            for p in self.checkpoints.glob(".tmp-*"):
                shutil.rmtree(p, ignore_errors=True)
        latest = self.latest()
        if latest is not None and t.resume:
            self.check_resumable(cfg)
            return latest
        if self.has_results() and not t.resume:
            if not t.overwrite:
                raise ConfigError(
                    f"the output directory {self.path} already holds a run (checkpoints or exported weights), and "
                    "train.resume=false asks to start over. Nothing was changed. Re-run without train.resume=false to "
                    "continue it, choose another --output-dir, or add train.overwrite=true to delete that run and start over."
                )
            if is_main:
                for sub in (self.checkpoints, self.logs):
                    shutil.rmtree(sub, ignore_errors=True)
                for name in ("model.safetensors", "config.yaml", *self.outputs):
                    (self.path / name).unlink(missing_ok=True)
        return None

    def check_resumable(self, cfg: DictConfig) -> None:
        """Refuse a resume whose config changes the weights' shapes; log every other change."""
        if not self.config_file.is_file():
            return
        before = _flat(OmegaConf.to_container(OmegaConf.load(self.config_file)))
        now = _flat(OmegaConf.to_container(cfg))
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


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _text(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def save_checkpoint(accelerator, run: RunDir, state: TrainState, keep_last: int) -> Path:
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
        write_json(tmp / STATE_FILE, asdict(state))
        for p in tmp.iterdir():  # Accelerate's files reach the disk before the marker says "complete"
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        write_text(tmp / COMPLETE, f"step {state.step} saved {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        if final.exists():  # the same step saved twice (e.g. a final save right after a periodic one)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in run.complete_checkpoints()[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
