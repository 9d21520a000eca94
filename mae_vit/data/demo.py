"""Synthetic demo shards, written once into a cache folder and reused.

`ensure_demo_shards(cache_dir, ...)` makes `{cache_dir}/synthetic-{img}px-{N}-{K}c-s{seed}/` with
`train/` (N samples, 8 shards: enough for 2 ranks x 2 workers to split by shards) and `val/`
(N // 4 samples from the synthetic generator's separate `val` stream, 4 shards). Several processes
(e.g. DDP ranks) may call it at once: each writes into its own temporary folder and renames it into
place; the first rename wins and the others discard their copy and use the winner's.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from mae_vit.data.synthetic import CLASS_NAMES, check_synthetic_args, synthetic_samples
from mae_vit.data.writer import shard_urls, write_shards
from mae_vit.errors import DataError
from mae_vit.files import expand_path

TRAIN_SHARDS = 8
VAL_SHARDS = 4


def _complete_urls(folder: Path, num_samples: int) -> str | None:
    """Brace spec of the split in `folder` if its index lists `num_samples` samples in shards that exist."""
    try:
        index = json.loads((folder / "shard-index.json").read_text())
        names = list(index["shards"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not names or index.get("num_samples") != num_samples or not all((folder / n).is_file() for n in names):
        return None
    return shard_urls(folder, "shard", len(names))


def ensure_demo_shards(
    cache_dir: str | Path, *, num_samples: int = 2048, num_classes: int = 10, img_size: int = 32, seed: int = 0
) -> tuple[str, str]:
    """Make (or reuse) synthetic train/val shards; returns (train_urls, val_urls) brace specs."""
    check_synthetic_args(seed=seed, img_size=img_size, num_classes=num_classes)
    num_val = max(num_samples // 4, 1)
    cache_dir = Path(expand_path(cache_dir))  # `~` and $VARS, as the reader will see them
    target = cache_dir / f"synthetic-{img_size}px-{num_samples}-{num_classes}c-s{seed}"
    if not target.exists():
        temp = cache_dir / f".{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            for split, count, shards in (("train", num_samples, TRAIN_SHARDS), ("val", num_val, VAL_SHARDS)):
                write_shards(
                    synthetic_samples(count, seed=seed, img_size=img_size, num_classes=num_classes, split=split),
                    temp / split,
                    samples_per_shard=-(-count // shards),
                    progress=False,
                    class_names=list(CLASS_NAMES[:num_classes]),
                )
            try:
                os.rename(temp, target)  # atomic; fails if another process got there first
            except OSError:
                if not target.exists():
                    raise
        finally:
            shutil.rmtree(temp, ignore_errors=True)
    urls = [_complete_urls(target / split, count) for split, count in (("train", num_samples), ("val", num_val))]
    if None in urls:
        raise DataError(
            f"The demo data cache {target} is incomplete or damaged (a missing index or shard). "
            f"Delete that folder and run again to regenerate it."
        )
    return urls[0], urls[1]
