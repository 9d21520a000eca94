"""Every path a user can give, expanded and made absolute in one place.

A path in a config file or on the command line may hold `~` and environment variables
(`$SCRATCH/runs`); relative paths are relative to the folder the tool was started from.
`resolve_paths(cfg)` (called by `parse_config`, before anything reads or writes) turns each of them
into an absolute path, so the run logs and saves in `config.yaml` the path it really used, and no
folder named `~` ever appears. Shard specs (`data.train`, `data.val`, `data.test`) are expanded part
by part: remote parts (`pipe:`, `http://`, ...) stay as they are, brace patterns are kept for the reader.
"""

from __future__ import annotations

import os
import re

from omegaconf import DictConfig, OmegaConf

from mae_vit.files import expand_path

# Dotted config keys that hold one local path, and those that hold a shard spec.
PATH_KEYS = ("train.output_dir", "output_dir", "data.cache_dir", "data_dir", "checkpoint", "json", "run", "output",
             "table")
URL_KEYS = ("data.train", "data.val", "data.test", "data.index", "loader")
# make_shards' `source` is a path unless it is one of the built-in sources.
BUILTIN_SOURCES = ("synthetic", "fashion-mnist")

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+:")
_VAR = re.compile(r"\$(\w+|\{[^}]*\})", re.ASCII)  # what os.path.expandvars expands


def _expand_spec_part(part: str) -> str:
    if part.startswith("file:"):
        part = part[len("file://"):] if part.startswith("file://") else part[len("file:"):]
    elif _SCHEME.match(part):
        return part  # pipe:, http(s):, s3:, ...: not a local path
    path = os.path.expanduser(os.path.expandvars(part))
    # Not abspath: normalising would fold `..` inside brace patterns; joining keeps the spec intact.
    return path if os.path.isabs(path) else os.path.join(os.getcwd(), path)


def expand_spec(spec: str) -> str:
    """A shard spec (`a/{000..009}.tar::~/b/*.tar::pipe:...`) with each local part expanded and absolute."""
    return "::".join(_expand_spec_part(p.strip()) for p in spec.split("::") if p.strip())


def expand_source(source: str) -> str:
    """make_shards' `source`: a built-in name is kept, `fashion-mnist:DIR` and folders are expanded."""
    name, sep, folder = source.partition(":")
    if source in BUILTIN_SOURCES:
        return source
    if sep and name in BUILTIN_SOURCES:
        return f"{name}:{expand_path(folder)}"
    return expand_path(source)


def environment_names(key: str, value: str) -> list[str]:
    """The `$VAR`s that `resolve_paths` would expand in `value` of `key` (none in remote parts of a shard spec)."""
    if key not in (*PATH_KEYS, *URL_KEYS, "source"):
        return []
    parts = [p.strip() for p in value.split("::")] if key in URL_KEYS else [value]
    local = [p for p in parts if key not in URL_KEYS or p.startswith("file:") or not _SCHEME.match(p)]
    return [m.group(0) for p in local for m in _VAR.finditer(p)]


def resolve_paths(cfg: DictConfig) -> None:
    """Expand every path-valued key that `cfg` has (None stays None), in place."""
    for keys, expand in ((PATH_KEYS, expand_path), (URL_KEYS, expand_spec), (("source",), expand_source)):
        for key in keys:
            value = OmegaConf.select(cfg, key, default=None)
            if isinstance(value, str) and value:
                OmegaConf.update(cfg, key, expand(value), merge=False)
