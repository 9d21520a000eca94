"""data.gpu_decode: JPEGs stay encoded in the workers and are decoded, cropped and flipped in the training process.

Most tests run the CPU fallback, the same code with device="cpu"; those marked `gpu` need CUDA.
"""

import io
import json
import math
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import tool
from omegaconf import OmegaConf
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from mae_vit.bench.loader_speed import loader_speed
from mae_vit.data import make_loader, write_shards
from mae_vit.data.gpu_decode import JpegDecoder, crop_flip_each
from mae_vit.train.batches import GpuDecodeBatches

CPU = SimpleNamespace(device=torch.device("cpu"), process_index=0, num_processes=1)


def jpeg(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, **options)
    return buffer.getvalue()


def grey_shards(folder, count=24, per_shard=4, bad=(), png=()):
    """Sample i: a flat grey JPEG of value 10 i (PNG for i in `png`; for i in `bad` a JPEG cut before its data,
    whose header reads well), (8 + i % 5) px wide and 10 px high, label i: every sample tells its label by its
    pixels."""
    def sample(i):
        image = Image.fromarray(np.full((10, 8 + i % 5), 10 * i, np.uint8), "L")
        encoded = jpeg(image)
        data = (encoded[:encoded.find(b"\xff\xda")], "jpg") if i in bad else image if i in png else (encoded, "jpg")
        return f"{i:06d}", data, i
    write_shards((sample(i) for i in range(count)), folder, samples_per_shard=per_shard, progress=False,
                 num_classes=count, stats=False)
    return str(folder / f"shard-{{000000..{count // per_shard - 1:06d}}}.tar")


def config(**data):
    return OmegaConf.create({
        "model": {"in_chans": 1},
        "train": {"seed": 3},
        "data": {"batch_size": 4, "num_workers": 0, "shuffle_buffer": 8, "crop_scale": [1.0, 1.0], "hflip": False,
                 "interpolation": "bicubic", "mean": [0.0], "std": [1.0], **data},
    })


def test_an_epoch_holds_the_shard_paths_samples_in_its_order_each_decoded_to_its_own_label(tmp_path):
    urls = grey_shards(tmp_path)
    data = GpuDecodeBatches(urls, config(), accelerator=CPU, img_size=6)
    for epoch in (0, 1):
        batches = list(data.batches(epoch))
        shard_path = make_loader(urls, batch_size=4, in_chans=1, seed=3, epoch=epoch, shuffle_buffer=8,
                                 transform=lambda image: TF.pil_to_tensor(image.resize((6, 6))))
        assert [b["key"] for b in batches] == [b["key"] for b in shard_path]  # same samples, same order
        images = torch.cat([b["image"] for b in batches])  # (24, 1, 6, 6) in [0, 1]
        labels = torch.cat([b["label"] for b in batches])
        assert images.shape == (24, 1, 6, 6) and sorted(labels.tolist()) == list(range(24))
        assert torch.allclose(images.mean(dim=(1, 2, 3)) * 255, 10.0 * labels, atol=1.5)  # flat grey survives
    assert data.batches_per_epoch(0) == 6


def test_a_broken_jpeg_is_left_out_and_counted_and_the_labels_stay_with_their_images(tmp_path):
    urls = grey_shards(tmp_path, bad={5}, png={2, 7})  # PNGs are decoded by the workers, JPEGs later
    data = GpuDecodeBatches(urls, config(shuffle_buffer=0), accelerator=CPU, img_size=6)
    batches = list(data.batches(0))
    labels = torch.cat([b["label"] for b in batches])
    images = torch.cat([b["image"] for b in batches])
    assert sorted(labels.tolist()) == [i for i in range(24) if i != 5]
    assert sum(b["skipped"] for b in batches) == 1
    assert [len(b["key"]) for b in batches] == [b["image"].shape[0] for b in batches]
    assert torch.allclose(images.mean(dim=(1, 2, 3)) * 255, 10.0 * labels, atol=1.5)


def test_decoding_matches_pil_and_a_full_crop_at_the_same_size_changes_nothing():
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8), "RGB").resize((24, 24))
    data = torch.frombuffer(bytearray(jpeg(picture)), dtype=torch.uint8)
    images, kept = JpegDecoder(3, "cpu")([data])
    expected = torch.from_numpy(np.array(Image.open(io.BytesIO(jpeg(picture))).convert("RGB"))).permute(2, 0, 1)
    assert kept == [0] and images[0].shape == (3, 24, 24)
    assert (images[0].int() - expected.int()).abs().max() <= 2  # the same libjpeg, up to its IDCT rounding
    out = crop_flip_each(images, 24, scale=(1, 1), ratio=(1, 1), hflip=False)  # (1, 3, 24, 24)
    assert torch.allclose(out[0] * 255, images[0].float(), atol=1e-3)


def test_flips_mirror_about_half_of_the_images_and_crops_take_the_models_size():
    image = torch.arange(48, dtype=torch.uint8).view(1, 6, 8)  # (C, H, W), rows differ, columns differ
    generator = torch.Generator().manual_seed(0)
    out = crop_flip_each([image] * 200, 4, scale=(1, 1), ratio=(4 / 3, 4 / 3), hflip=True, generator=generator,
                         interpolation="nearest")  # (200, 1, 4, 4)
    plain = crop_flip_each([image], 4, scale=(1, 1), ratio=(4 / 3, 4 / 3), hflip=False, interpolation="nearest")[0]
    mirrored = [torch.equal(o, plain.flip(-1)) for o in out]
    assert all(m or torch.equal(o, plain) for m, o in zip(mirrored, out))
    assert 80 < sum(mirrored) < 120


def test_a_short_pretraining_with_gpu_decode_falls_back_to_the_cpu_and_starts_at_the_shard_paths_loss(tmp_path):
    rng = np.random.default_rng(0)
    samples = [(f"{i:06d}", (jpeg(Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((40, 36))),
                             "jpg"), i % 4) for i in range(64)]
    write_shards(samples, tmp_path / "jpg", samples_per_shard=16, progress=False, num_classes=4)
    urls = str(tmp_path / "jpg" / "shard-{000000..000003}.tar")
    tiny = ["model.img_size=16", "model.embed_dim=48", "model.depth=2", "model.num_heads=3",
            "model.decoder_embed_dim=32", "model.decoder_depth=1", "model.decoder_num_heads=2", "data.batch_size=16",
            "data.num_workers=1", "optim.warmup_epochs=0", "train.max_steps=3", "train.vis_every=1000",
            "knn.every=0", "knn.vs_random=false", "online_probe=false", "train.mixed_precision=no"]
    first = {}
    for flag in ("false", "true"):
        result = tool("pretrain.py", "--output-dir", str(tmp_path / flag), "--data", urls, *tiny,
                      f"data.gpu_decode={flag}")
        fallback = flag == "true" and not torch.cuda.is_available()  # with a GPU the JPEGs go to nvJPEG
        assert ("without a GPU: the JPEGs are decoded on the CPU" in result.stderr + result.stdout) == fallback
        metrics = json.loads((tmp_path / flag / "metrics.json").read_text())
        assert metrics["step"] == 3 and math.isfinite(metrics["last_loss"])
        first[flag] = metrics["first_loss"]  # step 1: the same weights and the same images, resampled alike
    assert first["true"] == pytest.approx(first["false"], rel=0.05)


def test_the_loader_benchmark_times_the_gpu_decode_path_on_the_device_it_is_given(tmp_path):
    urls = grey_shards(tmp_path)
    result = loader_speed(urls, img_size=6, in_chans=1, batch_size=4, workers=(0,), seconds=0.2, gpu_decode="cpu",
                          report=lambda _: None)
    assert result["gpu_decode"] == "cpu" and result["rows"][0]["images"] % 4 == 0
    assert result["rows"][0]["images_per_s"] > 0


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_a_png_stored_as_jpg_is_decoded_like_on_the_shard_path_not_skipped(tmp_path):
    def sample(i):  # sample i: flat grey 10 i; the odd ones are PNG bytes in a .jpg member, as make_shards keeps them
        image = Image.fromarray(np.full((10, 8), 10 * i, np.uint8), "L")
        return f"{i:06d}", (png_bytes(image) if i % 2 else jpeg(image), "jpg"), i
    write_shards((sample(i) for i in range(8)), tmp_path, samples_per_shard=4, progress=False, num_classes=8,
                 stats=False)
    urls = str(tmp_path / "shard-{000000..000001}.tar")
    batches = list(GpuDecodeBatches(urls, config(shuffle_buffer=0), accelerator=CPU, img_size=6).batches(0))
    labels, images = torch.cat([b["label"] for b in batches]), torch.cat([b["image"] for b in batches])
    assert sum(b["skipped"] for b in batches) == 0 and sorted(labels.tolist()) == list(range(8))
    assert torch.allclose(images.mean(dim=(1, 2, 3)) * 255, 10.0 * labels, atol=1.5)


def test_the_decompression_bomb_limit_skips_the_same_images_on_every_path(tmp_path, monkeypatch):
    urls = grey_shards(tmp_path)  # 10 px high, 8 + i % 5 wide: 80 to 120 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # PIL refuses above twice this: widths 11 and 12
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # above the limit itself: a warning
        shard_path = list(make_loader(urls, batch_size=4, in_chans=1, shuffle=False, drop_last=False,
                                      transform=lambda image: TF.pil_to_tensor(image.resize((6, 6)))))
        gpu_path = list(GpuDecodeBatches(urls, config(shuffle_buffer=0), accelerator=CPU, img_size=6).batches(0))
    bombs = [i for i in range(24) if 8 + i % 5 > 10]
    good = [i for i in range(24) if i not in bombs]
    assert sorted(torch.cat([b["label"] for b in shard_path]).tolist()) == good
    assert set(torch.cat([b["label"] for b in gpu_path]).tolist()) < set(good)  # training: full batches only
    assert sum(b["skipped"] for b in shard_path) == sum(b["skipped"] for b in gpu_path) == len(bombs) == 9


@pytest.mark.gpu
def test_on_the_gpu_a_decode_never_overwrites_memory_that_queued_kernels_still_read():
    # pytorch/vision#9606: blocks freed while queued kernels still read them must not receive decoded pixels
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), "RGB").resize((64, 64))
                for _ in range(16)]
    # 4:4:4: nvJPEG upsamples 4:2:0 chroma by nearest neighbour, libjpeg-turbo interpolates (random colours
    # differed by 10.7 grey levels on average on an H200; sgl-project/sglang#34163 saw the same)
    jpegs = [torch.frombuffer(bytearray(jpeg(p, subsampling=0)), dtype=torch.uint8) for p in pictures]
    decoder = JpegDecoder(3, "cuda")
    decoder(jpegs)  # warm: nvJPEG's handle, the side stream's pool
    big, wrong = torch.randn(8192, 8192, device="cuda"), 0
    for _ in range(20):
        filled = [torch.full((3, 64, 64), 7, dtype=torch.uint8, device="cuda") for _ in range(16)]  # decode-sized
        torch.cuda.synchronize()
        for _ in range(10):
            big @ big  # about 10 TFLOP queued ahead of the reads
        sums = [t.sum(dtype=torch.int64) for t in filled]  # queued behind the matmuls
        del filled  # freed while their reads still wait
        images, kept = decoder(jpegs)
        torch.cuda.synchronize()
        wrong += sum(int(s) != 7 * 3 * 64 * 64 for s in sums)
    assert wrong == 0 and kept == list(range(16))
    expected = [torch.from_numpy(np.array(Image.open(io.BytesIO(bytes(j.numpy()))))).permute(2, 0, 1) for j in jpegs]
    # without chroma subsampling nvJPEG and libjpeg-turbo differ in IDCT rounding only: within 2 grey levels
    assert max(float((i.cpu().float() - e.float()).abs().mean()) for i, e in zip(images, expected)) <= 2
