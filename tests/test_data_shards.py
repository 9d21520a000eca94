"""Shard reading: URL expansion, index, exactly-once splitting over ranks x workers, epochs, bad data, resume."""

import logging
import multiprocessing
import os
from collections import Counter

import pytest
import torch

from mae_vit.data.demo import ensure_demo_shards
from mae_vit.data.loader import make_loader, rank_batch_counts
from mae_vit.data.split import kept_in_range, resume_plan
from mae_vit.data.synthetic import synthetic_samples
from mae_vit.data.urls import count_tar_samples, expand_urls, read_index
from mae_vit.data.writer import shard_urls, write_shards
from mae_vit.errors import DataError


def make_set(folder, counts, img_size=8, bad_keys=()):
    """Shards holding `counts[i]` samples each; keys 00000000..; samples in bad_keys get garbage png bytes."""
    total = sum(counts)
    samples = [
        (key, (b"garbage, not a png", "png") if key in bad_keys else image, label)
        for key, image, label in synthetic_samples(total, img_size=img_size, num_classes=10)
    ]
    start = 0
    for number, count in enumerate(counts):  # one write per shard to get exactly these sizes
        write_shards(samples[start : start + count], folder / f"part{number}", progress=False)
        os.replace(folder / f"part{number}" / "shard-000000.tar", folder / f"shard-{number:06d}.tar")
        start += count
    shards = {f"shard-{n:06d}.tar": c for n, c in enumerate(counts)}
    (folder / "shard-index.json").write_text(
        '{"shards": %s, "num_samples": %d, "num_classes": 10}' % (str(shards).replace("'", '"'), total)
    )
    return shard_urls(folder, "shard", len(counts)), [f"{i:08d}" for i in range(total)]


def epoch_batches(urls, *, rank=0, world_size=1, num_workers=2, epoch=0, batch_size=4, drop_last=False, **kw):
    loader = make_loader(urls, batch_size=batch_size, num_workers=num_workers, rank=rank, world_size=world_size,
                         epoch=epoch, drop_last=drop_last, shuffle_buffer=kw.pop("shuffle_buffer", 10), **kw)
    return list(loader)


def keys_of(batches):
    return [k for b in batches for k in b["key"]]


# -- URLs and index --------------------------------------------------------------------------------


def test_expand_urls_forms(tmp_path):
    urls, _ = make_set(tmp_path, [2, 2, 2])
    names = [str(tmp_path / f"shard-{n:06d}.tar") for n in range(3)]
    assert expand_urls(urls) == names
    assert expand_urls(str(tmp_path / "shard-{000000,000002}.tar")) == [names[0], names[2]]
    assert expand_urls(f"{names[1]}::{tmp_path}/shard-00000[02].tar") == [names[1], names[0], names[2]]
    assert expand_urls(str(tmp_path)) == names  # a folder: its .tar files
    assert expand_urls(["pipe:cat x.tar", "https://h/s-{0..1}.tar"]) == ["pipe:cat x.tar", "https://h/s-0.tar",
                                                                         "https://h/s-1.tar"]


@pytest.mark.parametrize("spec", ["missing-{000000..000001}.tar", "nothing-*.tar", "empty_dir", ""])
def test_expand_urls_missing_paths(tmp_path, spec):
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="make_shards"):
        expand_urls(str(tmp_path / spec) if spec else spec)


def test_missing_path_fails_when_the_loader_is_made(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nope.tar")):
        make_loader(str(tmp_path / "nope.tar"), batch_size=2)


def test_read_index_and_counts(tmp_path):
    urls, _ = make_set(tmp_path, [3, 1, 2])
    index = read_index(urls)
    assert list(index["shards"].values()) == [3, 1, 2] and index["num_samples"] == 6 and index["num_classes"] == 10
    assert read_index(expand_urls(urls)[:2])["num_samples"] == 4
    assert read_index(["pipe:cat x"]) is None
    assert count_tar_samples(expand_urls(urls)[0]) == 3
    (tmp_path / "shard-index.json").unlink()
    assert read_index(urls) is None
    assert rank_batch_counts(urls, world_size=1, num_workers=0, batch_size=1) == [6]  # counts tar headers


# -- exactly-once splitting ----------------------------------------------------------------------------


@pytest.mark.parametrize("counts", [[5, 3, 4, 6, 2, 5, 4, 3], [7, 6, 5], [9]], ids=["8 shards", "3 shards", "1 shard"])
def test_every_sample_exactly_once_over_2_ranks_x_2_workers(tmp_path, counts):
    urls, all_keys = make_set(tmp_path, counts)
    per_rank = [keys_of(epoch_batches(urls, rank=r, world_size=2, epoch=1)) for r in range(2)]
    together = per_rank[0] + per_rank[1]
    assert sorted(together) == all_keys  # union is everything, nothing twice
    assert [len(k) for k in per_rank] == rank_batch_counts(urls, world_size=2, num_workers=2, batch_size=1, epoch=1)


def test_rank_batch_counts_are_the_full_batches_of_each_rank(tmp_path):
    urls, _ = make_set(tmp_path, [5, 3, 4, 6, 2, 5, 4, 3])
    for epoch in (0, 1):
        full = [len(epoch_batches(urls, rank=r, world_size=2, epoch=epoch, batch_size=3, drop_last=True))
                for r in range(2)]
        assert rank_batch_counts(urls, world_size=2, num_workers=2, batch_size=3, epoch=epoch) == full


def test_without_workers_and_single_rank(tmp_path):
    urls, all_keys = make_set(tmp_path, [4, 4])
    batches = epoch_batches(urls, num_workers=0, batch_size=3)
    assert sorted(keys_of(batches)) == all_keys and [len(b["key"]) for b in batches] == [3, 3, 2]


def test_epochs_reorder_and_same_epoch_repeats(tmp_path):
    urls, all_keys = make_set(tmp_path, [6, 6, 6, 6])
    first = keys_of(epoch_batches(urls, epoch=0))
    again = keys_of(epoch_batches(urls, epoch=0))
    other = keys_of(epoch_batches(urls, epoch=1))
    assert first == again
    assert other != first and sorted(other) == sorted(first) == all_keys
    in_order = keys_of(epoch_batches(urls, num_workers=0, shuffle=False))
    assert in_order == all_keys


def test_the_epoch_reaches_the_workers(tmp_path):
    urls, _ = make_set(tmp_path, [6, 6, 6, 6])
    loader = make_loader(urls, batch_size=4, num_workers=2, epoch=1, shuffle_buffer=10, drop_last=False)
    assert keys_of(list(loader)) == keys_of(epoch_batches(urls, epoch=1)) != keys_of(epoch_batches(urls, epoch=0))


def test_batch_contents(tmp_path):
    urls, _ = make_set(tmp_path, [6, 6], img_size=12)
    batch = epoch_batches(urls, batch_size=4, in_chans=1, num_workers=0)[0]
    assert batch["image"].shape == (4, 1, 12, 12) and batch["image"].dtype == torch.float32
    assert batch["label"].dtype == torch.long
    assert batch["label"].tolist() == [int(k) % 10 for k in batch["key"]]
    assert batch["skipped"] == 0 and batch["skipped_shards"] == 0
    unlabeled = epoch_batches(urls, batch_size=4, with_labels=False, num_workers=0)[0]
    assert "label" not in unlabeled and unlabeled["image"].shape == (4, 3, 12, 12)


# -- bad data ----------------------------------------------------------------------------------------------


def totals(batches):
    return sum(b["skipped"] for b in batches), sum(b["skipped_shards"] for b in batches)


def test_corrupt_sample_is_skipped_and_counted(tmp_path, caplog):
    urls, all_keys = make_set(tmp_path, [5, 5, 5, 5], bad_keys={"00000007"})
    with caplog.at_level(logging.WARNING):
        batches = [b for r in range(2) for b in epoch_batches(urls, rank=r, world_size=2, num_workers=0)]
    assert sorted(keys_of(batches)) == [k for k in all_keys if k != "00000007"]
    assert totals(batches) == (1, 0)
    assert "00000007" in caplog.text


@pytest.mark.parametrize(
    "counts, world_size, readers",
    [([5, 5, 5, 5, 5, 5, 5, 5], 2, 1), ([8, 8], 3, 6)],
    ids=["shard split", "sample split"],  # sample split: 2 shards < 3 ranks, all 6 processes read the bad one
)
@pytest.mark.parametrize("damage", ["garbage", "truncated", "deleted"])
def test_bad_shard_is_skipped_and_counted_in_the_batches(tmp_path, caplog, counts, world_size, readers, damage):
    urls, all_keys = make_set(tmp_path, counts)
    loaders = [make_loader(urls, batch_size=2, num_workers=2, rank=r, world_size=world_size, drop_last=False)
               for r in range(world_size)]
    in_process = make_loader(urls, batch_size=2, num_workers=0)  # made before the damage (a missing path fails here)
    bad = tmp_path / "shard-000001.tar"
    if damage == "garbage":
        bad.write_bytes(os.urandom(5000))
    elif damage == "truncated":
        bad.write_bytes(bad.read_bytes()[: 512 * 4 + 100])  # inside the second sample's image
    else:
        bad.unlink()
    batches = [b for loader in loaders for b in loader]
    lost = set(all_keys[counts[0] : counts[0] + counts[1]])
    got = keys_of(batches)
    assert len(got) == len(set(got))
    # Samples before the damage in a truncated shard are kept; the others of that shard are counted as skipped.
    assert set(all_keys) - lost <= set(got) <= set(all_keys)
    assert len(got) == len(all_keys) - (len(lost) - (1 if damage == "truncated" else 0))
    assert totals(batches) == (len(all_keys) - len(got), readers)
    with caplog.at_level(logging.WARNING):  # logs of worker processes do not reach caplog: read in-process
        list(in_process)
    assert "unreadable shard" in caplog.text and "shard-000001.tar" in caplog.text


def test_skips_after_a_workers_last_batch_still_reach_a_batch(tmp_path):
    # The bad sample is the last one read, after every full batch: it arrives as a count-only record.
    urls, all_keys = make_set(tmp_path, [6], bad_keys={"00000005"})
    for workers, batch_size, sizes in ((0, 5, [5]), (2, 2, [2, 2])):  # 2 workers: samples 0,2,4 and 1,3,5
        batches = epoch_batches(urls, num_workers=workers, batch_size=batch_size, drop_last=True, shuffle=False)
        assert [len(b["key"]) for b in batches] == sizes and totals(batches) == (1, 0)


# -- resume inside an epoch -------------------------------------------------------------------------------------


def test_skip_batches_replays_the_rest_of_the_epoch(tmp_path):
    urls, _ = make_set(tmp_path, [7, 2, 9, 4, 3])  # workers get unequal numbers of batches
    full = [b["key"] for b in epoch_batches(urls, batch_size=3, drop_last=True, epoch=2)]
    assert len(full) >= 6
    for skip in (1, 2, 3, len(full) - 1, len(full)):
        rest = [b["key"] for b in epoch_batches(urls, batch_size=3, drop_last=True, epoch=2, skip_batches=skip)]
        assert rest == full[skip:], skip


def test_skip_plan_helpers():
    assert resume_plan([1, 3], 3) == ([1, 2], 0)  # 0, 1, (0 is out), 1 -> worker 0's turn (passed over)
    assert resume_plan([2, 2], 3) == ([2, 1], 1)
    assert resume_plan([3, 3, 3], 0) == ([0, 0, 0], 0)
    assert kept_in_range(3, 11, 4, 1) == 2  # 5 and 9
    assert kept_in_range(0, 1, 4, 1) == 0


# -- demo data --------------------------------------------------------------------------------------------------


def _ensure(cache):
    return ensure_demo_shards(cache, num_samples=16, num_classes=4, img_size=8)


def test_demo_shards_are_made_once_and_reused(tmp_path):
    train, val = _ensure(tmp_path)
    folder = tmp_path / "synthetic-8px-16-4c-s0"
    assert train == str(folder / "train" / "shard-{000000..000007}.tar")
    assert val == str(folder / "val" / "shard-{000000..000003}.tar")
    assert read_index(train)["num_samples"] == 16 and read_index(val)["num_samples"] == 4
    stamp = os.stat(folder / "train" / "shard-000000.tar").st_mtime_ns
    assert _ensure(tmp_path) == (train, val)
    assert os.stat(folder / "train" / "shard-000000.tar").st_mtime_ns == stamp
    labels = Counter(int(label) for b in epoch_batches(train, num_workers=0) for label in b["label"])
    assert labels == {0: 4, 1: 4, 2: 4, 3: 4}
    (folder / "val" / "shard-000002.tar").unlink()
    with pytest.raises(DataError, match="Delete that folder"):
        _ensure(tmp_path)


def test_demo_shards_two_processes_at_once(tmp_path):
    context = multiprocessing.get_context("fork")
    with context.Pool(2) as pool:
        results = pool.map(_ensure, [tmp_path, tmp_path])
    assert results[0] == results[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic-8px-16-4c-s0"]
    assert sorted(keys_of(epoch_batches(results[0][0]))) == [f"{i:08d}" for i in range(16)]


def test_labels_asked_of_unlabeled_shards(tmp_path):
    write_shards([(f"k{i}", (b"x", "png"), None) for i in range(3)], tmp_path, progress=False)
    with pytest.raises(DataError, match="unlabeled"):
        make_loader(str(tmp_path), batch_size=2)
    assert make_loader(str(tmp_path), batch_size=2, with_labels=False).dataset.num_classes is None


def test_out_of_range_label_is_a_bad_sample(tmp_path):
    urls, all_keys = make_set(tmp_path, [4])
    (tmp_path / "shard-index.json").write_text('{"shards": {"shard-000000.tar": 4}, "num_classes": 2}')
    batches = epoch_batches(urls, num_workers=0, batch_size=8, shuffle=False)  # labels are 0, 1, 2, 3
    assert keys_of(batches) == all_keys[:2] and totals(batches) == (2, 0)


def test_without_an_index_a_label_beyond_the_models_classes_is_skipped_and_counted(tmp_path):
    from mae_vit.data.in_memory import decode_all

    urls, all_keys = make_set(tmp_path, [6])
    (tmp_path / "shard-index.json").unlink()  # hand-made shards: nothing says how many classes there are
    batches = epoch_batches(urls, num_workers=0, batch_size=8, shuffle=False, num_classes=4)  # labels 0..5
    assert keys_of(batches) == all_keys[:4] and totals(batches) == (2, 0)
    images, labels = decode_all(urls, 3, labels=True, num_classes=4)
    assert images.shape[0] == 4 and labels.tolist() == [0, 1, 2, 3]


def set_index_entry(folder, update):
    import json

    index = json.loads((folder / "shard-index.json").read_text())
    update(index)
    (folder / "shard-index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("count, words", [("abc", '"abc" as the sample count'), (None, "null as the sample count"),
                                          (2.5, "2.5 as the sample count"), (-5, r"a negative sample count \(-5\)")])
def test_an_index_count_that_is_not_a_whole_number_at_least_0_is_a_data_error(tmp_path, count, words):
    urls, _ = make_set(tmp_path, [4, 4])
    set_index_entry(tmp_path, lambda index: index["shards"].update({"shard-000001.tar": count}))
    with pytest.raises(DataError, match=words):
        read_index(urls)


def test_an_index_count_larger_than_the_tar_could_hold_is_replaced_by_the_real_count(tmp_path, caplog):
    urls, _ = make_set(tmp_path, [4, 4])
    set_index_entry(tmp_path, lambda index: index["shards"].update({"shard-000000.tar": 10_000_000}))
    assert list(read_index(urls)["shards"].values()) == [4, 4]
    assert "lists 10000000 samples" in caplog.text and "using the 4 samples" in caplog.text


def test_index_statistics_that_are_not_numbers_are_a_data_error(tmp_path):
    urls, _ = make_set(tmp_path, [4])
    stats = {"rgb": {"mean": ["abc", 0.5, 0.5], "std": [0.2, 0.2, 0.2]}, "grey": {"mean": [0.5], "std": [0.2]}}
    set_index_entry(tmp_path, lambda index: index.update(stats=stats))
    with pytest.raises(DataError, match="statistics"):
        read_index(urls)
