"""What a run came from, written when it starts: `lineage.json` in its run directory.

    parent       the checkpoint it started from (path, sha256 of the file read, and that file's run directory)
    data         the shard specs and a sha256 of each one's index (the data set's fingerprint)
    changes      the config keys whose values differ from the tool's defaults (recipe file or command line),
                 as the run's config.yaml holds them now: brought up to date each time the run resumes
    resumes      one entry per resume: when, at which step, and the keys it changed ({key: [before, after]})
    versions     python and the packages that decide the numbers; git commit of this checkout when there is one

`tools/report.py` follows `parent.run` from run to run: pretrain -> finetune / linprobe -> evaluate, and says
when a parent's file no longer has the recorded sha256 (its run went on after this one started from it).
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from importlib import metadata
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mae_vit.checkpoint import weights_in_run_dir
from mae_vit.config.checks import flat_dict
from mae_vit.config.paths import resolve_paths
from mae_vit.data.urls import expand_urls, is_remote, local_path
from mae_vit.files import write_json
from mae_vit.train.run_config import find_run_config

LINEAGE_NAME = "lineage.json"
PACKAGES = ("torch", "torchvision", "accelerate", "webdataset", "omegaconf", "safetensors")


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def lineage(cfg: DictConfig, task: str, parent: str | None, data: dict) -> dict:
    """The lineage record of a run of `task` started from `parent` (or from scratch) on `data` ({"train", "val"})."""
    record = {"task": task, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "parent": None,
              "data": {name: {"spec": spec, "index_sha256": _index_hash(spec)} for name, spec in data.items() if spec},
              "changes": config_changes(cfg), "versions": versions(), "git": git_commit()}
    if parent is not None:
        path = Path(parent)
        weights = weights_in_run_dir(path) if path.is_dir() else path
        run = find_run_config(parent)
        record["parent"] = {"path": str(weights), "sha256": file_sha256(weights),
                            "run": str(run.parent) if run else None}
    return record


def config_changes(cfg: DictConfig) -> dict:
    """{dotted key: value} for every key that differs from the tool's schema defaults."""
    defaults = _defaults(cfg)
    return {k: v for k, v in flat_dict(OmegaConf.to_container(cfg)).items() if defaults.get(k, object()) != v}


def _defaults(cfg: DictConfig) -> dict:
    defaults = OmegaConf.structured(OmegaConf.get_type(cfg))
    resolve_paths(defaults)  # paths are compared as the command line leaves them: absolute
    return flat_dict(OmegaConf.to_container(defaults))


def note_resume(run_dir: str | Path, cfg: DictConfig, step: int) -> dict | None:
    """Bring `lineage.json` up to date as a run resumes with `cfg` at `step`: `changes` as config.yaml now says,
    and a `resumes` entry with the keys this start changed. Returns the record; None (nothing written) for a run
    without lineage.json (made before lineage was recorded: where it came from is not known)."""
    path = Path(run_dir) / LINEAGE_NAME
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    defaults, before, now = _defaults(cfg), record.get("changes") or {}, config_changes(cfg)
    changed = {k: [before.get(k, defaults.get(k)), now.get(k, defaults.get(k))] for k in {**before, **now}
               if before.get(k, defaults.get(k)) != now.get(k, defaults.get(k))}
    record["changes"] = now
    record.setdefault("resumes", []).append({"at": time.strftime("%Y-%m-%d %H:%M:%S"), "step": step,
                                             "changed": changed})
    write_json(path, record)
    return record


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def git_commit() -> str | None:
    """The commit of the checkout this package runs from, read from .git (no command is run), or None."""
    git = Path(__file__).resolve().parents[2] / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        if (git / ref).is_file():
            return (git / ref).read_text().strip()
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return None


def _index_hash(spec: str) -> str | None:
    """sha256 over the index files of the spec's local shards, in order; None for remote shards."""
    digest, seen = hashlib.sha256(), []
    for url in expand_urls(spec):
        if is_remote(url):
            return None
        path = local_path(url)
        index = path.parent / f"{path.name.rsplit('-', 1)[0]}-index.json"
        if index.is_file() and index not in seen:
            seen.append(index)
            digest.update(index.read_bytes())
    return digest.hexdigest() if seen else None
