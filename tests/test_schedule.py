"""lr schedule and batch arithmetic against hand-computed numbers."""

import math

import pytest

from mae_vit.errors import ConfigError
from mae_vit.train.schedule import accumulation_steps, lr_at, scaled_lr, schedule_steps

# peak 1.0, floor 0.1, 10 warmup steps, 110 steps in all: the cosine phase is 100 steps long.
SCHEDULE = dict(peak_lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 0.0),                                               # warmup starts at 0
        (5, 0.5),                                               # 1.0 * 5 / 10
        (9, 0.9),
        (10, 1.0),                                              # end of warmup: the peak
        (35, 0.1 + 0.9 * 0.5 * (1 + math.sqrt(0.5))),           # quarter of the cosine: 0.86819805...
        (60, 0.55),                                             # mid-cosine: halfway between 1.0 and 0.1
        (110, 0.1),                                             # end
        (500, 0.1),                                             # clamped after the end
    ],
)
def test_lr_at_hand_computed(step, expected):
    assert lr_at(step, **SCHEDULE) == pytest.approx(expected, abs=1e-12)


def test_lr_quarter_value_written_out():
    assert lr_at(35, **SCHEDULE) == pytest.approx(0.868198051533946, abs=1e-12)


def test_lr_without_warmup_starts_at_peak_and_decreases():
    values = [lr_at(s, peak_lr=2.0, min_lr=0.0, warmup_steps=0, total_steps=4) for s in range(5)]
    # 2 * (1 + cos(pi * s / 4)) / 2 for s = 0..3, then the floor
    assert values == pytest.approx([2.0, 1 + math.sqrt(0.5), 1.0, 1 - math.sqrt(0.5), 0.0], abs=1e-12)


def test_lr_is_the_mae_epoch_curve():
    # MAE evaluates the same formula at fractional epochs; 4 steps per epoch, 2 warmup epochs of 10.
    def mae(epoch, lr=3e-3, min_lr=1e-5, warmup=2, epochs=10):
        if epoch < warmup:
            return lr * epoch / warmup
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))

    for step in range(41):
        assert lr_at(step, peak_lr=3e-3, min_lr=1e-5, warmup_steps=8, total_steps=40) == pytest.approx(
            mae(step / 4), abs=1e-15
        )


def test_lr_at_rejects_negative_step():
    with pytest.raises(ValueError):
        lr_at(-1, **SCHEDULE)


def test_schedule_steps():
    assert schedule_steps(800, 40, 10) == (400, 8000)
    assert schedule_steps(1.5, 0.25, 4) == (1, 6)


def test_scaled_lr():
    assert scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3, rel=1e-12)   # MAE pretraining recipe
    assert scaled_lr(0.1, 16384) == pytest.approx(6.4, rel=1e-12)        # MAE linear-probe recipe
    assert scaled_lr(5e-4, 256) == 5e-4


def test_accumulation_steps():
    assert accumulation_steps(4096, 64, 8) == 8
    assert accumulation_steps(128, 64, 2) == 1
    assert accumulation_steps(None, 64, 2) == 1


def test_accumulation_steps_indivisible_says_what_would_work():
    with pytest.raises(ConfigError) as info:
        accumulation_steps(100, 64, 1)
    message = str(info.value)
    assert "optim.effective_batch=100" in message and "64 x 1 = 64" in message
    assert "optim.effective_batch=64 or 128" in message
    assert "data.batch_size=50 / 25 / 20" in message


def test_accumulation_steps_indivisible_by_processes():
    with pytest.raises(ConfigError) as info:
        accumulation_steps(1000, 64, 3)
    assert "64 x 3 = 192" in str(info.value) and "960 or 1152" in str(info.value)
    assert "data.batch_size=" not in str(info.value)  # 1000 images cannot be split over 3 processes


def test_accumulation_steps_smaller_than_one_micro_batch():
    with pytest.raises(ConfigError, match=r"Use optim.effective_batch=64, or data.batch_size=30 / 15 / 10"):
        accumulation_steps(30, 64, 1)
