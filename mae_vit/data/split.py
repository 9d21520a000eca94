"""Which samples each (rank, dataloader worker) reads in an epoch -- a pure function of the arguments.

1. The shard list is shuffled with a generator seeded by (seed, epoch) -- the same on every rank
   (or kept in the given order when shuffle=False).
2. Ranks: with at least `world_size` shards, rank r takes shards r, r + R, r + 2R, ... of that order.
   With fewer, every rank reads all shards and keeps every R-th sample (sample-level split).
3. Workers, within the rank's part: if it was split by shards and has at least `num_workers` shards,
   worker w takes every W-th of the rank's shards; otherwise every worker reads all of the rank's
   shards and keeps every W-th of the samples its rank keeps.

The sample-level split is "keep raw sample i when i % stride == slot", where i counts the samples
of the process's shards in reading order (advanced by the index's count for a damaged shard, so that
all processes agree). Either way every sample is read by exactly one (rank, worker) per epoch.

Because the counts come from the shard index, every rank can compute every other rank's share
(`worker_sample_counts`) and so the same number of steps per epoch, without communication.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Assignment:
    """One process's share: `shards` (positions in the URL list, in reading order) and the sample filter."""

    shards: tuple[int, ...]
    stride: int
    slot: int


def shard_order(num_shards: int, *, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """Positions 0..num_shards-1 in this epoch's order (identical on every rank)."""
    order = list(range(num_shards))
    if shuffle:
        random.Random(f"mae_vit-shards-{seed}-{epoch}").shuffle(order)
    return order


def assign(
    num_shards: int,
    *,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
) -> Assignment:
    """The share of (rank, worker) in this epoch (see module doc). `num_workers` is at least 1."""
    if not 0 <= rank < world_size or not 0 <= worker < num_workers:
        raise ValueError(f"rank {rank}/{world_size} or worker {worker}/{num_workers} out of range")
    order = shard_order(num_shards, seed=seed, epoch=epoch, shuffle=shuffle)
    if num_shards >= world_size:
        rank_shards, stride, slot = order[rank::world_size], 1, 0
    else:
        rank_shards, stride, slot = order, world_size, rank
    if stride == 1 and len(rank_shards) >= num_workers:
        return Assignment(tuple(rank_shards[worker::num_workers]), 1, 0)
    return Assignment(tuple(rank_shards), stride * num_workers, slot * num_workers + worker)


def kept_in_range(start: int, stop: int, stride: int, slot: int) -> int:
    """How many i in [start, stop) have i % stride == slot."""

    def below(n: int) -> int:  # count in [0, n)
        return (n - slot + stride - 1) // stride if n > slot else 0

    return below(stop) - below(start) if stop > start else 0


def assignment_sample_count(assignment: Assignment, shard_counts: list[int]) -> int:
    """Samples the process delivers (before any are lost to bad data)."""
    total = sum(shard_counts[s] for s in assignment.shards)
    return kept_in_range(0, total, assignment.stride, assignment.slot)


def worker_sample_counts(
    shard_counts: list[int], *, world_size: int, num_workers: int, seed: int, epoch: int, shuffle: bool = True
) -> list[list[int]]:
    """`counts[rank][worker]` for this epoch; num_workers=0 (no worker processes) counts as one worker."""
    workers = max(num_workers, 1)
    return [
        [
            assignment_sample_count(
                assign(len(shard_counts), rank=r, world_size=world_size, worker=w, num_workers=workers,
                       seed=seed, epoch=epoch, shuffle=shuffle),
                shard_counts,
            )
            for w in range(workers)
        ]
        for r in range(world_size)
    ]


def worker_batch_counts(sample_counts: list[int], batch_size: int, drop_last: bool) -> list[int]:
    """Batches each worker's DataLoader fetcher makes (batches never mix workers' samples)."""
    if drop_last:
        return [n // batch_size for n in sample_counts]
    return [-(-n // batch_size) for n in sample_counts]


def resume_plan(batch_counts: list[int], skip_batches: int) -> tuple[list[int], int]:
    """Replay the DataLoader's turn order for `skip_batches` batches.

    The DataLoader returns its workers' batches in turn (0, 1, ..., W-1, 0, ...), passing over workers
    that have run out. Returns (batches of each worker among the first `skip_batches`, the worker whose
    turn comes next). A resumed loader lets its physical worker p play worker (p + next) % W, so that its
    turn order continues where the interrupted one stopped.
    """
    remaining, skipped, taken, turn = list(batch_counts), [0] * len(batch_counts), 0, 0
    while taken < skip_batches and any(remaining):
        if remaining[turn] > 0:
            remaining[turn] -= 1
            skipped[turn] += 1
            taken += 1
        turn = (turn + 1) % len(remaining)
    return skipped, turn
