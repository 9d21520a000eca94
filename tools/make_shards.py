#!/usr/bin/env python
"""Write a data set as WebDataset tar shards plus a JSON index, ready for the training tools.

    python tools/make_shards.py source=synthetic output_dir=data/synthetic/train num_samples=4096 img_size=32
    python tools/make_shards.py source=synthetic output_dir=data/synthetic/val split=val num_samples=1024
    python tools/make_shards.py source=fashion-mnist output_dir=data/fmnist/train split=train
    python tools/make_shards.py --source path/to/images --output-dir data/mine/train   # one subfolder per class

source: "synthetic", "fashion-mnist" (after `apt-get install dataset-fashion-mnist`; "fashion-mnist:DIR" for
another folder) or a folder of images. `python tools/make_shards.py --help` lists every key. The shards land
in output_dir as {prefix}-000000.tar, ... with {prefix}-index.json (and the same list in webdataset's wids index
format, {prefix}-index.wids.json); existing ones are never replaced unless overwrite=true. The last line printed
is the URL spec to pass to the training tools.
"""

import logging
import sys

from _run import run_tool  # tools/_run.py: puts this checkout on sys.path, so no install is needed

from mae_vit.config import MakeShardsConfig, parse_config
from mae_vit.data.writer import make_shards


def main(argv):
    cfg = parse_config(MakeShardsConfig, argv, prog="make_shards.py")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    index, urls = make_shards(
        cfg.source,
        cfg.output_dir,
        split=cfg.split,
        samples_per_shard=cfg.samples_per_shard,
        max_shard_bytes=cfg.max_shard_bytes,
        overwrite=cfg.overwrite,
        prefix=cfg.prefix,
        num_samples=cfg.num_samples,
        num_classes=cfg.num_classes,
        img_size=cfg.img_size,
        seed=cfg.seed,
        stats=cfg.stats,
    )
    classes = f", {index['num_classes']} classes" if index["num_classes"] else ", unlabeled"
    print(f"wrote {index['num_samples']} samples in {len(index['shards'])} shards{classes}", file=sys.stderr)
    if index.get("stats"):
        s = index["stats"]
        print(f"statistics: RGB mean {s['rgb']['mean']} std {s['rgb']['std']}; grey mean {s['grey']['mean']} std "
              f"{s['grey']['std']}; {s['duplicates']} duplicate(s), {s['undecodable']} undecodable, "
              f"{s['unreadable'] or 0} unreadable file(s) skipped; "
              f"sizes {s['sizes']}", file=sys.stderr)
    print(urls)
    return index


if __name__ == "__main__":
    run_tool(main)
