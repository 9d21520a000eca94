"""The two index formats beside a folder of shards: ours (make_shards' `{prefix}-index.json`) and webdataset's
`wids` shard index (`wids-shard-index-v1`, which make_shards also writes, as `{prefix}-index.wids.json`).

Ours: `{"shards": {"shard-000000.tar": n, ...}, "num_samples": N, "num_classes": K or null, "class_counts": {...},
"class_names": [...] or null, "stats": {...} or null}` (see `mae_vit.data.writer`).
wids: `{"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": ..., "shardlist": [{"url": "shard-000000.tar",
"nsamples": n, "filesize": bytes}, ...]}`, where a relative `url` is relative to the index's own folder (wids'
`ShardListDataset(index)` reads it so). A wids index says nothing of classes or statistics: read as ours, its
`num_classes` is unknown (`labels_known` False) and its `stats` None.
"""

from __future__ import annotations

import json
import math
from pathlib import PurePosixPath
from urllib.parse import urlparse

from mae_vit.errors import DataError

WIDS_KIND = "wids-shard-index-v1"


def index_name(prefix: str) -> str:
    return f"{prefix}-index.json"


def wids_index_name(prefix: str) -> str:
    return f"{prefix}-index.wids.json"


def index_names(prefix: str) -> tuple[str, ...]:
    """The index files looked for beside shards of `prefix`, in order: ours, then the wids index make_shards writes,
    then the name `widsindex create` gives by default."""
    return index_name(prefix), wids_index_name(prefix), "shardindex.json"


def wids_index(name: str, shards: list[tuple[str, int, int]]) -> dict:
    """The wids index of shards given as (file name, samples, bytes), for the folder that holds them."""
    return {"__kind__": WIDS_KIND, "wids_version": 1, "name": name,
            "shardlist": [{"url": file, "nsamples": count, "filesize": size} for file, count, size in shards]}


def index_error(where: str, what: str) -> DataError:
    return DataError(f"the shard index {where} {what}. It is damaged or was edited by hand: write the shards again "
                     "with tools/make_shards.py, or delete the index (the samples are then counted from the tar "
                     "headers).")


def parse_index(text: str | bytes, where: str) -> dict:
    """Our index from the text of either format; ValueError when it is neither (not JSON, no shard list), DataError
    when its statistics are not numbers."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    if data.get("__kind__") == WIDS_KIND or "shardlist" in data:
        return _from_wids(data)
    if not isinstance(data.get("shards"), dict):
        raise ValueError("no 'shards' mapping")
    check_stats(data.get("stats"), where)
    return {**data, "labels_known": True}


def _from_wids(data: dict) -> dict:
    if data.get("wids_version") != 1 or not isinstance(data.get("shardlist"), list):
        raise ValueError(f"a wids index of version {data.get('wids_version')!r} without a 'shardlist' list")
    shards = {}
    for entry in data["shardlist"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("url"), str) or "nsamples" not in entry:
            raise ValueError(f"a wids shard entry without 'url' and 'nsamples': {entry!r}")
        shards[PurePosixPath(urlparse(entry["url"]).path).name] = entry["nsamples"]
    return {"shards": shards, "num_classes": None, "class_names": None, "stats": None, "labels_known": False}


def check_stats(stats, where: str) -> None:
    """DataError unless the index's statistics (make_shards) are per-channel lists of finite numbers."""
    if stats is None:
        return
    for name, channels in (("rgb", 3), ("grey", 1)):
        part = stats.get(name) if isinstance(stats, dict) else None
        for key in ("mean", "std"):
            values = part.get(key) if isinstance(part, dict) else None
            if not (isinstance(values, list) and len(values) == channels and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)):
                raise index_error(where, f"has statistics whose {name} {key} is {values!r}, not {channels} number(s)")


def checked_count(count, shard: str, where: str) -> int:
    """The index's sample count of `shard`: a whole number >= 0, else DataError."""
    if isinstance(count, bool) or not isinstance(count, int):
        raise index_error(where, f"lists {json.dumps(count)} as the sample count of {shard}, not a whole number")
    if count < 0:
        raise index_error(where, f"lists a negative sample count ({count}) for {shard}")
    return count
