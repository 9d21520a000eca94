"""The one training loop: counted in steps, resumed at the same sample whatever the layout, resumable by what
matters."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mae_vit.config import FinetuneConfig, PretrainConfig, parse_config
from mae_vit.data import ensure_demo_shards, rank_batch_counts
from mae_vit.data.synthetic import synthetic_samples
from mae_vit.data.writer import shard_urls, write_shards
from mae_vit.errors import ConfigError, StoppedBySignal
from mae_vit.tasks.finetune import finetune
from mae_vit.tasks.pretrain import pretrain
from mae_vit.train.monitor import StopSignal
from mae_vit.train.rundir import RunDir, read_state
from mae_vit.train.schedule import lr_at

ROOT = Path(__file__).resolve().parent.parent
MODEL = ["model.img_size=16", "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "data.num_workers=0",
         "train.log_every=1"]
MAE = [*MODEL, "model.mask_ratio=0.75",
       "model.decoder_embed_dim=32", "model.decoder_depth=1", "model.decoder_num_heads=2",
       "train.vis_every=1000", "knn.vs_random=false"]
RAN_OUT = "ran out before the planned end of the epoch"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return ensure_demo_shards(tmp_path_factory.mktemp("cache"), num_samples=64)  # 64 train, 16 val


def stop_at_call(monkeypatch, n):
    """SIGTERM arrives just before the n-th stop check (one check per step in a single process)."""
    calls = []

    def agreed(self, accelerator):
        calls.append(1)
        return len(calls) >= n

    monkeypatch.setattr(StopSignal, "agreed", agreed)


def scalars(run, tag):
    logs = EventAccumulator(str(Path(run) / "logs"))
    logs.Reload()
    return {e.step: e.value for e in logs.Scalars(tag)}


@pytest.mark.slow  # a whole training run
def test_a_stop_at_an_epochs_last_step_resumes_the_classifier_with_exactly_the_planned_steps(
        shards, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = ["--output-dir", str(out), "--data", shards[0], f"data.val={shards[1]}", *MODEL,
            "model.name=vit_tiny_patch4", "data.batch_size=16", "optim.epochs=2", "optim.warmup_epochs=0"]
    stop_at_call(monkeypatch, 4)  # 64 / 16 = 4 steps per epoch: the stop comes at epoch 1's last step
    with pytest.raises(StoppedBySignal, match="checkpoint at step 4"):
        finetune(parse_config(FinetuneConfig, argv))
    assert read_state(RunDir(out).latest()).samples_seen == 64  # epoch 1 done, evaluated, nothing of epoch 2
    monkeypatch.undo()
    second = finetune(parse_config(FinetuneConfig, argv))
    assert RAN_OUT not in capsys.readouterr().err
    assert second["step"] == 8 and second["epoch"] == 2
    assert sorted(scalars(out, "val/top1")) == [4, 8]  # one evaluation per epoch, none repeated
    assert sorted(scalars(out, "train/loss")) == list(range(1, 9))  # every step once


@pytest.mark.slow  # a whole training run
def test_a_stop_at_an_epochs_last_step_resumes_pretraining_with_exactly_the_planned_steps(
        shards, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = ["--output-dir", str(out), "--data", shards[0], *MAE, "data.batch_size=16", "optim.epochs=3"]
    stop_at_call(monkeypatch, 8)
    with pytest.raises(StoppedBySignal, match="checkpoint at step 8"):
        pretrain(parse_config(PretrainConfig, argv))
    monkeypatch.undo()
    summary = pretrain(parse_config(PretrainConfig, argv))
    assert RAN_OUT not in capsys.readouterr().err
    assert summary["step"] == 12 and summary["epoch"] == 3
    assert read_state(RunDir(out).latest()).samples_seen == 3 * 64


@pytest.mark.slow  # a whole training run
def test_uneven_shards_the_run_takes_every_planned_step_and_the_lr_ends_at_min_lr(tmp_path):
    data = tmp_path / "uneven"
    index = write_shards(synthetic_samples(130, img_size=16), data, samples_per_shard=30, progress=False)
    urls = shard_urls(data, "shard", len(index["shards"]))  # shards of 30, 30, 30, 30 and 10 samples
    counts = [rank_batch_counts(urls, world_size=1, num_workers=2, batch_size=8, epoch=e)[0] for e in range(3)]
    assert counts == [15, 16, 16]  # two workers: the batches per epoch depend on how the shards are dealt
    out = tmp_path / "run"
    argv = ["--output-dir", str(out), "--data", urls, *MAE, "data.num_workers=2", "data.batch_size=8",
            "optim.epochs=3", "optim.warmup_epochs=1", "optim.base_lr=1e-3", "optim.min_lr=1e-5"]
    summary = pretrain(parse_config(PretrainConfig, argv))
    assert summary["step"] == 45 and summary["epoch"] == 3  # 3 epochs of the 15 steps planned from epoch 0
    lr = scalars(out, "train/lr")
    peak = 1e-3 * 8 / 256
    assert lr[45] == pytest.approx(lr_at(44, peak_lr=peak, min_lr=1e-5, warmup_steps=15, total_steps=45))
    assert lr[45] - 1e-5 < 0.01 * (peak - 1e-5)  # the last step is at the bottom of the cosine
    assert sorted(scalars(out, "train/epoch").items())[-1] == (45, 3.0)


@pytest.mark.slow  # a whole training run
def test_resume_allows_changes_that_keep_the_weights_shapes_and_refuses_others(shards, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--output-dir", str(out), "--data", shards[0], *MAE, "data.batch_size=16", "optim.epochs=2"]
    pretrain(parse_config(PretrainConfig, [*argv, "train.max_steps=3"]))
    summary = pretrain(parse_config(PretrainConfig, [*argv, "model.grad_checkpointing=true", "model.mask_ratio=0.5",
                                                     "model.drop_path_rate=0.1"]))
    assert summary["step"] == 8
    assert ("changed since the checkpoint: model.drop_path_rate 0.0 -> 0.1, model.grad_checkpointing false -> true, "
            "model.mask_ratio 0.75 -> 0.5") in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"other shapes than this command asks for \(model.embed_dim 32 -> 64;"):
        pretrain(parse_config(PretrainConfig, [*argv, "model.embed_dim=64", "optim.epochs=3"]))


def launch(argv, processes, timeout=300):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # CPU ranks
    tool = str(ROOT / "tools" / "pretrain.py")
    if processes == 1:
        cmd = [sys.executable, tool, *argv]
    else:  # --multi_gpu without GPUs: torch's launcher starts CPU (gloo) processes
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(free_port()), tool, *argv]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_a_run_resumed_with_another_number_of_processes_ends_at_the_same_sample_count(shards, tmp_path, before,
                                                                                       after):
    out = tmp_path / "run"
    # effective batch 16: 2 processes x 8, or 1 process x 8 x 2 accumulation; 64 / 16 = 4 steps per epoch
    argv = ["--output-dir", str(out), "--data", shards[0], *MAE, "data.batch_size=8", "optim.effective_batch=16",
            "optim.epochs=2", "train.save_every=2"]
    launch([*argv, "train.max_steps=3"], before)
    assert read_state(RunDir(out).latest()).samples_seen == 3 * 16
    err = launch(argv, after)
    assert "the process layout changed since the checkpoint" in err and RAN_OUT not in err
    state = read_state(RunDir(out).latest())
    assert state.step == 8 and state.samples_seen == 8 * 16 == 2 * 64  # as an uninterrupted run
    assert state.layout["processes"] == after and state.layout["accumulation"] == (2 if after == 1 else 1)


FULL_DISK = """
import os, sys
from mae_vit.train import rundir
real = rundir.write_json
def write_json(path, data):
    if os.environ.get("RANK") == "0" and path.name == "COMPLETE":
        raise OSError(28, "No space left on device")
    return real(path, data)
rundir.write_json = write_json
from mae_vit.config.cli import run_tool
from mae_vit.config import PretrainConfig, parse_config
from mae_vit.tasks.pretrain import pretrain
run_tool(lambda argv: pretrain(parse_config(PretrainConfig, argv)), sys.argv[1:])
"""


@pytest.mark.slow
def test_a_failure_on_the_main_process_ends_every_process_at_once(shards, tmp_path):
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}  # CPU ranks
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           str(script), "--output-dir", str(tmp_path / "run"), "--data", shards[0], *MAE, "data.batch_size=8",
           "train.save_every=2"]
    # a timeout well below the 30-min collective timeout
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode != 0
    assert "No space left on device" in result.stderr and "the main process failed" in result.stderr


@pytest.mark.slow  # a whole training run
def test_a_time_budget_fixes_the_steps_so_that_they_fit_the_measured_step_time(shards, tmp_path):
    out = tmp_path / "run"
    argv = ["--output-dir", str(out), "--data", shards[0], *MAE, "data.batch_size=16", "optim.epochs=10000",
            "optim.warmup_epochs=1", "optim.time_budget=8s", "train.log_every=50", "train.save_every=100000"]
    summary = pretrain(parse_config(PretrainConfig, argv))
    state = read_state(RunDir(out).latest())
    budget = state.budget
    assert budget["seconds"] == 8 and summary["step"] == state.step == budget["steps"]  # ran exactly the fixed steps
    assert 22 < budget["steps"] < 10000 * 4  # not the 10000 epochs the config names
    assert (budget["steps"] - 22) * budget["step_s"] <= 0.95 * 8  # the steps after the measurement fit the budget
    lr = scalars(out, "train/lr")
    assert lr[budget["steps"]] < 0.01 * max(lr.values())  # the cosine ended with the budget
    again = pretrain(parse_config(PretrainConfig, argv))  # a re-run keeps the fixed length: nothing left to do
    assert again["step"] == budget["steps"] and read_state(RunDir(out).latest()).budget == budget


def test_a_run_says_when_the_shards_own_statistics_differ_from_data_mean_and_std(shards, tmp_path, capsys):
    argv = ["--output-dir", str(tmp_path / "run"), "--data", shards[0], *MAE, "data.batch_size=16", "train.max_steps=1",
            "data.mean=[0.485,0.456,0.406]", "data.std=[0.229,0.224,0.225]"]  # ImageNet's, set by hand
    pretrain(parse_config(PretrainConfig, argv))
    err = " ".join(capsys.readouterr().err.split())
    assert "the training shards' own statistics are mean [0." in err and "to normalise with them: data.mean=[" in err
    default = ["--output-dir", str(tmp_path / "own"), "--data", shards[0], *MAE, "data.batch_size=16",
               "train.max_steps=1"]  # data.mean / data.std left null: the shards' own
    cfg = parse_config(PretrainConfig, default)
    pretrain(cfg)
    err = " ".join(capsys.readouterr().err.split())
    assert "normalising with the training shards' own statistics: data.mean [0." in err and "precision: " in err
    saved = parse_config(PretrainConfig, ["--config", str(tmp_path / "own" / "config.yaml")])
    assert saved.data.mean is not None and len(saved.data.std) == 3  # the numbers used, for the tools after it


def test_with_no_trackers_a_run_trains_and_writes_no_event_files(tmp_path):
    from conftest import tool
    out = tmp_path / "run"
    tool("pretrain.py", "--output-dir", str(out), f"data.cache_dir={tmp_path}", "data.synthetic_samples=64",
         "model.depth=1", "data.num_workers=0", "train.max_steps=2", "train.trackers=[]", "knn.vs_random=false",
         "online_probe=false")
    assert (out / "model.safetensors").is_file() and (out / "reconstructions").is_dir()
    assert not list(out.rglob("events.out.tfevents*"))
