"""What a run wrote into its directory: a record kept as it writes, the only thing an overwrite deletes.

`run_files.json` in the run directory lists paths relative to it: the names a run writes (config,
lineage, exports, metrics; recorded when the run starts, before they exist), each checkpoint folder
(recorded before it is written, dropped when pruned), the TensorBoard event file of each start and the
reconstruction pictures. `train.overwrite=true` deletes exactly those entries, never by a name pattern,
and never through a symlink: an entry whose path passes through a link, or is one, is left alone.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from mae_vit.errors import ConfigError
from mae_vit.files import write_json

log = logging.getLogger("mae_vit")

RECORD_NAME = "run_files.json"


def check_output_dir(path: str | os.PathLike) -> Path:
    """`path` as a run directory; ConfigError when it is empty, a file, or a folder that cannot be written."""
    if not str(path).strip():
        raise ConfigError("train.output_dir is empty, which would write the run into the current folder. Give the "
                          "run its own folder: --output-dir DIR (train.output_dir=DIR).")
    path = Path(path).expanduser()
    existing = next(p for p in (path, *path.parents) if p.exists() or p == Path(p.anchor))
    if not existing.is_dir():
        raise ConfigError(f"the output directory {path} cannot be made: {existing} is a file, not a folder. Choose "
                          "another --output-dir (train.output_dir).")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"the output directory {path} cannot be written: {existing} is not writable for this user "
                          "(or lies on a read-only file system). Choose another --output-dir (train.output_dir).")
    return path


class RunFiles:
    """The record of one run directory's own files (main process only)."""

    def __init__(self, root: Path):
        self.root = root
        self.record = root / RECORD_NAME

    def recorded(self) -> list[str] | None:
        """The recorded paths (relative to the run directory); None when there is no readable record."""
        try:
            files = json.loads(self.record.read_text())["files"]
            return [str(f) for f in files] if isinstance(files, list) else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def relative(self, path: str | os.PathLike) -> str | None:
        """`path` (absolute, or relative to the current folder) relative to the run directory; None if outside."""
        inside = os.path.relpath(os.path.abspath(path), os.path.abspath(self.root))
        return None if inside == "." or inside.split(os.sep)[0] == ".." else inside

    def update(self, add=(), drop=()) -> None:
        """Record the paths `add` as this run's, forget `drop` (paths outside the run directory are ignored)."""
        before = self.recorded() or []
        files = (set(before) | {self.relative(p) for p in add}) - {self.relative(p) for p in drop} - {None}
        if files != set(before) or not self.record.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            write_json(self.record, {"files": sorted(files)})

    def owns(self, path: str | os.PathLike) -> bool:
        return self.relative(path) in (self.recorded() or [])

    def delete(self) -> None:
        """Delete every recorded entry that lies in the run directory without passing through a symlink."""
        for name in self.recorded() or []:
            parts = Path(name).parts
            if not parts or Path(name).is_absolute() or ".." in parts:
                continue
            target, through = self.root.joinpath(*parts), self.root
            if any((through := through / part).is_symlink() for part in parts):
                log.warning("train.overwrite=true: %s is reached through a symbolic link; left alone", target)
                continue
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)
            for folder in target.parents:  # folders the run made, once empty
                if folder == self.root or self.root not in folder.parents:
                    break
                try:
                    folder.rmdir()
                except OSError:
                    break
        self.record.unlink(missing_ok=True)
