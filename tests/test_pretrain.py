"""End-to-end pretraining: loss falls, resume after SIGKILL, half-written checkpoints, 2 processes, NaN guard."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import free_port

from mae_vit.config import PretrainConfig, parse_config
from mae_vit.data import ensure_demo_shards
from mae_vit.errors import ConfigError, NonFiniteLossError
from mae_vit.train.rundir import RunDir, read_state

ROOT = Path(__file__).resolve().parent.parent
TOOL = str(ROOT / "tools" / "pretrain.py")
# a very small MAE: 48 wide, 2 deep, 16 px, patches of 4 (16 tokens, 4 visible), 1-block decoder
TINY = ["model.img_size=16", "model.patch_size=4", "model.mask_ratio=0.75",
        "model.embed_dim=48", "model.depth=2", "model.num_heads=3", "model.decoder_embed_dim=32",
        "model.decoder_depth=1", "model.decoder_num_heads=2",
        "data.batch_size=16", "data.num_workers=0", "optim.warmup_epochs=0", "train.log_every=2",
        "train.vis_every=1000"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    train, val = ensure_demo_shards(tmp_path_factory.mktemp("cache"), num_samples=128)
    return train, val


def args(out, train, *extra):
    return ["--output-dir", str(out), "--data", train, *TINY, *extra]


def run_tool(argv, timeout=240, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, TOOL, *argv], capture_output=True, text=True, timeout=timeout, env=env, **kw)


@pytest.mark.slow  # a whole training run
def test_short_run_loss_falls_and_leaves_everything(tmp_path, shards):
    from mae_vit.tasks.pretrain import pretrain

    out = tmp_path / "run"
    cfg = parse_config(PretrainConfig, args(out, shards[0], "optim.epochs=6", "optim.base_lr=2e-3",
                                            "train.save_every=12", "train.keep_last=2", "train.vis_every=24",
                                            "model.norm_pix_loss=false", f"data.val={shards[1]}", "knn.every=3"))
    summary = pretrain(cfg)
    assert summary["step"] == 6 * 8  # 128 samples / batch 16 = 8 steps per epoch
    assert summary["last_loss"] < 0.8 * summary["first_loss"]
    assert 0 <= summary["knn_top1"] <= 100
    run = RunDir(out)
    assert [p.name for p in run.complete_checkpoints()] == ["step_0000036", "step_0000048"]  # keep_last=2
    assert read_state(run.latest()).step == 48 and read_state(run.latest()).epoch == 6
    assert (out / "config.yaml").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in (out / "reconstructions").glob("*.png")) == ["step_0000024.png", "step_0000048.png"]
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    # the export loads strictly into a fresh MAE of the same config
    from mae_vit.checkpoint import load_weights
    from mae_vit.train.build import build_model
    assert not load_weights(build_model(cfg.model, mae=True), out / "model.safetensors", strict=True).missing


def test_sigkill_then_rerun_resumes_to_the_same_final_step(tmp_path, shards):
    out = tmp_path / "run"
    argv = args(out, shards[0], "optim.epochs=20", "train.save_every=3")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, TOOL, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    run = RunDir(out)
    deadline = time.time() + 180
    while time.time() < deadline and (run.latest() is None or read_state(run.latest()).step < 6):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = read_state(run.latest()).step
    assert 6 <= killed_at < 160, "the run must be killed midway"
    # a checkpoint being written at that moment, left half-done: must be ignored
    (out / "checkpoints" / ".tmp-step_0000099").mkdir(exist_ok=True)
    result = run_tool(argv)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming from {out / 'checkpoints'}" in result.stderr
    assert read_state(run.latest()).step == 160 and read_state(run.latest()).epoch == 20
    assert not (out / "checkpoints" / ".tmp-step_0000099").exists()


def test_half_written_checkpoint_is_never_resumed(tmp_path, shards):
    out = tmp_path / "run"
    from mae_vit.tasks.pretrain import pretrain

    pretrain(parse_config(PretrainConfig, args(out, shards[0], "optim.epochs=1", "train.save_every=4")))
    run = RunDir(out)
    good = run.latest()
    # a newer step folder without its COMPLETE marker (crash between save and marker) and a garbage one
    bad = out / "checkpoints" / "step_0000100"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"half")
    assert run.latest() == good
    assert RunDir(out).prepare(parse_config(PretrainConfig, args(out, shards[0], "optim.epochs=1")),
                               is_main=True) == good


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, shards, monkeypatch):
    from mae_vit.models import MaskedAutoencoderViT
    from mae_vit.tasks.pretrain import pretrain

    calls = {"n": 0}
    original = MaskedAutoencoderViT.forward_loss

    def poisoned(self, imgs, pred, mask):
        calls["n"] += 1
        loss = original(self, imgs, pred, mask)
        return loss * float("nan") if calls["n"] == 5 else loss  # the 5th optimizer step goes bad

    monkeypatch.setattr(MaskedAutoencoderViT, "forward_loss", poisoned)
    out = tmp_path / "run"
    cfg = parse_config(PretrainConfig, args(out, shards[0], "optim.epochs=2", "train.save_every=2",
                                            "train.log_every=3", "train.nan_retries=0"))
    with pytest.raises(NonFiniteLossError, match="step 5") as err:
        pretrain(cfg)
    assert "step_0000004" in str(err.value)
    run = RunDir(out)
    assert [p.name for p in run.complete_checkpoints()] == ["step_0000002", "step_0000004"]
    assert not (out / "model.safetensors").exists()
    for ckpt in run.complete_checkpoints():
        from safetensors.torch import load_file
        assert all(torch.isfinite(v).all() for v in load_file(str(ckpt / "model.safetensors")).values())


def test_a_non_finite_loss_is_recovered_from_the_last_checkpoint_skipping_the_data_that_diverged(
        tmp_path, shards, monkeypatch, capsys):
    from mae_vit.models import MaskedAutoencoderViT
    from mae_vit.tasks.pretrain import pretrain

    calls = {"n": 0}
    original = MaskedAutoencoderViT.forward_loss

    def poisoned(self, imgs, pred, mask):
        calls["n"] += 1
        loss = original(self, imgs, pred, mask)
        return loss * float("nan") if calls["n"] == 5 else loss  # the 5th optimizer step goes bad, once

    monkeypatch.setattr(MaskedAutoencoderViT, "forward_loss", poisoned)
    out = tmp_path / "run"
    summary = pretrain(parse_config(PretrainConfig, args(out, shards[0], "optim.epochs=2", "train.save_every=2",
                                                         "train.log_every=3")))
    err = capsys.readouterr().err
    assert "NaN or infinite at step 5; reloading" in err and "step_0000004" in err and "going on from step 6" in err
    assert summary["step"] == 16
    state = read_state(RunDir(out).latest())
    assert state.step == 16 and state.samples_seen == 16 * 16  # the skipped step's samples count as seen
    from safetensors.torch import load_file
    assert all(torch.isfinite(v).all() for v in load_file(str(out / "model.safetensors")).values())


def test_config_errors_exit_2_and_write_nothing(tmp_path, shards):
    out = tmp_path / "run"
    result = run_tool(args(out, shards[0], "optim.lrr=1"), timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "optim.lrr" in result.stderr and "optim.lr" in result.stderr
    result = run_tool(args(out, str(tmp_path / "missing-{000..003}.tar")), timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "missing-000.tar" in result.stderr
    assert not out.exists()


@pytest.mark.slow  # a whole training run
def test_resume_false_refuses_existing_run_unless_overwrite(tmp_path, shards):
    from mae_vit.tasks.pretrain import pretrain

    out = tmp_path / "run"
    pretrain(parse_config(PretrainConfig, args(out, shards[0], "optim.epochs=1", "train.save_every=100")))
    before = sorted(p.name for p in out.rglob("*"))
    cfg = parse_config(PretrainConfig, args(out, shards[0], "optim.epochs=1", "train.resume=false"))
    with pytest.raises(ConfigError, match="overwrite=true"):
        pretrain(cfg)
    assert sorted(p.name for p in out.rglob("*")) == before  # untouched
    cfg = parse_config(PretrainConfig, args(out, shards[0], "optim.epochs=1", "train.resume=false",
                                            "train.overwrite=true"))
    assert pretrain(cfg)["step"] == 8
    # a resumed run must use the same model
    cfg = parse_config(PretrainConfig, args(out, shards[0], "optim.epochs=2", "model.decoder_depth=2"))
    with pytest.raises(ConfigError, match="other shapes .*model.decoder_depth 1 -> 2"):
        pretrain(cfg)


def test_two_process_cpu_run(tmp_path, shards):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    # accelerate's --cpu launcher starts several processes only through mpirun; without MPI, --multi_gpu on a
    # machine without GPUs starts them with torch's launcher and they join as CPU (gloo) processes
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()),
           TOOL, *args(out, shards[0], "optim.epochs=2", "data.batch_size=8", "train.save_every=4")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es) x batch 8" in result.stderr
    state = read_state(RunDir(out).latest())
    assert state.step == 2 * 8 and state.epoch == 2  # 128 samples / (2 x 8) = 8 steps per epoch
    ckpt = RunDir(out).latest()
    assert (ckpt / "random_states_0.pkl").exists() and (ckpt / "random_states_1.pkl").exists()
    assert (out / "model.safetensors").exists()


def test_sigterm_saves_a_checkpoint_at_once_and_exits_75(tmp_path, shards):
    """Launchers kill ~30 s after SIGTERM: the stop comes at the next step, not at the next log line."""
    out = tmp_path / "run"
    argv = args(out, shards[0], "optim.epochs=50", "train.save_every=2", "train.log_every=1000")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, TOOL, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            text=True)
    deadline = time.time() + 120
    while RunDir(out).latest() is None and time.time() < deadline:  # training is under way
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, output
    flat = " ".join(output.split())
    assert "stop signal received" in flat and "Run the same command again to resume" in flat
    assert "Traceback" not in output
    state = read_state(RunDir(out).latest())  # saved when it stopped, long before the 1000-step log line
    assert 2 <= state.step < 400
    assert not (out / "model.safetensors").exists()  # stopped, not finished


@pytest.mark.slow  # a whole training run
def test_encoder_check_compares_with_the_runs_own_initial_weights_on_the_validation_split(tmp_path, shards,
                                                                                          monkeypatch):
    """The last lines of a run compare kNN on data.val of the trained encoder and of its step-0 weights."""
    from mae_vit.tasks import pretrain as pretrain_module

    seen = []
    real = pretrain_module.knn_monitor

    def spy(accelerator, model, train_urls, val_urls, cfg, **options):
        seen.append((train_urls, val_urls, {k: v.detach().clone() for k, v in model.state_dict().items()}))
        return real(accelerator, model, train_urls, val_urls, cfg, **options)

    monkeypatch.setattr(pretrain_module, "knn_monitor", spy)
    # lr 1e-30: the "trained" encoder is its initial weights, so the two numbers must agree
    frozen = pretrain_module.pretrain(parse_config(PretrainConfig, args(tmp_path / "a", shards[0], "optim.lr=1e-30",
                                                                        "optim.epochs=1", f"data.val={shards[1]}")))
    assert [(t, v) for t, v, _ in seen] == [(shards[0], shards[1])] * 2  # memory bank: train; queries: val
    for name, value in seen[0][2].items():  # the random-init copy has the run's step-0 weights
        torch.testing.assert_close(seen[1][2][name], value, atol=1e-20, rtol=0)
    assert frozen["vs_random"]["pretrained"] == frozen["vs_random"]["random_init"] and frozen["vs_random"]["gain"] == 0
    # trained: the encoder differs from its start, and the random-init number is the same draw as before
    seen.clear()
    trained = pretrain_module.pretrain(parse_config(PretrainConfig, args(
        tmp_path / "b", shards[0], "optim.base_lr=2e-3", "optim.epochs=3", f"data.val={shards[1]}")))
    assert not torch.equal(seen[0][2]["blocks.0.attn.qkv.weight"], seen[1][2]["blocks.0.attn.qkv.weight"])
    assert trained["vs_random"]["random_init"] == frozen["vs_random"]["random_init"]
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["vs_random"] == trained["vs_random"]


def test_no_encoder_check_without_labelled_validation_shards(tmp_path, shards):
    from mae_vit.tasks.pretrain import pretrain

    summary = pretrain(parse_config(PretrainConfig, args(tmp_path / "run", shards[0], "optim.epochs=1")))
    assert summary["vs_random"] is None and summary["step"] == 8


def test_the_online_probe_learns_on_labelled_shards_without_changing_the_mae(tmp_path, shards, capsys):
    from safetensors.torch import load_file

    from mae_vit.tasks.pretrain import pretrain

    common = [f"data.val={shards[1]}", "optim.epochs=4", "optim.base_lr=2e-3", "knn.vs_random=false"]
    with_probe = pretrain(parse_config(PretrainConfig, args(tmp_path / "a", shards[0], *common)))
    err = capsys.readouterr().err
    assert "online probe: a linear head on the masked encoder's class token, 10 classes" in err
    assert err.count("online probe top-1") == 4  # every epoch
    # the head learns: its cross-entropy starts at ln 10 = 2.303 (zero weights: every class alike) and falls
    assert with_probe["online_probe_loss"] < 2.25 and 0 <= with_probe["online_probe_top1"] <= 100
    without = pretrain(parse_config(PretrainConfig, args(tmp_path / "b", shards[0], *common, "online_probe=false")))
    assert without["online_probe_top1"] is None
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the probe taught the MAE nothing


def test_an_untrained_online_probe_is_at_chance(shards):
    from accelerate import Accelerator

    from mae_vit.eval import classifier_metrics
    from mae_vit.tasks.online_probe import OnlineProbe, ProbeClassifier
    from mae_vit.train.batches import ShardBatches, transform_for
    from mae_vit.train.build import build_model

    cfg = parse_config(PretrainConfig, [*args("unused", shards[0]), "data.mean=[0.5,0.5,0.5]",
                                        "data.std=[0.25,0.25,0.25]"])
    probe = OnlineProbe(build_model(cfg.model, mae=True), num_classes=10)
    val = ShardBatches(shards[1], cfg, transform_for(cfg, "eval"), accelerator=Accelerator(cpu=True), train=False)
    labels = torch.cat([b["label"] for b in val.batches()])
    top1 = classifier_metrics(ProbeClassifier(probe, 0.75), val.batches(), Accelerator(cpu=True))["top1"]
    shares = [100 * (labels == c).float().mean().item() for c in range(10)]
    assert any(top1 == pytest.approx(share) for share in shares)  # all logits equal: one class for every image
