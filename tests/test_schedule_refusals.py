"""Schedules that cannot be what the user meant are refused before a step is taken."""

from types import SimpleNamespace

import pytest

from mae_vit.errors import ConfigError
from mae_vit.train.schedule import make_plan


def optim(**kw):
    base = dict(effective_batch=None, lr=None, base_lr=1.5e-4, min_lr=0.0, epochs=10, warmup_epochs=1)
    return SimpleNamespace(**{**base, **kw})


def plan(o):
    return make_plan(o, batch_size=16, world_size=1, max_steps=None, samples_per_epoch=0, samples_seen=0,
                     batches_per_epoch=lambda: 8)


def test_a_min_lr_above_the_peak_lr_is_refused():
    assert plan(optim(min_lr=1e-6)).peak_lr == pytest.approx(1.5e-4 * 16 / 256)
    with pytest.raises(ConfigError, match=r"optim.min_lr \(0.001\) is above the peak lr"):
        plan(optim(min_lr=1e-3))
    with pytest.raises(ConfigError, match="optim.min_lr"):
        plan(optim(lr=1e-4, min_lr=2e-4))
