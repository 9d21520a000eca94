"""An epoch's real batches against the plan's: a share that falls far short stops the run with a clear error."""

from types import SimpleNamespace

import pytest

from mae_vit.errors import DataError
from mae_vit.train.batches import step_batches


class Share:
    """A process's share of an epoch: `real` batches, whatever the plan counted on."""

    def __init__(self, real: int):
        self.real = real

    def batches(self, epoch: int = 0, skip: int = 0):
        for i in range(skip, self.real):
            yield {"epoch": epoch, "i": i}


def steps(data, steps_per_epoch, first_step=0, accum=1, n=None):
    plan = SimpleNamespace(first_step=first_step, steps_per_epoch=steps_per_epoch, accum=accum)
    out = []
    for micro in step_batches(data, plan):
        out.append([b["i"] for b in micro])
        if len(out) == (n or steps_per_epoch):
            return out


def test_a_share_a_little_short_is_read_again_to_fill_the_epoch(caplog):
    assert steps(Share(6), steps_per_epoch=8) == [[0], [1], [2], [3], [4], [5], [0], [1]]
    assert "ran out before the planned end" in caplog.text


def test_a_share_far_short_of_the_plan_stops_with_a_clear_error():
    with pytest.raises(DataError, match="gave 3 of the 16 batches the plan counts on"):
        steps(Share(3), steps_per_epoch=8, accum=2)


class LossyShare(Share):
    """A share whose batch 2 comes with `lost` unreadable samples counted in it, on every pass."""

    def __init__(self, real: int, lost: int):
        super().__init__(real)
        self.lost = lost

    def batches(self, epoch: int = 0, skip: int = 0):
        for batch in super().batches(epoch, skip):
            yield {**batch, "skipped": self.lost if batch["i"] == 2 else 0,
                   "skipped_shards": int(batch["i"] == 2)}


def test_samples_lost_again_while_the_share_is_read_again_are_counted_once():
    plan = SimpleNamespace(first_step=0, steps_per_epoch=8, accum=1)
    batches = [micro[0] for _, micro in zip(range(16), step_batches(LossyShare(real=5, lost=6), plan))]
    # epoch 0: batches 0-4, then 0, 1, 2 again (batch 2 loses its 6 samples again); epoch 1 likewise
    assert [b["i"] for b in batches] == [0, 1, 2, 3, 4, 0, 1, 2] * 2
    assert sum(b["skipped"] for b in batches) == 2 * 6  # 6 per epoch, not 12
    assert sum(b["skipped_shards"] for b in batches) == 2
