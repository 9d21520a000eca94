"""Shard URL specs: expansion with up-front checks, the JSON index beside the shards, sample counts, a shard's
samples.

A spec is one or more parts separated by `::`; each part is brace-expanded (`data/shard-{000000..000009}.tar`,
`{a,b}.tar`). Local parts may also be a glob (`data/train/*.tar`) or a folder (all `*.tar` in it, sorted).
Every local path is checked when the spec is expanded, so a typo fails at start-up with a DataError
rather than as an empty epoch. Remote parts (`pipe:...`, `http(s)://...`, any `scheme:`) are passed to
webdataset's `gopen` unchecked; `file:` prefixes are local.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import re
import tarfile
from pathlib import Path
from typing import Generator

import braceexpand
from webdataset.gopen import gopen
from webdataset.handlers import reraise_exception
from webdataset.tariterators import group_by_keys, tar_file_expander

from mae_vit.errors import DataError

log = logging.getLogger(__name__)

_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+:")
_SHARD_NAME_RE = re.compile(r"^(?P<prefix>.+)-\d+\.tar$")
_TAR_BLOCK = 512  # every tar member starts with a header of this size
_WARNED: set = set()  # (shard, count) of implausible index counts already reported
_HOW_TO_MAKE = (
    "Make shards with `python tools/make_shards.py source=synthetic output_dir=DIR` (or source=fashion-mnist, or "
    "source=FOLDER_OF_IMAGES), then pass e.g. DIR/shard-{000000..000007}.tar or just DIR."
)


def is_remote(url: str) -> bool:
    """True for `pipe:`/`http(s)://`/other schemes; False for plain paths and `file:` URLs."""
    return bool(_SCHEME_RE.match(url)) and not url.startswith("file:")


def local_path(url: str) -> Path:
    """The filesystem path of a local URL (strips `file:` / `file://`)."""
    if url.startswith("file://"):
        url = url[len("file://") :]
    elif url.startswith("file:"):
        url = url[len("file:") :]
    return Path(url).expanduser()


def _expand_local(item: str, spec: str) -> list[str]:
    path = local_path(item)
    if any(ch in str(path) for ch in "*?["):
        matches = sorted(glob.glob(str(path)))
        if not matches:
            raise DataError(f"The shard pattern {item!r} (from {spec!r}) matches no file. {_HOW_TO_MAKE}")
        return matches
    if path.is_dir():
        tars = sorted(str(p) for p in path.glob("*.tar") if not p.name.startswith("."))
        if not tars:
            raise DataError(f"The folder {path} (from {spec!r}) holds no .tar shards. {_HOW_TO_MAKE}")
        return tars
    if not path.is_file():
        raise DataError(f"The shard {path} (from {spec!r}) does not exist. {_HOW_TO_MAKE}")
    return [str(path)]


def expand_urls(urls: str | list[str]) -> list[str]:
    """Expand a spec (or a list of specs) into a list of shard URLs; DataError for missing local shards."""
    specs = [urls] if isinstance(urls, str) else list(urls)
    parts = [part.strip() for spec in specs for part in str(spec).split("::") if part.strip()]
    if not parts:
        raise DataError(f"No shards given (the spec is {urls!r}). {_HOW_TO_MAKE}")
    expanded: list[str] = []
    for part in parts:
        for item in braceexpand.braceexpand(part):
            expanded.extend([item] if is_remote(item) else _expand_local(item, part))
    _refuse_interrupted_writes(expanded)
    return expanded


def _refuse_interrupted_writes(urls: list[str]) -> None:
    """DataError when local shards lie beside a `{prefix}-INCOMPLETE` marker (make_shards was cut short)."""
    checked = set()
    for url in urls:
        if is_remote(url):
            continue
        path = local_path(url)
        match = _SHARD_NAME_RE.match(path.name)
        if not match or (path.parent, match["prefix"]) in checked:
            continue
        checked.add((path.parent, match["prefix"]))
        if (path.parent / f"{match['prefix']}-INCOMPLETE").exists():
            raise DataError(
                f"{path.parent} holds '{match['prefix']}' shards that make_shards was still changing when it was "
                f"interrupted ({match['prefix']}-INCOMPLETE is there), so they may mix two data sets. Run the same "
                "make_shards command again to finish them.")


def _load_index(path: Path) -> dict | None:
    try:
        index = json.loads(path.read_text())
        if not isinstance(index.get("shards"), dict):
            raise ValueError("no 'shards' mapping")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError) as exc:
        log.warning("ignoring unreadable shard index %s: %s", path, exc)
        return None
    _check_stats(index.get("stats"), path)
    return index


def _index_error(path: Path, what: str) -> DataError:
    return DataError(f"the shard index {path} {what}. It is damaged or was edited by hand: write the shards again with "
                     "tools/make_shards.py, or delete the index (the samples are then counted from the tar headers).")


def _check_stats(stats, path: Path) -> None:
    """DataError unless the index's statistics (make_shards) are per-channel lists of finite numbers."""
    if stats is None:
        return
    for name, channels in (("rgb", 3), ("grey", 1)):
        part = stats.get(name) if isinstance(stats, dict) else None
        for key in ("mean", "std"):
            values = part.get(key) if isinstance(part, dict) else None
            if not (isinstance(values, list) and len(values) == channels and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)):
                raise _index_error(path, f"has statistics whose {name} {key} is {values!r}, not {channels} number(s)")


def _checked_count(count, shard: Path, index_path: Path) -> int:
    """The index's sample count of `shard`: a whole number >= 0 (else DataError); one larger than the tar file
    could hold (each sample takes a 512-byte tar header at least) is replaced by the count of its tar headers."""
    if isinstance(count, bool) or not isinstance(count, int):
        raise _index_error(index_path, f"lists {json.dumps(count)} as the sample count of {shard.name}, not a whole "
                                       "number")
    if count < 0:
        raise _index_error(index_path, f"lists a negative sample count ({count}) for {shard.name}")
    try:
        room = shard.stat().st_size // _TAR_BLOCK
    except OSError:  # missing: the reader reports it
        return count
    if count <= room:
        return count
    real = count_tar_samples(shard)
    if (shard, count) not in _WARNED:
        _WARNED.add((shard, count))
        log.warning("the shard index %s lists %d samples for %s, more than its %d bytes can hold; using the %d samples "
                    "its tar headers hold. Write the shards again with tools/make_shards.py to mend the index.",
                    index_path, count, shard.name, shard.stat().st_size, real)
    return real


def read_index(urls: str | list[str]) -> dict | None:
    """The `*-index.json` data for these shards, or None if any shard is remote or not in an index.

    `urls` is a spec (expanded here) or a list of already expanded URLs (as `expand_urls` returns).

    Returns `{"shards": {url: num_samples, ...} (in the given order), "num_samples": total,
    "num_classes": K or None, "class_names": [...] or None, "stats": {...} or None}`. Shards from several
    folders or prefixes are merged (num_classes: the largest; class_names only if all agree; stats only
    for one data set).
    """
    url_list = expand_urls(urls) if isinstance(urls, str) else list(urls)
    cache: dict[Path, dict | None] = {}
    counts: dict[str, int] = {}
    for url in url_list:
        if is_remote(url):
            return None
        path = local_path(url)
        match = _SHARD_NAME_RE.match(path.name)
        if not match:
            return None
        index_path = path.parent / f"{match['prefix']}-index.json"
        if index_path not in cache:
            cache[index_path] = _load_index(index_path)
        index = cache[index_path]
        if index is None or path.name not in index["shards"]:
            return None
        counts[url] = _checked_count(index["shards"][path.name], path, index_path)
    used = [index for index in cache.values() if index is not None]
    class_counts = [index.get("num_classes") for index in used]
    names = [index.get("class_names") for index in used]
    return {
        "shards": counts,
        "num_samples": sum(counts.values()),
        "num_classes": max(class_counts) if class_counts and None not in class_counts else None,
        "class_names": names[0] if names and all(n == names[0] for n in names) else None,
        "stats": used[0].get("stats") if len(used) == 1 else None,  # statistics of one data set (make_shards)
    }


def count_tar_samples(path: str | Path) -> int:
    """Samples in a local shard, from the tar headers only (consecutive members with one key = one sample).

    A damaged tar counts the samples before the damage (what a reader gets out of it) with a warning.
    """
    count, previous = 0, None
    try:
        with tarfile.open(path, mode="r:*") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                directory, _, name = member.name.rpartition("/")
                key = f"{directory}/{name.split('.', 1)[0]}"
                if "." in name and not name.startswith("__") and key != previous:
                    count, previous = count + 1, key
    except (OSError, tarfile.TarError, EOFError) as exc:
        log.warning("shard %s is damaged (%s); counting the %d samples before the damage", path, exc, count)
    return count


def tar_samples(url: str) -> Generator[dict, None, Exception | None]:
    """Samples of one shard via webdataset's tar iteration; returns the error that stopped it, if any."""
    stream = None
    try:
        stream = gopen(url)
        files = tar_file_expander([{"url": url, "stream": stream}], handler=reraise_exception)
        yield from group_by_keys(files, handler=reraise_exception)
        return None
    except Exception as exc:  # missing file, not a tar, truncated, pipe failure: reported by the caller
        return exc
    finally:
        if stream is not None:
            try:
                stream.close()
            except Exception:  # a failed pipe: already reported by the read
                pass


def shard_sample_counts(urls: list[str]) -> list[int]:
    """Samples per shard (same order as `urls`): from the index, else by reading local tar headers."""
    index = read_index(urls)
    if index is not None:
        return [index["shards"][url] for url in urls]
    remote = [url for url in urls if is_remote(url)]
    if remote:
        raise DataError(
            f"Cannot count the samples of remote shards ({remote[0]}, ...) without an index. Put the "
            f"`{{prefix}}-index.json` written by tools/make_shards.py beside local copies of the shards."
        )
    return [count_tar_samples(local_path(url)) for url in urls]
