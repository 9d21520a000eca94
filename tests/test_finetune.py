"""Fine-tuning: layer-wise lr decay, zero head, --resolution, end-to-end run with resume, 2-process evaluation, CLI."""

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from conftest import free_port
from safetensors.torch import load_file

from mae_vit.checkpoint import export_safetensors, load_weights
from mae_vit.config import FinetuneConfig, parse_config
from mae_vit.data import ensure_demo_shards
from mae_vit.errors import CheckpointError, ConfigError, DataError
from mae_vit.eval import classifier_metrics
from mae_vit.layers import resize_pos_embed
from mae_vit.models import ViTClassifier, create_model
from mae_vit.tasks.classify import (
    BEST_NAME,
    METRICS_NAME,
    read_pretrained,
    resolve_num_classes,
    soft_target_cross_entropy,
)
from mae_vit.tasks.finetune import Finetune, build_finetune_model
from mae_vit.train.batches import ShardBatches, transform_for
from mae_vit.train.optim import set_lr
from mae_vit.train.rundir import RunDir, read_state

ROOT = Path(__file__).resolve().parent.parent
TOOL = str(ROOT / "tools" / "finetune.py")
# a very small ViT: 16 px, patches of 4 (16 tokens), 48 wide, 3 blocks
SIZE = dict(embed_dim=48, depth=3, num_heads=2)
TINY = ["model.img_size=16", "model.embed_dim=48", "model.depth=3", "model.num_heads=2", "data.batch_size=16",
        "data.num_workers=0", "train.log_every=2"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """64 labelled train samples (4 steps of 16), 16 val samples, 10 classes."""
    return ensure_demo_shards(tmp_path_factory.mktemp("cache"), num_samples=64)


@pytest.fixture(scope="module")
def mae16(tmp_path_factory):
    """A tiny MAE (ViT-Tiny/4 encoder at 16 px, 1-block decoder) exported like a pretraining run's weights."""
    torch.manual_seed(1)
    mae = create_model("mae_vit_tiny_patch4", img_size=16, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
                       **SIZE)
    return export_safetensors(mae, tmp_path_factory.mktemp("pre") / "model.safetensors")


def cfg_for(out, shards, *extra):
    train, val = shards
    return parse_config(FinetuneConfig, ["--output-dir", str(out), "--data", train, f"data.val={val}", *TINY, *extra])


def test_layer_decay_groups_scale_lr_by_depth_and_exempt_weight_decay(shards, tmp_path):
    cfg = cfg_for(tmp_path, shards, "optim.layer_decay=0.5", "optim.weight_decay=0.05")
    model = ViTClassifier(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=5)
    optimizer = Finetune(cfg).build_optimizer(model)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["betas"] == (0.9, 0.999)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(names)  # each parameter exactly once
    for name, p in names.items():
        depth = model.layer_of(name)
        assert group_of[id(p)]["lr_scale"] == 0.5 ** (3 + 1 - depth), name
        decayed = p.ndim > 1 and name not in ("pos_embed", "cls_token")
        assert group_of[id(p)]["weight_decay"] == (0.05 if decayed else 0.0), name
    scale = {n: group_of[id(p)]["lr_scale"] for n, p in names.items()}
    assert scale["patch_embed.proj.weight"] == 0.0625 and scale["cls_token"] == 0.0625
    assert scale["blocks.0.attn.qkv.weight"] == 0.125 and scale["blocks.2.mlp.fc2.bias"] == 0.5
    assert scale["fc_norm.weight"] == 1.0 and scale["head.weight"] == 1.0
    set_lr(optimizer, 0.01)
    assert group_of[id(names["blocks.1.norm1.weight"])]["lr"] == 0.01 * 0.25


def test_zero_head_gives_zero_logits_before_the_first_step(shards, tmp_path, mae16):
    cfg = cfg_for(tmp_path, shards)
    for pretrained in (None, read_pretrained(str(mae16))):
        model, _ = build_finetune_model(cfg.model, img_size=16, num_classes=7, pretrained=pretrained)
        logits = model(torch.randn(3, 3, 16, 16))
        assert logits.shape == (3, 7) and torch.count_nonzero(logits) == 0
        assert F.cross_entropy(logits, torch.tensor([0, 3, 6])).item() == pytest.approx(math.log(7), rel=1e-6)


def test_fine_tuning_starts_from_exactly_the_pretrained_encoder(shards, tmp_path, mae16):
    """Export -> read -> classifier: the blocks compute the MAE encoder's own features, bit for bit (no step of
    the pretraining -> export -> loading path loses or alters a weight)."""
    mae = create_model("mae_vit_tiny_patch4", img_size=16, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
                       **SIZE)
    assert load_weights(mae, str(mae16), strict=True, verbose=False).missing == []
    for pool in (True, False):
        cfg = cfg_for(tmp_path, shards, f"model.global_pool={str(pool).lower()}")
        model, report = build_finetune_model(cfg.model, img_size=16, num_classes=10,
                                             pretrained=read_pretrained(str(mae16)))
        x = torch.randn(5, 3, 16, 16)
        with torch.no_grad():
            mine, theirs = model.eval().forward_features(x), mae.eval().forward_features(x)
        if pool:  # global pooling drops the final norm (fc_norm is new): compare before it
            mine = model.run_blocks(model.prepend_cls(model.embed(x)))
            theirs = mae.run_blocks(mae.prepend_cls(mae.embed(x)))
        assert torch.equal(mine, theirs)


def test_higher_resolution_resizes_pos_embed_and_runs_at_the_new_size(shards, tmp_path, mae16):
    cfg = cfg_for(tmp_path, shards)
    pretrained = read_pretrained(str(mae16))
    saved_pos = pretrained["pos_embed"].clone()  # (1, 1 + 4 x 4, 48)
    model, report = build_finetune_model(cfg.model, img_size=24, num_classes=10, pretrained=pretrained)
    assert report.resized == ["pos_embed"]
    assert {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"} == set(report.missing)
    assert model.pos_embed.shape == (1, 1 + 6 * 6, 48)
    assert torch.equal(model.pos_embed.detach(), resize_pos_embed(saved_pos, (6, 6)))
    assert torch.equal(model.pos_embed.detach()[:, 0], saved_pos[:, 0])  # the class token's entry is kept
    assert torch.equal(model.blocks[2].mlp.fc1.weight.detach(), load_file(str(mae16))["blocks.2.mlp.fc1.weight"])
    assert model(torch.randn(2, 3, 24, 24)).shape == (2, 10)


def test_checkpoint_without_the_encoder_is_refused(shards, tmp_path):
    cfg = cfg_for(tmp_path, shards)
    with pytest.raises(CheckpointError, match="encoder"):
        build_finetune_model(cfg.model, img_size=16, num_classes=10,
                             pretrained={"head.weight": torch.zeros(10, 48)}, source="head.pth")


def test_losses_soft_targets_and_label_smoothing(shards, tmp_path):
    logits, labels = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 1])
    one_hot = F.one_hot(labels, 4).float()
    assert soft_target_cross_entropy(logits, one_hot).item() == pytest.approx(F.cross_entropy(logits, labels).item())
    mode = Finetune(cfg_for(tmp_path, shards, "augment.mixup=0", "augment.cutmix=0", "augment.label_smoothing=0.2"))
    mode.make_model(4, None)
    assert mode.mixer is None
    smoothed = one_hot * 0.8 + 0.2 / 4
    expected = -(smoothed * F.log_softmax(logits, -1)).sum(-1).mean()
    assert mode.criterion(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    mode = Finetune(cfg_for(tmp_path, shards))  # the recipe: MixUp 0.8 / CutMix 1.0 with smoothing 0.1
    mode.make_model(4, None)
    images, targets = mode.mix(torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 0, 1]))
    assert targets.shape == (6, 4) and torch.allclose(targets.sum(-1), torch.ones(6))
    assert targets.min() >= 0.1 / 4 - 1e-6


def test_num_classes_from_index_or_config(shards, tmp_path):
    train, _ = shards
    assert resolve_num_classes(None, train) == 10 and resolve_num_classes(12, train) == 12
    with pytest.raises(DataError, match="--num-classes 10"):
        resolve_num_classes(5, train)
    bare = tmp_path / "bare"
    bare.mkdir()
    for tar in Path(train.split("shard-")[0]).glob("*.tar"):
        shutil.copy(tar, bare / tar.name)  # the shards without their index
    with pytest.raises(DataError, match="--num-classes K"):
        resolve_num_classes(None, str(bare))


@pytest.mark.slow  # a whole training run
def test_end_to_end_run_exports_best_and_last_and_resumes(shards, tmp_path, mae16, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mae_vit.tasks.finetune import finetune

    out = tmp_path / "run"
    # batches of 12: 64 // 12 = 5 steps per epoch; the 16 val images come as 12 + 4 (the last one must count)
    argv = ["--checkpoint", str(mae16), "data.batch_size=12", "optim.epochs=2", "optim.warmup_epochs=1",
            "train.save_every=100", "train.keep_last=5"]
    first = finetune(cfg_for(out, shards, *argv, "train.max_steps=7"))  # stops in the middle of epoch 2
    assert first["step"] == 7 and first["resumed_from"] is None
    assert first["final"]["step"] == 7 and first["final"]["epoch"] == 1.4 and first["final"]["n"] == 16
    assert "loaded " + str(mae16) in capsys.readouterr().err
    run = RunDir(out)
    assert [p.name for p in run.complete_checkpoints()] == ["step_0000005", "step_0000007"]  # epoch end, last
    assert read_state(run.latest()).samples_seen == 7 * 12

    second = finetune(cfg_for(out, shards, *argv))  # the same command without the step limit: resumes
    err = capsys.readouterr().err
    assert f"resuming from {out / 'checkpoints' / 'step_0000007'}" in err and "loaded " not in err
    assert second["step"] == 10 and second["epoch"] == 2 and second["resumed_from"].endswith("step_0000007")
    state = read_state(run.latest())
    assert run.latest().name == "step_0000010" and state.epoch == 2 and state.samples_seen == 10 * 12

    metrics = json.loads((out / METRICS_NAME).read_text())
    logs = EventAccumulator(str(out / "logs"))
    logs.Reload()
    top1 = {e.step: e.value for e in logs.Scalars("val/top1")}
    assert sorted(top1) == [5, 7, 10]  # epoch 1, the stop at step 7, epoch 2
    assert metrics["final"]["step"] == 10 and metrics["final"]["n"] == 16
    assert metrics["final"]["top1"] == pytest.approx(top1[10])
    assert metrics["best"]["top1"] == pytest.approx(max(top1.values())) == state.best["top1"]
    assert metrics["best"]["step"] == min(s for s, v in top1.items() if v == max(top1.values()))
    assert metrics["num_classes"] == 10 and metrics["img_size"] == 16 and metrics["task"] == "finetune"
    assert "train/loss" in logs.Tags()["scalars"]

    fresh = create_model("vit_tiny_patch4", img_size=16, num_classes=10, **SIZE)
    for name in ("model.safetensors", BEST_NAME):
        assert load_weights(fresh, out / name, strict=True).missing == []
    last = load_file(str(out / "model.safetensors"))
    assert torch.count_nonzero(last["head.weight"]) > 0  # the head trained
    assert not torch.equal(last["blocks.0.attn.qkv.weight"], load_file(str(mae16))["blocks.0.attn.qkv.weight"])

    with pytest.raises(ConfigError, match="resolution 16 -> 24"):  # resuming at another resolution is refused up front
        finetune(cfg_for(out, shards, *argv, "--resolution", "24"))


EVAL_SCRIPT = textwrap.dedent("""
    import json, sys, pathlib, torch
    from accelerate import Accelerator
    from mae_vit.config import FinetuneConfig, parse_config
    from mae_vit.train.batches import ShardBatches, transform_for
    from mae_vit.eval import classifier_metrics
    from mae_vit.models import ViTClassifier

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = ViTClassifier(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=10)
    torch.nn.init.normal_(model.head.weight)
    cfg = parse_config(FinetuneConfig, ["data.batch_size=4", "data.num_workers=0", "model.img_size=16",
                                        "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]"])
    val = ShardBatches(sys.argv[1], cfg, transform_for(cfg, "eval"), accelerator=accelerator, train=False)
    local = sum(len(b["label"]) for b in val.batches())
    metrics = classifier_metrics(model.to(accelerator.device), val.batches(), accelerator)
    out = pathlib.Path(sys.argv[2]) / f"rank{accelerator.process_index}.json"  # a file each: no mixed-up lines
    out.write_text(json.dumps({"local": local, "metrics": metrics}))
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroys the process group: exiting with it alive can abort in gloo's threads
""")


def test_two_process_evaluation_counts_every_sample_once(tmp_path):
    _, val = ensure_demo_shards(tmp_path / "cache", num_samples=84)  # 21 val samples: not a multiple of 2 x 4
    script = tmp_path / "eval_two.py"
    script.write_text(EVAL_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    # accelerate's --cpu launcher starts several processes only through MPI; --multi_gpu without GPUs starts
    # them with torch's launcher, and they join as CPU (gloo) processes
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           str(script), val, str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    shares = [r["local"] for r in ranks]
    assert sum(shares) == 21 and min(shares) > 0  # disjoint shares of different sizes
    both = [r["metrics"] for r in ranks]
    assert both[0] == both[1] and both[0]["n"] == 21

    torch.manual_seed(0)  # the same model in one process: the same numbers
    model = ViTClassifier(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=10)
    torch.nn.init.normal_(model.head.weight)
    cfg = parse_config(FinetuneConfig, ["data.batch_size=4", "data.num_workers=0", "model.img_size=16",
                                        "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]"])
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(True)  # earlier tests in this process may have set bf16 (mixed_precision=auto)
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    val_batches = ShardBatches(val, cfg, transform_for(cfg, "eval"), accelerator=accelerator, train=False)
    alone = classifier_metrics(model, val_batches.batches(), accelerator)
    assert alone["n"] == 21
    assert alone["top1"] == pytest.approx(both[0]["top1"]) and alone["top5"] == pytest.approx(both[0]["top5"])
    assert alone["loss"] == pytest.approx(both[0]["loss"], rel=1e-5)


def test_cli_bad_checkpoint_exits_2_and_writes_nothing(shards, tmp_path):
    out = tmp_path / "run"
    missing = tmp_path / "nowhere" / "mae.pth"
    cmd = [sys.executable, TOOL, "--output-dir", str(out), "--data", shards[0], "--checkpoint", str(missing), *TINY]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = result.stderr.strip()
    assert message.startswith("error: checkpoint") and str(missing) in message and "\n\n" not in message
    assert not out.exists()


@pytest.mark.slow  # a whole training run
def test_data_test_is_evaluated_once_at_the_end_with_the_weights_chosen_on_val(shards, tmp_path, mae16, monkeypatch,
                                                                            capsys):
    import yaml

    from mae_vit.tasks import classify
    from mae_vit.tasks.finetune import finetune

    _, test = ensure_demo_shards(tmp_path / "other", num_samples=96, seed=5)  # 24 images, none of the 16 val ones
    real, calls = classify.classifier_metrics, []

    def scripted(*args, **kwargs):  # the val top-1 falls after epoch 1, so epoch 1's weights are the best
        metrics = real(*args, **kwargs)
        calls.append(metrics["n"])
        if metrics["n"] == 16:
            metrics["top1"] = 90.0 - len(calls)
        return metrics

    monkeypatch.setattr(classify, "classifier_metrics", scripted)
    out = tmp_path / "run"
    finetune(cfg_for(out, shards, "--checkpoint", str(mae16), "optim.epochs=3", "optim.warmup_epochs=0",
                     f"data.test={test}"))
    assert calls == [16, 16, 16, 24]  # val after each epoch, then the test split once
    metrics = json.loads((out / METRICS_NAME).read_text())
    assert metrics["best"]["epoch"] == 1 and metrics["final"]["epoch"] == 3 and metrics["final"]["n"] == 16
    assert metrics["test"]["n"] == 24 and metrics["test"]["chosen_by"] == "val top-1 at epoch 1"
    assert metrics["test"]["weights"] == str(out / BEST_NAME)
    assert "test top-1" in capsys.readouterr().err

    used = yaml.safe_load((out / "config.yaml").read_text())  # the normalisation the run used
    cfg = cfg_for(tmp_path / "check", shards, f"data.mean={used['data']['mean']}", f"data.std={used['data']['std']}")
    accelerator = Accelerator(cpu=True)

    def on_test(weights):
        model = create_model("vit_tiny_patch4", img_size=16, num_classes=10, **SIZE)
        load_weights(model, weights, strict=True)
        batches = ShardBatches(test, cfg, transform_for(cfg, "eval", 16), accelerator=accelerator, train=False)
        return real(model, batches.batches(), accelerator)

    best, last = on_test(out / BEST_NAME), on_test(out / "model.safetensors")
    assert metrics["test"]["top1"] == pytest.approx(best["top1"]) and metrics["test"]["loss"] == pytest.approx(
        best["loss"], rel=1e-5)
    assert metrics["test"]["loss"] != pytest.approx(last["loss"], rel=1e-5)  # not the last epoch's weights


def test_data_test_is_a_key_of_the_classifier_tools_only(shards, tmp_path):
    from mae_vit.config import PretrainConfig

    assert cfg_for(tmp_path, shards, "data.test=/x/shard-{000000..000001}.tar").data.test == \
        "/x/shard-{000000..000001}.tar"
    assert cfg_for(tmp_path, shards).data.test is None  # null by default: no test evaluation
    with pytest.raises(ConfigError, match="data.test"):
        parse_config(PretrainConfig, ["data.test=/x/a.tar"])


def test_a_missing_test_split_fails_before_training(shards, tmp_path):
    from mae_vit.tasks.finetune import finetune

    with pytest.raises(DataError, match="nothing"):
        finetune(cfg_for(tmp_path / "run", shards, f"data.test={tmp_path / 'nothing' / 'shard-000000.tar'}"))
    assert not (tmp_path / "run" / "checkpoints").exists()
