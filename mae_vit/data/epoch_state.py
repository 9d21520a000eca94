"""What DataLoader workers kept from epoch to epoch (`persistent_workers`) must learn without being forked again.

`EpochState` holds (epoch, skip_batches) in shared memory: the main process writes it before it asks the
DataLoader for a new pass, and each worker reads it when the DataLoader has it start a new iterator over its
copy of the dataset (a pass's iterator is made after the write, so a worker never reads the next pass's epoch
for the pass it serves). `seed_worker` seeds a worker's random streams for an epoch as a DataLoader built for
that epoch alone seeded them, so that keeping the workers changes no augmentation draw.
"""

from __future__ import annotations

import random

import torch

from mae_vit.data.split import resume_plan, worker_batch_counts, worker_sample_counts


class EpochState:
    """(epoch, skip_batches) in shared memory, read by every worker of the loader (forked or spawned)."""

    def __init__(self, epoch: int = 0, skip_batches: int = 0):
        self._values = torch.tensor([epoch, skip_batches], dtype=torch.int64).share_memory_()

    def set(self, epoch: int, skip_batches: int) -> None:
        self._values.copy_(torch.tensor([epoch, skip_batches], dtype=torch.int64))

    def get(self) -> tuple[int, int]:
        epoch, skip_batches = self._values.tolist()
        return epoch, skip_batches


def loader_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of a loader's generator for (seed, epoch, rank)."""
    return (seed * 1_000_003 + epoch) * 1_009 + rank


def seed_worker(seed: int, epoch: int, rank: int, worker_id: int) -> None:
    """Seed this worker's torch and `random` streams as a DataLoader whose generator was seeded with
    `loader_seed(seed, epoch, rank)` seeds them when it starts its workers: the base seed is the generator's
    first draw, each worker's seed that plus its id. (The transforms draw from torch only; numpy is not seeded.)"""
    generator = torch.Generator().manual_seed(loader_seed(seed, epoch, rank))
    base = int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())
    random.seed(base + worker_id)
    torch.manual_seed(base + worker_id)


def resume_point(shard_counts: list[int], *, skip_batches: int, batch_size: int, drop_last: bool, rank: int,
                 world_size: int, worker: int, num_workers: int, seed: int, epoch: int,
                 shuffle: bool) -> tuple[int, int]:
    """(the worker whose share this worker reads, raw samples of it to leave out) to resume a pass after its first
    `skip_batches` batches: the DataLoader's turn order continues where it stopped (`split.resume_plan`)."""
    per_worker = worker_sample_counts(shard_counts, world_size=world_size, num_workers=num_workers, seed=seed,
                                      epoch=epoch, shuffle=shuffle)[rank]
    skipped, next_turn = resume_plan(worker_batch_counts(per_worker, batch_size, drop_last), skip_batches)
    plays = (worker + next_turn) % num_workers
    return plays, skipped[plays] * batch_size
