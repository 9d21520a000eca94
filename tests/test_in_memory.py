"""data.in_memory: the shards decoded once into one tensor, cropped / flipped / normalised batch by batch."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tool
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from mae_vit.config import PretrainConfig, parse_config
from mae_vit.data import make_loader, synthetic_samples, write_shards
from mae_vit.data.in_memory import crop_boxes, decode_all, random_resized_crop_flip
from mae_vit.errors import DataError
from mae_vit.tasks.pretrain import Pretrain
from mae_vit.train.batches import MemoryBatches, TensorBatches

TINY = ["model.img_size=16", "model.embed_dim=48", "model.depth=2", "model.num_heads=3", "model.decoder_embed_dim=32",
        "model.decoder_depth=1", "model.decoder_num_heads=2", "data.batch_size=16", "data.num_workers=0",
        "optim.warmup_epochs=0", "train.log_every=1", "train.vis_every=1000", "train.max_steps=4",
        "knn.vs_random=false", "online_probe=false", "data.synthetic_samples=256"]


def indexed_shards(folder, count=32, per_shard=4, size=8):
    """Grey shards whose sample i is an image of value i (constant) with label i: samples identify themselves."""
    samples = ((f"{i:06d}", Image.fromarray(np.full((size, size), i, np.uint8), "L"), i) for i in range(count))
    write_shards(samples, folder, samples_per_shard=per_shard, progress=False, num_classes=count, stats=False)
    return str(folder / f"shard-{{000000..{count // per_shard - 1:06d}}}.tar")


def test_decode_all_returns_every_sample_once_in_file_order_with_the_shard_paths_pixels(tmp_path):
    write_shards(synthetic_samples(20, img_size=12), tmp_path, samples_per_shard=6, progress=False, stats=False)
    urls = str(tmp_path / "shard-{000000..000003}.tar")
    images, labels = decode_all(urls, in_chans=3)
    batch = next(iter(make_loader(urls, batch_size=20, shuffle=False, drop_last=False, in_chans=3)))
    assert images.dtype == torch.uint8 and images.shape == (20, 3, 12, 12)
    assert torch.equal(images, (batch["image"] * 255).round().to(torch.uint8))  # same pixels, same order
    assert labels.dtype == torch.int64 and torch.equal(labels, batch["label"])
    assert torch.equal(decode_all(urls, in_chans=3, labels=False)[1], torch.full((20,), -1))


def test_two_processes_together_see_every_sample_once_per_epoch_as_the_shard_path_does(tmp_path):
    urls = indexed_shards(tmp_path)
    images, labels = decode_all(urls, in_chans=1)
    assert labels.tolist() == list(range(32)) and images[:, 0, 0, 0].tolist() == list(range(32))

    def memory_epoch(epoch):
        seen = []
        for rank in (0, 1):
            data = MemoryBatches(images, labels, img_size=8, crop_scale=(1, 1), hflip=True, mean=[0.5], std=[0.5],
                                 batch_size=4, rank=rank, world_size=2, seed=3)
            assert data.batches_per_epoch(epoch) == 4
            seen += [label for batch in data.batches(epoch) for label in batch["label"].tolist()]
        return seen

    shard_seen = [label for rank in (0, 1) for batch in make_loader(urls, batch_size=4, rank=rank, world_size=2, seed=3,
                                                                    in_chans=1) for label in batch["label"].tolist()]
    first, second = memory_epoch(0), memory_epoch(1)
    assert sorted(first) == sorted(second) == sorted(shard_seen) == list(range(32))
    assert first != second  # another order in another epoch


def test_full_crop_without_flip_is_the_resized_image_and_a_flip_mirrors_it_exactly():
    image = (torch.arange(16, dtype=torch.uint8) * 10).view(1, 1, 4, 4)
    halved = random_resized_crop_flip(image, 2, scale=(1, 1), ratio=(1, 1), hflip=False)
    # bilinear at half-pixel centres: each output pixel is the mean of a 2 x 2 block
    assert torch.allclose(halved * 255, torch.tensor([[25.0, 45.0], [105.0, 125.0]]).view(1, 1, 2, 2), atol=1e-4)
    images = torch.randint(0, 256, (64, 3, 6, 6), dtype=torch.uint8)
    plain = random_resized_crop_flip(images, 6, (1, 1), (1, 1), hflip=False)
    assert torch.allclose(plain * 255, images.float(), atol=1e-3)  # same size: the image itself
    generator = torch.Generator().manual_seed(0)
    flipped = random_resized_crop_flip(images, 6, (1, 1), (1, 1), hflip=True, generator=generator)
    mirrored = torch.isclose(flipped, plain.flip(-1), atol=1e-5).flatten(1).all(1)
    unchanged = torch.isclose(flipped, plain, atol=1e-5).flatten(1).all(1)
    assert torch.all(mirrored | unchanged) and 16 < int(mirrored.sum()) < 48


def test_batches_have_the_models_size_and_the_configs_normalisation():
    images = torch.full((8, 3, 10, 10), 51, dtype=torch.uint8)  # 51 / 255 = 0.2 everywhere
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 0.125]
    data = MemoryBatches(images, torch.arange(8), img_size=16, crop_scale=(0.2, 1.0), hflip=True, mean=mean, std=std,
                         interpolation="bicubic", batch_size=4)
    batch = next(iter(data.batches(0)))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["image"].dtype == torch.float32
    expected = torch.tensor([(0.2 - m) / s for m, s in zip(mean, std)]).view(1, 3, 1, 1).expand(4, 3, 16, 16)
    assert torch.allclose(batch["image"], expected, atol=1e-5)
    again = next(iter(MemoryBatches(torch.randint(0, 256, (8, 3, 10, 10), dtype=torch.uint8), torch.arange(8),
                                    img_size=16, crop_scale=(0.2, 1.0), hflip=True, mean=mean, std=std,
                                    batch_size=4).batches(1, skip=1)))
    assert again["image"].std() > 0.5  # the pixels are there


def test_a_resumed_epoch_replays_the_same_augmented_batches():
    images = torch.randint(0, 256, (40, 3, 10, 10), dtype=torch.uint8)
    data = MemoryBatches(images, torch.arange(40), img_size=8, crop_scale=(0.2, 1.0), hflip=True, mean=[0.5] * 3,
                         std=[0.5] * 3, batch_size=4, seed=7)
    whole, resumed = list(data.batches(2)), list(data.batches(2, skip=3))
    assert len(whole) == 10 and len(resumed) == 7
    assert all(torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
               for a, b in zip(whole[3:], resumed))
    assert not torch.equal(whole[0]["image"], list(data.batches(3))[0]["image"])


def test_crop_boxes_follow_torchvisions_random_resized_crop():
    top, left, h, w = crop_boxes(4000, 200, 100, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3),
                                 generator=torch.Generator().manual_seed(0))
    area = h * w / (200 * 100)
    theirs = torch.tensor([RandomResizedCrop.get_params(torch.zeros(1, 200, 100), (0.2, 1.0), (3 / 4, 4 / 3))
                           for _ in range(4000)], dtype=torch.float32)  # (4000, 4): top, left, h, w
    their_area = theirs[:, 2] * theirs[:, 3] / (200 * 100)
    assert area.min() >= 0.2 - 0.01 and area.max() <= 1.0 and float(area.std()) > 0.1
    assert float(area.mean()) == pytest.approx(float(their_area.mean()), abs=0.02)
    assert float((area > 0.6).float().mean()) == pytest.approx(float((their_area > 0.6).float().mean()), abs=0.03)
    assert (w / h).min() >= 3 / 4 - 0.02 and (w / h).max() <= 4 / 3 + 0.02
    assert top.min() >= 0 and left.min() >= 0 and (top + h).max() <= 200 and (left + w).max() <= 100
    assert len(set(zip(top.tolist(), left.tolist()))) > 1000  # placed at random
    # no try fits a 2:1 crop of the whole 10 x 10 image: torchvision's fallback, the centred 10 x 5 strip
    top, left, h, w = crop_boxes(3, 10, 10, scale=(1, 1), ratio=(2, 2))
    assert (top.tolist(), left.tolist(), h.tolist(), w.tolist()) == ([2, 2, 2], [0, 0, 0], [5, 5, 5], [10, 10, 10])


def test_images_of_several_sizes_and_a_set_over_the_limit_are_refused_with_the_way_out(tmp_path):
    samples = [(f"{i:06d}", Image.new("L", (8, 8) if i < 3 else (9, 7)), 0) for i in range(4)]
    write_shards(samples, tmp_path / "mixed", progress=False, stats=False)
    with pytest.raises(DataError, match=r"'000003' is 9 x 7 px .* the first one is 8 x 8 px.*data.in_memory=false"):
        decode_all(str(tmp_path / "mixed" / "shard-000000.tar"), in_chans=1)
    urls = indexed_shards(tmp_path / "indexed")
    with pytest.raises(DataError, match=r"32 training images \(1 x 8 x 8 px each\).*2,048 bytes.*limit of 1,000 bytes"
                                        r".*data.in_memory=false"):
        decode_all(urls, in_chans=1, limit_bytes=1000)


@pytest.mark.slow
def test_a_short_pretraining_in_memory_starts_at_the_shard_paths_loss(tmp_path):
    common = [*TINY, f"data.cache_dir={tmp_path / 'cache'}"]
    losses = {}
    for in_memory in ("false", "true"):
        run = tmp_path / in_memory
        result = tool("pretrain.py", "--output-dir", str(run), *common, f"data.in_memory={in_memory}")
        assert ("in memory: 256 images of 3x32x32 px" in result.stdout + result.stderr) == (in_memory == "true")
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["step"] == 4 and math.isfinite(metrics["last_loss"])
        losses[in_memory] = metrics["first_loss"]  # step 1: the same initial weights on both paths
    assert losses["true"] == pytest.approx(losses["false"], rel=0.15)


@pytest.mark.slow
def test_fine_tuning_in_memory_refuses_randaugment_and_erasing_and_trains_without_them(tmp_path):
    common = ["model.img_size=16", "model.embed_dim=48", "model.depth=2", "model.num_heads=3", "data.batch_size=16",
              "data.num_workers=0", "optim.warmup_epochs=0", "train.max_steps=3", "data.synthetic_samples=128",
              f"data.cache_dir={tmp_path / 'cache'}", "data.in_memory=true"]
    script = Path(__file__).resolve().parent.parent / "tools" / "finetune.py"
    refused = subprocess.run([sys.executable, str(script), "--output-dir", str(tmp_path / "a"), *common],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "augment.randaug_num_ops=0 augment.reprob=0" in refused.stderr
    assert not (tmp_path / "a").exists()  # refused before anything was written
    result = tool("finetune.py", "--output-dir", str(tmp_path / "b"), *common, "augment.randaug_num_ops=0",
                  "augment.reprob=0")
    assert "in memory: 128 images of 3x32x32 px" in result.stdout + result.stderr
    assert math.isfinite(json.loads((tmp_path / "b" / "metrics.json").read_text())["train_loss"])


def test_pretrainings_default_holds_the_synthetic_demo_in_memory_and_streams_given_shards(tmp_path):
    urls = indexed_shards(tmp_path / "shards")
    common = [f"data.cache_dir={tmp_path / 'cache'}", "data.synthetic_samples=64"]
    for argv, parsed, expected in (([], None, True), (["--data", urls], None, False),
                                   (["data.in_memory=false"], False, False)):
        cfg = parse_config(PretrainConfig, [*argv, *common])
        assert cfg.data.in_memory is parsed
        Pretrain(cfg).check(resuming=False)
        assert cfg.data.in_memory is expected


class IndexDevices(torch.overrides.TorchFunctionMode):
    """Records the device of every tensor index used to read from a tensor (x[idx])."""

    def __init__(self):
        super().__init__()
        self.devices = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__getitem__ and isinstance(args[1], torch.Tensor):
            self.devices.append((args[0].device, args[1].device))
        return func(*args, **(kwargs or {}))


def test_the_in_memory_path_indexes_the_device_tensor_with_an_index_already_on_that_device():
    # "meta" stands in for a GPU: a CPU index into a device tensor is a blocking host-to-device copy per batch
    images, labels = torch.empty(40, 3, 8, 8, dtype=torch.uint8), torch.arange(40)
    data = TensorBatches(images.to("meta"), labels.to("meta"), batch_size=4, seed=7, rank=1, world_size=2)
    with IndexDevices() as seen:
        batches = list(data.batches(2, skip=1))
    assert len(batches) == 4 and len(seen.devices) == 8  # images and labels of each batch
    assert all(index == tensor == torch.device("meta") for tensor, index in seen.devices)
    # the order is the CPU permutation of (seed, epoch) whatever the device: a resume replays it anywhere
    cpu = list(TensorBatches(images, labels, batch_size=4, seed=7, rank=1, world_size=2).batches(2, skip=1))
    order = torch.randperm(40, generator=torch.Generator().manual_seed(7 * 1_000_003 + 2))[1::2]
    assert torch.equal(torch.cat([b["label"] for b in cpu]), order[4:20])


@pytest.mark.gpu
def test_an_in_memory_epoch_on_the_gpu_never_waits_for_the_device():
    images = torch.randint(0, 256, (64, 3, 12, 12), dtype=torch.uint8)
    data = MemoryBatches(images, torch.arange(64), img_size=8, crop_scale=(0.2, 1.0), hflip=True, mean=[0.5] * 3,
                         std=[0.5] * 3, batch_size=8, seed=1, device="cuda")
    list(data.batches(0))  # warm: kernels loaded, the generator made
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync (a blocking copy, .item(), .cpu()) raises
    try:
        batches = list(data.batches(1, skip=2))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(batches) == 6 and batches[0]["image"].device.type == "cuda"
    assert sorted(torch.cat([b["label"] for b in data.batches(1)]).tolist()) == list(range(64))


def test_in_memory_evaluation_batches_are_the_shard_paths_eval_images_resized_and_cropped_once(tmp_path):
    from types import SimpleNamespace

    from mae_vit.train.batches import ShardBatches, eval_batches, transform_for

    write_shards(synthetic_samples(20, img_size=12), tmp_path, samples_per_shard=6, progress=False, stats=False)
    urls = str(tmp_path / "shard-{000000..000003}.tar")
    cfg = parse_config(PretrainConfig, [*TINY, "model.img_size=8", "data.mean=[0.4,0.5,0.6]", "data.std=[0.2,0.3,0.4]",
                                        "data.batch_size=6", "data.in_memory=true"])
    one = SimpleNamespace(process_index=0, num_processes=1, device=torch.device("cpu"))
    shard = list(ShardBatches(urls, cfg, transform_for(cfg, "eval"), accelerator=one, train=False).batches())
    memory = eval_batches(urls, cfg, accelerator=one)
    assert memory.inputs.dtype == torch.uint8 and memory.inputs.shape == (20, 3, 8, 8)  # 12 px resized and cropped
    for _ in range(2):  # every pass gives the same batches, from the tensor
        batches = list(memory.batches())
        assert [len(b["label"]) for b in batches] == [6, 6, 6, 2]  # the last partial batch kept, as on shards
        assert torch.equal(torch.cat([b["label"] for b in batches]), torch.cat([b["label"] for b in shard]))
        assert torch.equal(torch.cat([b["image"] for b in batches]), torch.cat([b["image"] for b in shard]))
    halves = [eval_batches(urls, cfg, accelerator=SimpleNamespace(process_index=r, num_processes=2, device="cpu"))
              for r in (0, 1)]
    labels = [torch.cat([b["label"] for b in h.batches()]) for h in halves]
    assert sorted(torch.cat(labels).tolist()) == sorted(torch.cat([b["label"] for b in shard]).tolist())


@pytest.mark.slow  # a whole training run
def test_in_memory_pretraining_evaluates_from_memory_without_a_loader_per_set(tmp_path, monkeypatch):
    """The online probe's validation every epoch, the kNN monitor and the encoder check read the sets decoded once
    (before: one loader with workers per set, decoding and resizing every image again at every pass)."""
    from mae_vit.data import ensure_demo_shards, loader
    from mae_vit.tasks.pretrain import pretrain
    from tests.test_pretrain import args

    built = []

    class Counted(loader.ShardLoader):
        def __init__(self, dataset, **options):
            built.append(options["num_workers"])
            super().__init__(dataset, **options)

    monkeypatch.setattr(loader, "ShardLoader", Counted)
    train, val = ensure_demo_shards(tmp_path / "cache", num_samples=64)
    summary = pretrain(parse_config(PretrainConfig, args(tmp_path / "run", train, "optim.epochs=2", "knn.every=1",
                                                         "data.num_workers=1", f"data.val={val}",
                                                         "data.in_memory=true")))
    assert summary["online_probe_top1"] is not None and summary["vs_random"] is not None
    assert summary["knn_top1"] == summary["vs_random"]["pretrained"]  # the same encoder, the same memory
    assert built == [0]  # only the fixed reconstruction images, read once without workers
