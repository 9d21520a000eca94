"""Data: synthetic/Fashion-MNIST/image-folder sources, WebDataset shard writing and reading, transforms.

Typical use:
    train_urls, val_urls = ensure_demo_shards("~/.cache/mae_vit")          # or tools/make_shards.py
    loader = make_loader(train_urls, transform=pretrain_transform(32), batch_size=64, num_workers=2,
                         rank=rank, world_size=world_size, seed=0, epoch=0)
    steps = min(rank_batch_counts(train_urls, world_size=world_size, num_workers=2, batch_size=64))
    for step, batch in zip(range(steps), loader): ...   # batch: image, label, key, skipped, skipped_shards
"""

from mae_vit.data.demo import ensure_demo_shards
from mae_vit.data.fashion_mnist import load_fashion_mnist, read_idx
from mae_vit.data.loader import ShardLoader, make_loader, rank_batch_counts
from mae_vit.data.shards import ShardDataset, collate_samples
from mae_vit.data.sources import SampleSource, open_source
from mae_vit.data.synthetic import synthetic_sample, synthetic_samples
from mae_vit.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    eval_transform,
    finetune_transform,
    linprobe_transform,
    mixup_cutmix,
    pretrain_transform,
)
from mae_vit.data.urls import count_tar_samples, expand_urls, read_index
from mae_vit.data.writer import make_shards, shard_urls, write_shards

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SampleSource",
    "ShardDataset",
    "ShardLoader",
    "collate_samples",
    "count_tar_samples",
    "ensure_demo_shards",
    "eval_transform",
    "expand_urls",
    "finetune_transform",
    "linprobe_transform",
    "load_fashion_mnist",
    "make_loader",
    "make_shards",
    "mixup_cutmix",
    "open_source",
    "pretrain_transform",
    "read_idx",
    "read_index",
    "rank_batch_counts",
    "shard_urls",
    "synthetic_sample",
    "synthetic_samples",
    "write_shards",
]
