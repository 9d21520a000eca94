"""Synthetic generator: determinism by (seed, split, index), balance, validation, learnability."""

import numpy as np
import pytest
import torch

from mae_vit.data.synthetic import CLASS_NAMES, synthetic_sample, synthetic_samples
from mae_vit.errors import ConfigError


def pixels(index, **kw):
    image, label = synthetic_sample(index, **kw)
    return np.asarray(image), label


def test_same_index_same_pixels_whatever_the_order():
    forward = [pixels(i, seed=3, img_size=16)[0] for i in range(6)]
    backward = [pixels(i, seed=3, img_size=16)[0] for i in reversed(range(6))][::-1]
    from_iterator = [np.asarray(img) for _, img, _ in synthetic_samples(6, seed=3, img_size=16)]
    for a, b, c in zip(forward, backward, from_iterator):
        assert np.array_equal(a, b) and np.array_equal(a, c)


def test_seeds_splits_and_indices_differ():
    base, _ = pixels(7, seed=0, img_size=16)
    assert not np.array_equal(base, pixels(7, seed=1, img_size=16)[0])
    assert not np.array_equal(base, pixels(7, seed=0, img_size=16, split="val")[0])
    assert not np.array_equal(base, pixels(17, seed=0, img_size=16)[0])  # same class (7), other sample


def test_image_format_and_labels():
    image, label = synthetic_sample(13, seed=0, img_size=20, num_classes=4)
    assert image.mode == "RGB" and image.size == (20, 20)
    assert label == 13 % 4
    keys_labels = [(key, label) for key, _, label in synthetic_samples(3, img_size=8, num_classes=2)]
    assert keys_labels == [("00000000", 0), ("00000001", 1), ("00000002", 0)]


def test_class_balance():
    labels = [label for _, _, label in synthetic_samples(25, img_size=8, num_classes=10)]
    assert np.bincount(labels).tolist() == [3, 3, 3, 3, 3, 2, 2, 2, 2, 2]


@pytest.mark.parametrize(
    "kwargs",
    [{"num_classes": 0}, {"num_classes": len(CLASS_NAMES) + 1}, {"img_size": 4}, {"seed": -1}, {"split": "dev"}],
)
def test_bad_settings_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        synthetic_sample(0, **kwargs)


def _arrays(n, split, size=16):
    xs, ys = zip(*(pixels(i, seed=0, img_size=size, split=split) for i in range(n)))
    return torch.tensor(np.stack(xs)).permute(0, 3, 1, 2).float() / 255, torch.tensor(ys)


@pytest.mark.slow  # a whole training run
def test_classes_are_learnable_but_not_by_pixel_templates():
    torch.manual_seed(0)
    x_train, y_train = _arrays(600, "train")
    x_test, y_test = _arrays(200, "val")

    # Nearest class-mean in pixel space stays near chance (random colours and positions) ...
    centroids = torch.stack([x_train[y_train == k].mean(0) for k in range(10)]).flatten(1)
    nearest = torch.cdist(x_test.flatten(1), centroids).argmin(1)
    assert (nearest == y_test).float().mean() < 0.3

    # ... while a tiny CNN learns the shapes well above chance (0.1) in a fraction of a second.
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(32 * 4 * 4, 10),
    )
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(15):
        perm = torch.randperm(len(x_train))
        for j in range(0, len(x_train), 50):
            idx = perm[j : j + 50]
            loss = torch.nn.functional.cross_entropy(net(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        accuracy = (net(x_test).argmax(1) == y_test).float().mean()
    assert accuracy > 0.5
