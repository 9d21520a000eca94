"""The DataLoader over `ShardDataset` (`mae_vit.data.shards`): one rank's share of an epoch as batch dicts.

`make_loader` builds it; `ShardLoader` folds the workers' count-only records into a neighbouring batch
so that every skipped sample is counted, and with `persistent_workers` serves epoch after epoch from the
same worker processes (`ShardLoader.epoch`); `rank_batch_counts` says how many full batches each rank gets.
"""

from __future__ import annotations

import logging
from typing import Iterator

import torch
from torch.utils.data import DataLoader

from mae_vit.data.epoch_state import loader_seed
from mae_vit.data.shards import ShardDataset
from mae_vit.data.split import worker_batch_counts, worker_sample_counts
from mae_vit.data.urls import expand_urls, shard_sample_counts
from mae_vit.errors import ConfigError

log = logging.getLogger(__name__)


def _unchanged(item: dict) -> dict:
    """The DataLoader's per-item collate when the dataset batches (module level: picklable for spawn)."""
    return item


class ShardLoader(DataLoader):
    """DataLoader over a batching ShardDataset: folds count-only records into a neighbouring batch.

    It holds one batch back so that counts arriving after the last batch still reach a batch.
    """

    def epoch(self, epoch: int, skip_batches: int = 0) -> Iterator[dict]:
        """The batches of `epoch` after its first `skip_batches`: the pass a loader made for them gives, from
        this loader's workers when it keeps them (`persistent_workers`). The epoch is set when the first batch
        is asked for; a pass left part-way is dropped by the next (the DataLoader discards what it prefetched)."""
        self.dataset.set_epoch(epoch, skip_batches)
        yield from self

    def __iter__(self) -> Iterator[dict]:
        held, pending = None, [0, 0]
        for item in super().__iter__():
            if "image" not in item and "encoded" not in item:  # a count-only record
                if held is not None:
                    held["skipped"] += item["skipped"]
                    held["skipped_shards"] += item["skipped_shards"]
                else:
                    pending = [pending[0] + item["skipped"], pending[1] + item["skipped_shards"]]
                continue
            item["skipped"] += pending[0]
            item["skipped_shards"] += pending[1]
            pending = [0, 0]
            if held is not None:
                yield held
            held = item
        if held is not None:
            yield held
        elif pending[0] or pending[1]:
            log.warning("this rank got no batch this epoch; %d samples and %d shards were skipped", *pending)


def make_loader(urls: str | list[str], *, batch_size: int, num_workers: int = 0, pin_memory: bool = False,
                persistent_workers: bool = False, **dataset_options) -> ShardLoader:
    """A `ShardLoader` over this rank's share of one epoch, yielding batch dicts (see module doc).

    `dataset_options` go to `ShardDataset` (transform, in_chans, rank, world_size, seed, epoch, shuffle,
    shuffle_buffer, with_labels, skip_batches, drop_last). Batches never mix workers (each worker
    batches its own samples, as any DataLoader over an IterableDataset does), so with drop_last each
    worker drops its own last partial batch: `rank_batch_counts` says how many full batches each rank
    delivers. Augmentation randomness in the workers is seeded from (seed, epoch, rank, worker) at every pass
    (`epoch_state.seed_worker`). `persistent_workers` (with num_workers > 0): the workers serve every later
    `ShardLoader.epoch(...)` pass too, each as a new loader for that epoch would. The loader already holds
    only this rank's share: do not wrap it in a DistributedSampler or `accelerator.prepare` (that would split it again).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ConfigError(f"num_workers must be an integer >= 0, got {num_workers!r}.")
    dataset = ShardDataset(urls, batch_size=batch_size, **dataset_options)
    # its own generator, so that the DataLoader's base seed is not drawn from the training process's stream
    generator = torch.Generator().manual_seed(loader_seed(dataset.seed, dataset.state.get()[0], dataset.rank))
    return ShardLoader(
        dataset,
        batch_size=None,  # the dataset batches (per worker, as a DataLoader would) to carry the skip counts
        num_workers=num_workers,
        collate_fn=_unchanged,
        pin_memory=pin_memory,
        generator=generator,
        persistent_workers=persistent_workers and num_workers > 0,
    )


def rank_batch_counts(
    urls: str | list[str],
    *,
    world_size: int,
    num_workers: int,
    batch_size: int,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
) -> list[int]:
    """Batches each rank's `make_loader(...)` delivers in `epoch` (world_size ints), from the index or tar headers.

    Counts each worker's batches separately (as the DataLoader makes them); identical on every rank.
    Training takes the smallest: the number of steps every rank can share. Bad samples can make a rank
    deliver fewer, so a training loop must still cope with a loader that runs out first.
    """
    counts = worker_sample_counts(shard_sample_counts(expand_urls(urls)), world_size=world_size,
                                  num_workers=num_workers, seed=seed, epoch=epoch, shuffle=shuffle)
    return [sum(worker_batch_counts(per_worker, batch_size, drop_last)) for per_worker in counts]
