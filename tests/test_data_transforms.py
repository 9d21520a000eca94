"""Transforms: shapes for 1 and 3 channels, exact normalisation and eval crops, MixUp/CutMix targets."""

import numpy as np
import pytest
import torch
from PIL import Image

from mae_vit.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    default_crop_pct,
    eval_transform,
    finetune_transform,
    linprobe_transform,
    mixup_cutmix,
    pretrain_transform,
)
from mae_vit.errors import ConfigError


def rgb(w=40, h=30, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize(
    "build",
    [
        pretrain_transform,
        linprobe_transform,
        finetune_transform,
        lambda size, **kw: finetune_transform(size, randaug_num_ops=0, reprob=1.0, **kw),
        eval_transform,
    ],
    ids=["pretrain", "linprobe", "finetune", "finetune-no-randaug", "eval"],
)
def test_output_shape_for_one_and_three_channels(build, in_chans):
    transform = build(16, in_chans=in_chans)
    for image in (rgb(), rgb().convert("L")):  # any input mode is converted to in_chans
        out = transform(image)
        assert out.shape == (in_chans, 16, 16) and out.dtype == torch.float32


def test_normalisation_is_exact():
    image = Image.new("RGB", (20, 20), (255, 128, 0))
    out = pretrain_transform(8, crop_scale=(1.0, 1.0), hflip=False)(image)
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 128, 0), IMAGENET_MEAN, IMAGENET_STD)]
    assert torch.allclose(out.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-6)
    grey = pretrain_transform(8, in_chans=1, crop_scale=(1.0, 1.0))(Image.new("L", (9, 9), 51))
    assert torch.allclose(grey, torch.full((1, 8, 8), (0.2 - 0.5) / 0.5))


def test_eval_resize_and_center_crop():
    assert default_crop_pct(224) == 0.875 and default_crop_pct(256) == 1.0
    # 32 px at crop_pct 0.875: shorter side resized to int(32 / 0.875) = 36, then the central 32 x 32.
    image = rgb(w=48, h=36, seed=3)
    out = eval_transform(32, mean=(0, 0, 0), std=(1, 1, 1))(image)  # 36 px already: resize is a no-op
    expected = np.asarray(image)[2:34, 8:40].transpose(2, 0, 1) / 255
    assert out.shape == (3, 32, 32) and np.allclose(out.numpy(), expected, atol=1e-6)
    # Full crop: shorter side to exactly img_size; grey version.
    out = eval_transform(20, in_chans=1, crop_pct=1.0)(rgb(w=50, h=40))
    assert out.shape == (1, 20, 20)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"in_chans": 1, "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
        {"in_chans": 3, "mean": (0.5,), "std": (0.5,)},
        {"in_chans": 2},
        {"interpolation": "cubic"},
        {"crop_scale": (0.5, 0.2)},
    ],
)
def test_bad_settings_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        linprobe_transform(16, **kwargs)


def test_mixup_cutmix_off_gives_none():
    assert mixup_cutmix(10, mixup=0, cutmix=0, label_smoothing=0.1) is None


def test_mixup_targets_and_images_are_exact():
    torch.manual_seed(1)
    images = torch.rand(4, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 2])
    mix = mixup_cutmix(5, mixup=0.8, cutmix=0.0, label_smoothing=0.1)
    mixed, targets = mix(images, labels)
    assert targets.shape == (4, 5) and torch.allclose(targets.sum(1), torch.ones(4))
    unsmoothed = (targets - 0.1 / 5) / 0.9  # targets = mixed_one_hot * (1 - s) + s / K
    lam = unsmoothed[0, 0].item()
    rolled = labels.roll(1, 0)
    expected = lam * torch.eye(5)[labels] + (1 - lam) * torch.eye(5)[rolled]
    assert torch.allclose(unsmoothed, expected, atol=1e-6)
    assert torch.allclose(mixed, lam * images + (1 - lam) * images.roll(1, 0), atol=1e-6)


def test_cutmix_pastes_a_box_and_weights_targets_by_its_area():
    torch.manual_seed(2)
    images = torch.stack([torch.zeros(1, 16, 16), torch.ones(1, 16, 16)])
    mix = mixup_cutmix(2, mixup=0.0, cutmix=1.0, label_smoothing=0.0)
    mixed, targets = mix(images, torch.tensor([0, 1]))
    pasted = mixed[0].mean().item()  # image 0 (zeros) receives a box from image 1 (ones)
    assert set(mixed.unique().tolist()) <= {0.0, 1.0}
    assert targets[0].tolist() == pytest.approx([1 - pasted, pasted], abs=1e-6)


def test_pil_crop_flip_gives_torchvisions_pixels_for_the_same_random_draws():
    """pretrain_transform's fast PIL path = torchvision's RandomResizedCrop + flip + normalise, draw for draw."""
    from torchvision.transforms import InterpolationMode, v2

    from mae_vit.data.synthetic import synthetic_sample
    from mae_vit.data.transforms import pretrain_transform

    mean, std = [0.2, 0.3, 0.4], [0.5, 0.6, 0.7]
    reference = v2.Compose([v2.RandomResizedCrop(24, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC),
                            v2.RandomHorizontalFlip(), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(mean=mean, std=std)])
    fast = pretrain_transform(24, in_chans=3, mean=mean, std=std, crop_scale=(0.2, 1.0), interpolation="bicubic")
    image, _ = synthetic_sample(5, img_size=32)
    for seed in range(20):
        torch.manual_seed(seed)
        want = reference(image)
        torch.manual_seed(seed)
        got = fast(image)
        assert got.shape == (3, 24, 24)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
