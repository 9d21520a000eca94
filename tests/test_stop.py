"""Pre-emption: a stop signal breaks off an evaluation or the final checks too, and the run says where it
stopped in stopped.json (removed when it starts again), so that a requeue script needs no exit status."""

import json
import os
import signal

import pytest

from mae_vit.config import PretrainConfig, parse_config
from mae_vit.data import ensure_demo_shards
from mae_vit.errors import StoppedBySignal
from mae_vit.eval import features as features_module
from mae_vit.tasks.pretrain import pretrain
from mae_vit.train.rundir import RunDir, read_state

MAE = ["model.img_size=16", "model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.decoder_embed_dim=32",
       "model.decoder_depth=1", "model.decoder_num_heads=2", "data.num_workers=0", "data.batch_size=16",
       "train.vis_every=1000", "online_probe=false"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return ensure_demo_shards(tmp_path_factory.mktemp("cache"), num_samples=64)  # 64 train, 16 val


def sigterm_at_first_feature_batch(monkeypatch) -> list:
    """SIGTERM (to this process, through its real handler) while the first batch of features is being encoded."""
    calls, real = [], features_module._split_batch

    def split(batch):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(batch)

    monkeypatch.setattr(features_module, "_split_batch", split)
    return calls


def test_a_signal_during_the_epoch_end_knn_stops_it_saves_and_writes_stopped_json(shards, tmp_path, monkeypatch):
    out = tmp_path / "run"
    argv = ["--output-dir", str(out), "--data", shards[0], f"data.val={shards[1]}", *MAE, "optim.epochs=2",
            "knn.every=1", "knn.vs_random=false"]
    calls = sigterm_at_first_feature_batch(monkeypatch)
    with pytest.raises(StoppedBySignal) as stop:
        pretrain(parse_config(PretrainConfig, argv))  # 64 / 16 = 4 steps: the kNN runs after step 4
    assert len(calls) == 1  # broken off after the batch in hand, not after the 5 batches of train and val
    assert "SIGTERM arrived; the run saved its checkpoint at step 4" in str(stop.value)
    stopped = json.loads((out / "stopped.json").read_text())
    assert stopped["step"] == 4 and stopped["reason"] == "SIGTERM during the evaluation after step 4"
    assert stopped["checkpoint"] == str(RunDir(out).latest()) and read_state(RunDir(out).latest()).step == 4
    monkeypatch.undo()
    summary = pretrain(parse_config(PretrainConfig, argv))
    assert summary["step"] == 8 and summary["knn_top1"] is not None and not (out / "stopped.json").exists()


def test_a_signal_during_the_final_checks_stops_them_and_a_rerun_finishes_them(shards, tmp_path, monkeypatch):
    out = tmp_path / "run"
    argv = ["--output-dir", str(out), "--data", shards[0], f"data.val={shards[1]}", *MAE, "optim.epochs=1",
            "knn.vs_random=true"]
    calls = sigterm_at_first_feature_batch(monkeypatch)
    with pytest.raises(StoppedBySignal, match="during the final export and checks; every step is saved"):
        pretrain(parse_config(PretrainConfig, argv))
    assert len(calls) == 1 and not (out / "metrics.json").exists()
    assert json.loads((out / "stopped.json").read_text())["step"] == 4
    monkeypatch.undo()
    summary = pretrain(parse_config(PretrainConfig, argv))
    assert summary["step"] == 4 and summary["vs_random"]["pretrained"] is not None
    assert (out / "metrics.json").exists() and not (out / "stopped.json").exists()
