"""A validation split held out from a training set, fixed by a seed, written as shards of its own.

Every choice a training run makes (the checkpoint called best, a probe's best epoch, a recipe trial,
a sweep) is made on a validation split; when that split is the test split, the test numbers are
flattered. `holdout_indices` draws the held-out positions once from a seeded permutation, so the
same (size, held_out, seed) always gives the same split, and a training subset (`keep`) is drawn from
the rest without changing the held-out part. `write_indexed_shards` writes the chosen images with
their position in the source as the sample key, so anyone can check which images went where.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from mae_vit.data.writer import write_shards
from mae_vit.errors import ConfigError


def holdout_indices(n: int, held_out: int, *, seed: int, keep: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(training positions, held-out positions) of a set of `n`, both sorted and disjoint.

    The held-out part is the first `held_out` of a permutation of range(n) seeded by `seed`; the
    training part is the rest, or with `keep` its first `keep` (a random subset, the held-out part
    unchanged). ConfigError when the sizes do not fit in `n`.
    """
    rest = n - held_out
    if not 0 < held_out < n or (keep is not None and not 0 < keep <= rest):
        asked = f"{held_out} held out" + ("" if keep is None else f" and {keep} to train on")
        raise ConfigError(f"cannot take {asked} from {n} training images: the held-out part must leave some to train "
                          f"on, and a training subset can have at most the {max(rest, 0)} that are left. Ask for "
                          "fewer.")
    order = np.random.default_rng(seed).permutation(n)
    train = order[held_out:] if keep is None else order[held_out:held_out + keep]
    return np.sort(train), np.sort(order[:held_out])


def write_indexed_shards(images: np.ndarray, labels: np.ndarray, positions: np.ndarray, folder: str | Path, *,
                         class_names: list[str], samples_per_shard: int = 1000) -> dict:
    """Shards of images[positions] (uint8 (N, H, W) or (N, H, W, C)) with their labels; each sample's key is its
    position in `images` (8 digits), so the split can be checked against the source. Returns the index."""
    samples = ((f"{i:08d}", Image.fromarray(images[i]), int(labels[i])) for i in positions)
    return write_shards(samples, folder, class_names=class_names, total=len(positions),
                        samples_per_shard=samples_per_shard)
