"""Write samples into WebDataset tar shards plus a JSON index.

Output, in `output_dir`:
- `{prefix}-000000.tar`, `{prefix}-000001.tar`, ...: each sample is the members `{key}.{ext}` (the
  image: PNG when given a PIL image -- lossless, grey stays 1-channel "L" -- or the bytes given, e.g. an
  original JPEG) and `{key}.cls` (the label as decimal text; absent for unlabeled samples).
  A new shard starts when adding the next sample would pass `samples_per_shard` or make the finished
  file larger than `max_shard_bytes` (the exact tar size is computed, headers and padding included;
  a single sample larger than the limit gets a shard of its own).
- `{prefix}-index.json`: `{"shards": {"shard-000000.tar": n, ...}, "num_samples": N,
  "num_classes": K or null, "class_counts": {"0": n0, ...}, "class_names": [...] or null}`.
  The reader uses it to count samples per rank without opening the shards.
- `{prefix}-index.wids.json`: the same shards in webdataset's wids index format (`mae_vit.data.shard_index`), for
  webdataset's own tools (`wids.ShardListDataset`).

Safety: nothing is written under a final name until every shard is complete. Shards are written to
hidden temporary files (`.{prefix}-000000.tar.partial-<pid>`) which are renamed at the end, then the
index is written (also via rename); an error or Ctrl-C deletes the temporary files and leaves the
folder as it was, and the temporary files of a killed writer are removed by the next one. Existing
shards or index of the same prefix make `write_shards` refuse (DataError) unless `overwrite=True`;
with it, the old index is removed first and old shards numbered beyond the new ones are deleted, so
that the folder holds exactly the new data set. While the final names change, a `{prefix}-INCOMPLETE`
file marks the folder: the reader refuses shards beside it (a kill then cannot leave a silent mix of
two data sets), and the next `write_shards` of that prefix may replace them without `overwrite`.
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from mae_vit.data.shard_file import RECORD, PartialShard, archived_size, finished_size, sample_members
from mae_vit.data.shard_index import index_name, wids_index, wids_index_name
from mae_vit.data.sources import open_source
from mae_vit.data.stats import ImageStats
from mae_vit.data.transforms import to_8bit
from mae_vit.errors import ConfigError, DataError
from mae_vit.files import write_json, write_text

log = logging.getLogger(__name__)

_KEY_RE = re.compile(r"^[^./\s][^.\s]*$")


def shard_name(prefix: str, number: int) -> str:
    return f"{prefix}-{number:06d}.tar"


def shard_urls(output_dir: str | Path, prefix: str, num_shards: int) -> str:
    """Brace spec of the shards, e.g. `out/shard-{000000..000007}.tar` (a plain path when there is one)."""
    if num_shards == 1:
        return str(Path(output_dir) / shard_name(prefix, 0))
    return str(Path(output_dir) / f"{prefix}-{{{0:06d}..{num_shards - 1:06d}}}.tar")


def _encode_image(image) -> tuple[bytes, str]:
    """PIL image -> PNG bytes (L and RGB kept, other modes converted); `(bytes, ext)` passes through."""
    if isinstance(image, Image.Image):
        if image.mode not in ("L", "RGB"):
            image = to_8bit(image)  # 16-bit and float scaled, not clipped
            image = image.convert("L" if image.mode in ("1", "LA", "L") else "RGB")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue(), "png"
    if isinstance(image, tuple) and len(image) == 2 and isinstance(image[0], (bytes, bytearray)):
        data, ext = image
        ext = str(ext).lower().lstrip(".")
        if not ext or "." in ext or "/" in ext:
            raise DataError(f"Image extension {image[1]!r} is not usable as a tar member suffix (e.g. 'jpg').")
        return bytes(data), ext
    raise DataError(f"A sample's image must be a PIL image or a (bytes, extension) pair, got {type(image).__name__}.")


def _check_label(key: str, label, num_classes: int | None) -> int | None:
    if label is None:
        return None
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or label < 0:
        raise DataError(f"Sample {key!r} has label {label!r}; labels must be integers >= 0 (or None when unlabeled).")
    if num_classes is not None and label >= num_classes:
        raise DataError(f"Sample {key!r} has label {label} but the data set declares {num_classes} classes.")
    return int(label)


def incomplete_marker(output_dir: Path, prefix: str) -> Path:
    return Path(output_dir) / f"{prefix}-INCOMPLETE"


def _remove_dead_writers_files(output_dir: Path, prefix: str) -> None:
    """Temporary shards of a writer that was killed (its process is gone)."""
    for temp in output_dir.glob(f".{prefix}-*.tar.partial-*"):
        pid = temp.name.rsplit("-", 1)[-1]
        try:
            os.kill(int(pid), 0)
            continue  # a live process: not ours to touch
        except (ValueError, ProcessLookupError):
            pass
        except PermissionError:
            continue
        log.info("removing %s, left by a make_shards run that was killed", temp.name)
        temp.unlink(missing_ok=True)


def _existing_targets(output_dir: Path, prefix: str) -> list[Path]:
    pattern = re.compile(re.escape(prefix) + r"-\d{6}\.tar$")
    found = sorted(p for p in output_dir.iterdir() if pattern.match(p.name))
    found += [output_dir / name for name in (index_name(prefix), wids_index_name(prefix))
              if (output_dir / name).exists()]
    return found


def _check_limits(samples_per_shard, max_shard_bytes) -> tuple[int, int]:
    if isinstance(samples_per_shard, bool) or not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        raise ConfigError(f"samples_per_shard must be a positive integer, got {samples_per_shard!r}.")
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, (int, float)) or max_shard_bytes < RECORD:
        raise ConfigError(f"max_shard_bytes must be a number of at least {RECORD}, got {max_shard_bytes!r}.")
    return samples_per_shard, int(max_shard_bytes)


def write_shards(
    samples: Iterable,
    output_dir: str | Path,
    *,
    prefix: str = "shard",
    samples_per_shard: int = 1000,
    max_shard_bytes: int | float = 100e6,
    overwrite: bool = False,
    progress: bool = True,
    num_classes: int | None = None,
    class_names: list[str] | None = None,
    total: int | None = None,
    stats: bool = True,
    unreadable: list | None = None,
) -> dict:
    """Write `(key, image or (bytes, ext), label or None)` samples as shards + index; returns the index dict.

    `num_classes` (or `len(class_names)`) is recorded in the index and bounds the labels; when neither is
    given and samples are labelled, the index records max label + 1. `total` sizes the progress bar.
    `stats` records the data set's statistics in the index (`data/stats.py`); `unreadable`, a list the
    source fills with the images it had to skip, is counted there too.
    """
    samples_per_shard, max_shard_bytes = _check_limits(samples_per_shard, max_shard_bytes)
    if not prefix or "/" in prefix or prefix.startswith("."):
        raise ConfigError(f"prefix must be a plain file name start such as 'shard', got {prefix!r}.")
    if num_classes is None and class_names is not None:
        num_classes = len(class_names)
    output_dir = Path(output_dir)
    _prepare_output_dir(output_dir, prefix, overwrite)

    shards: list[PartialShard] = []
    statistics = ImageStats() if stats else None
    class_counts: Counter = Counter()  # samples per label; the key None counts the unlabelled samples
    bar = tqdm(total=total, desc=f"writing {output_dir}", unit="samples", disable=None if progress else True)
    previous_key = None
    try:
        for key, image, label in samples:
            _check_key(key, previous_key)
            previous_key = key
            label = _check_label(key, label, num_classes)
            data, ext = _encode_image(image)
            if statistics is not None:
                statistics.add(data)
            members = sample_members(key, data, ext, label)
            class_counts[label] += 1
            if None in class_counts and len(class_counts) > 1:
                raise DataError(
                    f"Sample {key!r} breaks the pattern of the samples before it: some samples have labels and "
                    f"some have none, but a data set must be one or the other."
                )
            size = sum(archived_size(info) for info, _ in members)
            current = _shard_for(shards, size, output_dir, prefix, samples_per_shard, max_shard_bytes)
            if finished_size(size) > max_shard_bytes:
                log.warning("sample %s (%d bytes) exceeds max_shard_bytes; it gets a shard of its own", key, size)
            current.add(members, size)
            bar.update()
        if not shards:
            raise DataError(f"No samples to write to {output_dir}: the source yielded nothing.")
        for shard in shards:
            shard.close()
        summary = statistics.result() if statistics is not None else None
        if summary is not None:
            summary["unreadable"] = len(unreadable) if unreadable is not None else None
        labelled = class_counts.pop(None, 0) == 0
        index = _commit(shards, output_dir, prefix, class_counts, num_classes, class_names, labelled, summary)
    finally:
        bar.close()
        for shard in shards:
            shard.close()
            shard.temp_path.unlink(missing_ok=True)
    return index


def _prepare_output_dir(output_dir: Path, prefix: str, overwrite: bool) -> None:
    """Make the folder; refuse (DataError) to replace a data set of this prefix unless `overwrite` or an
    interrupted write of it is there; remove the temporary files of killed writers."""
    if output_dir.exists() and not output_dir.is_dir():
        raise DataError(f"output_dir {output_dir} exists and is not a folder. Choose another output_dir.")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(output_dir, os.W_OK | os.X_OK):
            raise PermissionError("not writable for this user")
    except OSError as exc:
        raise DataError(f"output_dir {output_dir} cannot be made or written ({exc.strerror or exc}). Choose another "
                        "output_dir.") from None
    _remove_dead_writers_files(output_dir, prefix)
    existing = _existing_targets(output_dir, prefix)
    if incomplete_marker(output_dir, prefix).exists():
        log.warning("%s holds an interrupted write of '%s' shards; they are replaced", output_dir, prefix)
        overwrite = True
    if existing and not overwrite:
        names = ", ".join(p.name for p in existing[:3]) + (", ..." if len(existing) > 3 else "")
        raise DataError(
            f"{output_dir} already holds {len(existing)} file(s) of a '{prefix}' data set ({names}); nothing was "
            f"written. Choose another output_dir or prefix, or pass overwrite=true to replace them."
        )


def _check_key(key, previous_key) -> None:
    if not isinstance(key, str) or not _KEY_RE.match(key) or key == previous_key:
        raise DataError(
            f"Sample key {key!r} is unusable: keys must be non-empty strings without dots or white space, "
            f"not starting with '/', and differ from the previous sample's key."
        )


def _shard_for(shards: list[PartialShard], size: int, output_dir: Path, prefix: str, samples_per_shard: int,
               max_shard_bytes: int) -> PartialShard:
    """The shard a sample of `size` archived bytes goes to: the last one, or a new one (appended to `shards`) when
    the last is full in samples or the sample would make its finished file pass `max_shard_bytes`."""
    current = shards[-1] if shards else None
    if current is None or current.num_samples >= samples_per_shard or (
        current.num_samples > 0 and finished_size(current.content_bytes + size) > max_shard_bytes
    ):
        if current is not None:
            current.close()
        current = PartialShard(output_dir, shard_name(prefix, len(shards)))
        shards.append(current)
    return current


def _commit(shards, output_dir: Path, prefix: str, class_counts, num_classes, class_names, labelled, stats):
    """Rename the finished temporaries into place, drop stale shards (overwrite) and write the index last."""
    marker = incomplete_marker(output_dir, prefix)
    write_text(marker, "make_shards was changing these shards; if this file is still here, it was interrupted\n")
    for name in (index_name(prefix), wids_index_name(prefix)):
        (output_dir / name).unlink(missing_ok=True)
    keep = {shard.final_path.name for shard in shards}
    for stale in _existing_targets(output_dir, prefix):
        if stale.name not in keep and stale.suffix == ".tar":
            log.info("removing %s, left over from the data set that was overwritten", stale)
            stale.unlink()
    for shard in shards:
        os.replace(shard.temp_path, shard.final_path)
    if labelled and num_classes is None:
        num_classes = max(class_counts) + 1
    index = {
        "shards": {shard.final_path.name: shard.num_samples for shard in shards},
        "num_samples": sum(shard.num_samples for shard in shards),
        "num_classes": num_classes if labelled else None,
        "class_counts": {str(k): class_counts[k] for k in sorted(class_counts)},
        "class_names": list(class_names) if (labelled and class_names is not None) else None,
        "stats": stats,
    }
    write_json(output_dir / index_name(prefix), index)
    write_json(output_dir / wids_index_name(prefix), wids_index(prefix, [
        (shard.final_path.name, shard.num_samples, shard.final_path.stat().st_size) for shard in shards]))
    marker.unlink()
    return index


def make_shards(source: str, output_dir: str | Path, *, split: str = "train", num_samples: int = 2048,
                num_classes: int = 10, img_size: int = 32, seed: int = 0, **write_options) -> tuple[dict, str]:
    """Write the shards of `source` (see `mae_vit.data.sources`); returns (index, brace URL spec of the shards).

    `write_options` go to `write_shards` (prefix, samples_per_shard, max_shard_bytes, overwrite, progress).
    """
    folder, out = Path(source).expanduser().resolve(), Path(output_dir).expanduser().resolve()
    named = source == "synthetic" or source.startswith("fashion-mnist")  # not folders (see open_source)
    if not named and folder.is_dir() and (out == folder or folder in out.parents):
        raise DataError(f"the output folder {output_dir} lies inside the source folder {source}: its shards would be "
                        "read back as images (a class of their own) on the next run. Choose an output folder outside "
                        "the source.")
    resolved = open_source(
        source, split=split, num_samples=num_samples, num_classes=num_classes, img_size=img_size, seed=seed
    )
    log.info("writing %s to %s", resolved.description, output_dir)
    index = write_shards(resolved.samples, output_dir, num_classes=resolved.num_classes,
                         class_names=resolved.class_names, total=resolved.total, unreadable=resolved.unreadable,
                         **write_options)
    return index, shard_urls(output_dir, write_options.get("prefix", "shard"), len(index["shards"]))
