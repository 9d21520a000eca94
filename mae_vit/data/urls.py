"""Shard URL specs: expansion with up-front checks, the index beside the shards (or given: data.index), sample
counts.

A spec is one or more parts separated by `::`; each part is brace-expanded (`data/shard-{000000..000009}.tar`,
`{a,b}.tar`). Local parts may also be a glob (`data/train/*.tar`) or a folder (all `*.tar` in it, sorted).
Every local path is checked when the spec is expanded, so a typo fails at start-up with a DataError
rather than as an empty epoch. Remote parts (`pipe:...`, `http(s)://...`, any `scheme:`) are passed to
webdataset's `gopen` unchecked (`mae_vit.data.remote` reads them); `file:` prefixes are local.
"""

from __future__ import annotations

import glob
import logging
import re
import tarfile
from pathlib import Path
from urllib.parse import urlparse

import braceexpand

from mae_vit.data.remote import fetch_first, is_remote, remote_shard_name
from mae_vit.data.shard_index import checked_count, index_names, parse_index
from mae_vit.errors import DataError

log = logging.getLogger(__name__)

_SHARD_NAME_RE = re.compile(r"^(?P<prefix>.+)-\d+\.tar$")
_TAR_BLOCK = 512  # every tar member starts with a header of this size
_WARNED: set = set()  # (shard, count) of implausible index counts already reported
_ATTACHED: dict[str, tuple[str, tuple[str, ...]]] = {}  # shard URL -> (its name, (index location,)): `use_index`
_REMOTE: dict[tuple, tuple[str, dict] | None] = {}  # remote index candidates -> what they held: read once
_HOW_TO_MAKE = (
    "Make shards with `python tools/make_shards.py source=synthetic output_dir=DIR` (or source=fashion-mnist, or "
    "source=FOLDER_OF_IMAGES), then pass e.g. DIR/shard-{000000..000007}.tar or just DIR."
)


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


def _locate(url: str) -> tuple[str, tuple[str, ...]] | None:
    """(the shard's file name, the index files that may list it, in order), or None when there is no index to look
    for (a `pipe:` command without data.index, a name without the `{prefix}-NNNNNN.tar` form)."""
    if url in _ATTACHED:
        return _ATTACHED[url]
    if url.startswith("pipe:"):
        return None
    name = remote_shard_name(url) if is_remote(url) else local_path(url).name
    match = _SHARD_NAME_RE.match(name or "")
    if not match:
        return None
    if is_remote(url):  # beside the shard: the same folder URL, through the same opener
        parsed = urlparse(url)
        folder = parsed.path.rsplit("/", 1)[0]
        return name, tuple(parsed._replace(path=f"{folder}/{file}", query="", fragment="").geturl()
                           for file in index_names(match["prefix"]))
    return name, tuple(str(local_path(url).parent / file) for file in index_names(match["prefix"]))


def _load(candidates: tuple[str, ...]) -> tuple[str, dict] | None:
    """(where, index) of the first readable index among `candidates`; remote ones are read once per process."""
    if any(is_remote(where) for where in candidates):
        if candidates not in _REMOTE:
            fetched = fetch_first(list(candidates))
            _REMOTE[candidates] = fetched and _parsed(fetched[1], fetched[0])
        return _REMOTE[candidates]
    for where in candidates:
        try:
            text = Path(where).read_text()
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("ignoring unreadable shard index %s: %s", where, exc)
            continue
        loaded = _parsed(text, where)
        if loaded is not None:
            return loaded
    return None


def _parsed(text: str | bytes, where: str) -> tuple[str, dict] | None:
    try:
        return where, parse_index(text, where)
    except (ValueError, AttributeError, TypeError) as exc:
        log.warning("ignoring unreadable shard index %s: %s", where, exc)
        return None


def use_index(spec: str | list[str], location: str) -> None:
    """Read the shards of `spec` with the index at `location` (data.index: a path, a URL, or a `pipe:` command that
    prints it), matched by file name (`remote_shard_name`); DataError when it cannot be read or lacks a shard."""
    loaded = _load((location,))
    if loaded is None:
        raise DataError(f"data.index={location!r} cannot be read as a shard index (see the log above). Give the "
                        "path, URL or `pipe:` command of the shard-index.json (or *-index.wids.json) of the data.train "
                        "shards.")
    listed = loaded[1]["shards"]
    for url in expand_urls(spec):
        name = remote_shard_name(url) if is_remote(url) else local_path(url).name
        if name not in listed:
            shown = ", ".join(list(listed)[:3]) + (", ..." if len(listed) > 3 else "")
            raise DataError(f"the shard {url} is not in the index {location} (data.index), which lists {shown}: "
                            f"{'its command names no .tar file' if name is None else f'no {name}'}. Pass the index "
                            "of these shards.")
        _ATTACHED[url] = (name, (location,))


def _checked_count(count, url: str, name: str, where: str) -> int:
    """The index's sample count of a shard (`checked_count`); for a local shard, one larger than the file could
    hold (each sample takes a 512-byte tar header at least) is replaced by the count of its tar headers."""
    count = checked_count(count, name, where)
    if is_remote(url):
        return count
    shard = local_path(url)
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
                    where, count, name, shard.stat().st_size, real)
    return real


def read_index(urls: str | list[str]) -> dict | None:
    """The index data for these shards, or None if any shard is in no index (see `shard_index` for the formats).

    `urls` is a spec (expanded here) or a list of already expanded URLs (as `expand_urls` returns). Local shards
    are looked up in `{prefix}-index.json` beside them (else `{prefix}-index.wids.json`, `shardindex.json`), remote
    ones in the same files at the same folder URL, `pipe:` commands in the index given to `use_index` (data.index).

    Returns `{"shards": {url: num_samples, ...} (in the given order), "num_samples": total,
    "num_classes": K or None, "class_names": [...] or None, "stats": {...} or None, "labels_known": bool}`. Shards
    from several folders or prefixes are merged (num_classes: the largest; class_names only if all agree; stats only
    for one data set). `labels_known` is False when a wids index (which does not say) stands for ours.
    """
    url_list = expand_urls(urls) if isinstance(urls, str) else list(urls)
    cache: dict[tuple, tuple[str, dict] | None] = {}
    used: dict[str, dict] = {}
    counts: dict[str, int] = {}
    for url in url_list:
        located = _locate(url)
        if located is None:
            return None
        name, candidates = located
        if candidates not in cache:
            cache[candidates] = _load(candidates)
        if cache[candidates] is None or name not in cache[candidates][1]["shards"]:
            return None
        where, index = cache[candidates]
        used[where] = index
        counts[url] = _checked_count(index["shards"][name], url, name, where)
    indexes = list(used.values())
    class_counts = [index.get("num_classes") for index in indexes]
    names = [index.get("class_names") for index in indexes]
    return {
        "shards": counts,
        "num_samples": sum(counts.values()),
        "num_classes": max(class_counts) if class_counts and None not in class_counts else None,
        "class_names": names[0] if names and all(n == names[0] for n in names) else None,
        "stats": indexes[0].get("stats") if len(indexes) == 1 else None,  # statistics of one data set (make_shards)
        "labels_known": all(index["labels_known"] for index in indexes),
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


def shard_sample_counts(urls: list[str]) -> list[int]:
    """Samples per shard (same order as `urls`): from the index, else by reading local tar headers; DataError
    for remote shards without an index (`require_index`)."""
    index = require_index(urls)
    if index is not None:
        return [index["shards"][url] for url in urls]
    return [count_tar_samples(local_path(url)) for url in urls]


def require_index(urls: str | list[str]) -> dict | None:
    """`read_index(urls)`; DataError, saying what to pass, when it is None and a shard is remote (the samples of
    remote shards are counted from their index only)."""
    url_list = expand_urls(urls) if isinstance(urls, str) else list(urls)
    index = read_index(url_list)
    remote = [url for url in url_list if is_remote(url)]
    if index is not None or not remote:
        return index
    located = _locate(remote[0])
    looked = f" (looked for {', '.join(located[1])})" if located else ""
    raise DataError(
        f"Cannot count the samples of the remote shards {remote[0]}, ... without their index{looked}. For http(s) "
        "shards put the shard-index.json that tools/make_shards.py wrote (or its *-index.wids.json) beside them; for "
        "`pipe:` commands, or to use another index, pass data.index=PATH_OR_URL of it (a `pipe:` command that prints "
        "it works too, with --allow-shell).")
