"""The shard loader keeps its DataLoader workers from epoch to epoch (issue 17 item 7): the same processes serve
every epoch, and every epoch is the one a fresh loader built for it gives (samples, order, augmentation draws),
after a resume inside an epoch and after an epoch left part-way too."""

import os
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from mae_vit.data.loader import make_loader
from mae_vit.train.batches import ShardBatches, step_batches
from tests.test_data_shards import make_set


def pid_and_draw(image) -> torch.Tensor:
    """The worker's process id and one draw of its torch RNG (what a random augmentation would draw)."""
    return torch.tensor([float(os.getpid()), torch.rand(()).item()], dtype=torch.float64)


def shard_batches(urls, *, num_workers=2, batch_size=3, train=True, seed=5):
    cfg = OmegaConf.create({"data": {"batch_size": batch_size, "num_workers": num_workers, "shuffle_buffer": 6},
                            "model": {"in_chans": 3, "num_classes": 10}, "train": {"seed": seed}})
    place = SimpleNamespace(process_index=0, num_processes=1, device=torch.device("cpu"))
    return ShardBatches(urls, cfg, pid_and_draw, accelerator=place, train=train)


def fresh(data: ShardBatches, epoch: int, skip: int = 0) -> list[dict]:
    """The batches of a new loader built for this epoch alone (what every epoch got before)."""
    return list(make_loader(data.urls, transform=data.transform, epoch=epoch, skip_batches=skip, **data.options,
                            **data.loader_options))


def keys_and_draws(batches) -> list[tuple]:
    return [(tuple(b["key"]), tuple(b["image"][:, 1].tolist())) for b in batches]


def pids(batches) -> set[int]:
    return {int(p) for b in batches for p in b["image"][:, 0].tolist()}


@pytest.fixture
def shards(tmp_path):
    urls, keys = make_set(tmp_path, [7, 2, 9, 4, 3])  # the two workers get unequal numbers of batches
    return urls, keys


def test_the_loaders_workers_are_the_same_processes_in_every_epoch(shards):
    data = shard_batches(shards[0])
    seen = [pids(list(data.batches(epoch))) for epoch in range(3)]
    assert len(seen[0]) == 2 and os.getpid() not in seen[0]
    assert seen[1] == seen[0] and seen[2] == seen[0]


def test_every_epoch_gives_the_batches_and_draws_of_a_fresh_loader_built_for_it(shards):
    urls, keys = shards
    for train in (True, False):
        data = shard_batches(urls, train=train)
        for epoch in range(3):
            got = list(data.batches(epoch))
            assert keys_and_draws(got) == keys_and_draws(fresh(data, epoch)), (train, epoch)
            read = [k for b in got for k in b["key"]]
            assert len(read) == len(set(read))  # no sample twice
            if not train:  # evaluation keeps the last partial batches: every sample exactly once
                assert sorted(read) == keys
        assert len(pids(got)) == 2


def test_the_draws_of_an_epoch_are_those_a_loader_built_for_it_drew_before_workers_were_kept(shards):
    data = shard_batches(shards[0])
    list(data.batches(0))
    got = [(k, round(v, 6)) for b in list(data.batches(1))[:2] for k, v in zip(b["key"], b["image"][:, 1].tolist())]
    # recorded from a fresh loader for epoch 1 (each worker seeded from the loader's generator) before the change
    assert got == [("00000011", 0.19045), ("00000013", 0.994823), ("00000012", 0.141154),
                   ("00000020", 0.700411), ("00000018", 0.193757), ("00000022", 0.995345)]


def test_an_epoch_left_part_way_does_not_leak_into_the_next(shards):
    data = shard_batches(shards[0])
    next(iter(data.batches(0)))  # the plan needed fewer batches than this share holds
    assert keys_and_draws(data.batches(1)) == keys_and_draws(fresh(data, 1))
    assert keys_and_draws(data.batches(1)) == keys_and_draws(fresh(data, 1))  # the same epoch read again


def test_a_resume_inside_an_epoch_gives_the_batches_a_fresh_loader_gives(shards):
    data = shard_batches(shards[0])
    assert keys_and_draws(data.batches(1, 2)) == keys_and_draws(fresh(data, 1, 2))
    assert keys_and_draws(data.batches(2)) == keys_and_draws(fresh(data, 2))
    assert keys_and_draws(data.batches(3, 1)) == keys_and_draws(fresh(data, 3, 1))


class Fresh:
    """A new loader for every epoch, as `ShardBatches.batches` built them before."""

    def __init__(self, data: ShardBatches):
        self.data = data

    def batches(self, epoch: int = 0, skip: int = 0):
        return fresh(self.data, epoch, skip)


def steps(data, first_step: int, n: int, per_epoch: int) -> list:
    plan = SimpleNamespace(first_step=first_step, steps_per_epoch=per_epoch, accum=1)
    out = []
    for micro in step_batches(data, plan):
        out.append(keys_and_draws(micro))
        if len(out) == n:
            return out


def keys_only(steps_: list) -> list:
    return [[keys for keys, _ in micro] for micro in steps_]


def test_a_resumed_run_reads_the_samples_of_the_run_that_was_not_stopped_with_the_draws_of_before(shards):
    per_epoch = shard_batches(shards[0]).batches_per_epoch(0) - 1  # one batch of each epoch is left unread
    whole = steps(shard_batches(shards[0]), 0, 3 * per_epoch, per_epoch)
    assert whole == steps(Fresh(shard_batches(shards[0])), 0, 3 * per_epoch, per_epoch)
    resumed = steps(shard_batches(shards[0]), per_epoch + 2, 2 * per_epoch - 2, per_epoch)
    assert keys_only(resumed) == keys_only(whole[per_epoch + 2:])
    # augmentation draws are not replayed by a resume (the skipped samples are not decoded), as before
    assert resumed == steps(Fresh(shard_batches(shards[0])), per_epoch + 2, 2 * per_epoch - 2, per_epoch)


def test_without_workers_each_epoch_is_still_a_fresh_loaders(shards):
    data = shard_batches(shards[0], num_workers=0)
    for epoch in (0, 1):
        assert [b["key"] for b in data.batches(epoch)] == [b["key"] for b in fresh(data, epoch)]


@pytest.mark.slow  # a whole training run
def test_a_pretraining_run_builds_each_of_its_loaders_with_workers_once(tmp_path, monkeypatch):
    """Training batches, the online probe's validation and the kNN monitor's two sets: one loader each, their
    workers kept from epoch to epoch and on to the end-of-run encoder check."""
    from mae_vit.config import PretrainConfig, parse_config
    from mae_vit.data import ensure_demo_shards, expand_urls, loader
    from mae_vit.tasks.pretrain import pretrain
    from tests.test_pretrain import args

    built = []

    class Counted(loader.ShardLoader):
        def __init__(self, dataset, **options):
            built.append((dataset.urls[0], options["num_workers"]))
            super().__init__(dataset, **options)

    monkeypatch.setattr(loader, "ShardLoader", Counted)
    train, val = ensure_demo_shards(tmp_path / "cache", num_samples=64)
    summary = pretrain(parse_config(PretrainConfig, args(tmp_path / "run", train, "optim.epochs=3", "knn.every=1",
                                                         "data.num_workers=1", f"data.val={val}")))
    assert summary["online_probe_top1"] is not None and summary["vs_random"] is not None
    with_workers = [urls for urls, workers in built if workers]
    first = {name: expand_urls(urls)[0] for name, urls in (("train", train), ("val", val))}
    assert sorted(with_workers) == sorted([first["train"], first["train"], first["val"]])


def test_the_loader_benchmark_measures_the_epoch_boundary_with_a_new_loader_and_with_kept_workers(tmp_path):
    from mae_vit.bench.loader_speed import loader_speed
    from mae_vit.data import ensure_demo_shards

    train, _ = ensure_demo_shards(tmp_path, num_samples=64, num_classes=4, img_size=8)
    lines = []
    result = loader_speed(train, img_size=8, batch_size=4, workers=(0, 2), seconds=0.1, report=lines.append)
    boundary = result["epoch_boundary"]
    assert boundary["workers"] == 2 and boundary["boundaries"] == 2
    assert boundary["new_loader_s"] > 0 and boundary["kept_workers_s"] > 0 and boundary["batch_interval_s"] > 0
    assert any(line.startswith("epoch boundary, 2 worker(s):") for line in lines)
