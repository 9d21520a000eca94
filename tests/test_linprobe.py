"""Linear probing: frozen encoder, BN without affine parameters, head-only LARS, feature cache, resume, CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from mae_vit.checkpoint import export_safetensors, load_weights
from mae_vit.config import LinprobeConfig, parse_config
from mae_vit.data import ensure_demo_shards, eval_transform, make_loader
from mae_vit.models import create_model
from mae_vit.tasks.classify import FEATURES_NAME, METRICS_NAME, read_pretrained
from mae_vit.tasks.linprobe import build_lars, build_probe, linprobe
from mae_vit.train.optim import LARS
from mae_vit.train.rundir import RunDir, read_state

ROOT = Path(__file__).resolve().parent.parent
TOOL = str(ROOT / "tools" / "linprobe.py")
# a very small ViT: 16 px, patches of 4 (16 tokens), 48 wide, 3 blocks
SIZE = dict(embed_dim=48, depth=3, num_heads=2)
TINY = ["model.img_size=16", "model.embed_dim=48", "model.depth=3", "model.num_heads=2", "data.batch_size=16",
        "data.num_workers=0", "train.log_every=2"]
HEAD = {"head.0.running_mean", "head.0.running_var", "head.0.num_batches_tracked", "head.1.weight", "head.1.bias"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """64 labelled train samples (4 steps of 16), 16 val samples, 10 classes."""
    return ensure_demo_shards(tmp_path_factory.mktemp("cache"), num_samples=64)


@pytest.fixture(scope="module")
def mae16(tmp_path_factory):
    torch.manual_seed(2)
    mae = create_model("mae_vit_tiny_patch4", img_size=16, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
                       **SIZE)
    return export_safetensors(mae, tmp_path_factory.mktemp("pre") / "model.safetensors")


def cfg_for(out, shards, *extra):
    train, val = shards
    return parse_config(LinprobeConfig, ["--output-dir", str(out), "--data", train, f"data.val={val}", *TINY, *extra])


def test_only_the_head_trains_and_the_encoder_stays_frozen(shards, tmp_path, mae16):
    cfg = cfg_for(tmp_path, shards)
    probe, report = build_probe(cfg.model, num_classes=10, pretrained=read_pretrained(str(mae16)))
    assert set(report.missing) == HEAD - {"head.0.num_batches_tracked"}
    bn, linear = probe.classifier.head
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.weight is None and bn.eps == 1e-6
    assert [n for n, p in probe.named_parameters() if p.requires_grad] == ["module.head.1.weight", "module.head.1.bias"]
    optimizer = build_lars(probe, 0.1, weight_decay=0.0, momentum=0.9)
    assert isinstance(optimizer, LARS)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(linear.weight), id(linear.bias)}
    assert 0 < linear.weight.std() < 0.02 and torch.count_nonzero(linear.bias) == 0  # trunc_normal(std 0.01)

    before = {k: v.clone() for k, v in probe.classifier.state_dict().items()}
    probe.train()
    assert bn.training and not probe.classifier.blocks[0].training and not probe.classifier.training
    for step in range(3):
        logits = probe(torch.randn(8, 3, 16, 16))
        loss = F.cross_entropy(logits, torch.randint(0, 10, (8,)))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = probe.classifier.state_dict()
    for key, value in before.items():
        if key in HEAD:
            assert not torch.equal(value, after[key]), f"{key} did not change"
        else:
            assert torch.equal(value, after[key]), f"encoder weight {key} changed"
    assert all(p.grad is None for n, p in probe.named_parameters() if not n.startswith("module.head."))


@pytest.mark.slow  # a whole training run
def test_image_run_keeps_the_checkpoint_encoder_bit_for_bit(shards, tmp_path, mae16):
    out = tmp_path / "run"
    summary = linprobe(cfg_for(out, shards, "--checkpoint", str(mae16), "optim.epochs=2", "optim.warmup_epochs=1"))
    assert summary["step"] == 8 and summary["final"]["n"] == 16 and summary["best"] is not None
    pretrained, exported = load_file(str(mae16)), load_file(str(out / "model.safetensors"))
    encoder = [k for k in exported if k not in HEAD]
    assert "blocks.2.mlp.fc2.weight" in encoder and "norm.weight" in encoder and "pos_embed" in encoder
    for key in encoder:
        assert torch.equal(exported[key], pretrained[key]), key
    assert set(HEAD) <= set(exported)  # the official linear-probe layout: head.0 (BN), head.1 (linear)
    # the run's own checkpoints (keys "module.*") and exports load into a plain probe classifier
    fresh = create_model("vit_tiny_patch4", img_size=16, num_classes=10, global_pool=False, probe_bn=True, **SIZE)
    for source in (RunDir(out).latest() / "model.safetensors", out / "best.safetensors"):
        assert load_weights(fresh, source, strict=True).missing == []
    assert json.loads((out / METRICS_NAME).read_text())["task"] == "linprobe"


@pytest.mark.slow  # a whole training run
def test_feature_cache_run_gives_metrics_and_is_reused_on_resume(shards, tmp_path, mae16, capsys):
    out = tmp_path / "run"
    argv = ["--checkpoint", str(mae16), "feature_cache=true", "optim.epochs=6", "optim.warmup_epochs=1",
            "train.mixed_precision=no"]  # fp32 features, compared with fp32 ones below (auto is bf16 on an AMX CPU)
    first = linprobe(cfg_for(out, shards, *argv, "train.max_steps=9"))
    assert first["step"] == 9 and "extracted 64 train and 16 val features of width 48" in capsys.readouterr().err
    cache = torch.load(out / FEATURES_NAME, weights_only=True)
    assert cache["train_features"].shape == (64, 48) and cache["val_features"].shape == (16, 48)

    # the cached val features are exactly the class tokens of the pretrained encoder on the eval-transformed images
    classifier = create_model("vit_tiny_patch4", img_size=16, num_classes=10, global_pool=False, probe_bn=True,
                              **SIZE).eval()
    load_weights(classifier, mae16)
    used = yaml.safe_load((out / "config.yaml").read_text())["data"]  # the shards' own statistics, as the run saved
    loader = make_loader(shards[1], transform=eval_transform(16, mean=used["mean"], std=used["std"]), batch_size=16,
                         shuffle=False, drop_last=False)
    batch = next(iter(loader))
    with torch.no_grad():
        direct = classifier.pool(classifier.forward_features(batch["image"]))
    assert torch.allclose(cache["val_features"], direct, atol=1e-5)
    assert torch.equal(cache["val_labels"], batch["label"])

    second = linprobe(cfg_for(out, shards, *argv))
    err = capsys.readouterr().err
    assert "resuming from" in err and f"feature cache: reusing {out / FEATURES_NAME}" in err and "extracted" not in err
    assert second["step"] == 24 and second["epoch"] == 6  # 64 cached features / 16 = 4 steps per epoch
    metrics = json.loads((out / METRICS_NAME).read_text())
    assert metrics["final"]["n"] == 16 and metrics["final"]["step"] == 24 and metrics["final"]["epoch"] == 6
    assert 0 <= metrics["best"]["top1"] <= 100 and metrics["best"]["top1"] >= metrics["final"]["top1"]
    assert read_state(RunDir(out).latest()).best["top1"] == metrics["best"]["top1"]
    sweep = metrics["probe_sweep"]  # 15 heads on the same cached features: 58 fit, 6 held out of the 64
    assert len(sweep["heads"]) == 15 and (sweep["fit"], sweep["holdout"]) == (58, 6) and "probe sweep: 15 heads" in err
    assert sweep["chosen"] == max(sweep["heads"], key=lambda h: h["heldout_top1"]) and 0 <= sweep["test_top1"] <= 100
    exported = load_file(str(out / "model.safetensors"))
    assert torch.equal(exported["blocks.0.attn.qkv.weight"], load_file(str(mae16))["blocks.0.attn.qkv.weight"])


@pytest.mark.slow  # a whole training run
def test_cache_made_for_other_settings_is_not_reused(shards, tmp_path, mae16, capsys):
    out = tmp_path / "run"
    argv = ["--checkpoint", str(mae16), "feature_cache=true", "optim.epochs=2", "optim.warmup_epochs=0"]
    linprobe(cfg_for(out, shards, *argv, "train.max_steps=2"))
    capsys.readouterr()
    linprobe(cfg_for(out, shards, *argv, "data.crop_pct=1.0"))  # another eval transform: other features
    err = capsys.readouterr().err
    assert "was made for other settings" in err and "extracted 64 train" in err


def test_cli_bad_checkpoint_exits_2_and_writes_nothing(shards, tmp_path):
    out = tmp_path / "run"
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a checkpoint at all")
    cmd = [sys.executable, TOOL, "--output-dir", str(out), "--data", shards[0], "--checkpoint", str(bad), *TINY]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and str(bad) in result.stderr and "not a readable" in result.stderr
    assert not out.exists()


def test_overwrite_deletes_the_probe_outputs_and_a_refusal_keeps_them(shards, tmp_path):
    from mae_vit.errors import ConfigError
    from mae_vit.tasks.classify import BEST_NAME

    out = tmp_path / "run"
    names = ("model.safetensors", BEST_NAME, METRICS_NAME, FEATURES_NAME)
    for name in names:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("old")
    run = RunDir(out, outputs=(BEST_NAME, METRICS_NAME, FEATURES_NAME))
    run.record_names()  # as the run that wrote them did
    with pytest.raises(ConfigError, match="overwrite=true"):
        run.prepare(cfg_for(out, shards, "train.resume=false"), is_main=True)
    assert all((out / name).exists() for name in names)
    assert run.prepare(cfg_for(out, shards, "train.resume=false", "train.overwrite=true"), is_main=True) is None
    assert not any((out / name).exists() for name in names)


def test_the_probe_sweep_chooses_on_the_held_out_training_slice_never_on_the_test_set():
    from mae_vit.eval.probe_sweep import LRS, WEIGHT_DECAYS, probe_sweep

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 2
    train_y, test_y = torch.randint(0, 4, (400,), generator=g), torch.randint(0, 4, (100,), generator=g)
    train_x = centres[train_y] + torch.randn(400, 16, generator=g)
    test_x = centres[test_y] + torch.randn(100, 16, generator=g)
    result = probe_sweep(train_x, train_y, test_x, test_y, num_classes=4, epochs=5)
    assert len(result["heads"]) == len(LRS) * len(WEIGHT_DECAYS) and (result["fit"], result["holdout"]) == (360, 40)
    assert result["chosen"] == max(result["heads"], key=lambda h: h["heldout_top1"])
    assert result["test_top1"] > 80  # well-separated classes: the chosen head is good (chance: 25%)
    shuffled = probe_sweep(train_x, train_y, test_x, test_y[torch.randperm(100, generator=g)], num_classes=4, epochs=5)
    assert shuffled["chosen"] == result["chosen"]  # the test labels play no part in the choice
    assert shuffled["test_top1"] < 50


@pytest.mark.slow  # a whole training run
def test_feature_cache_probe_evaluates_data_test_once_with_the_best_val_epoch_weights(shards, tmp_path, mae16, capsys):
    out = tmp_path / "run"
    _, test = ensure_demo_shards(tmp_path / "other", num_samples=96, seed=5)  # 24 images, none of the 16 val ones
    linprobe(cfg_for(out, shards, "--checkpoint", str(mae16), "feature_cache=true", "optim.epochs=4",
                     "optim.warmup_epochs=1", "train.mixed_precision=no", f"data.test={test}"))
    metrics = json.loads((out / METRICS_NAME).read_text())
    best_epoch = metrics["best"]["epoch"]
    assert metrics["test"]["n"] == 24 and metrics["test"]["chosen_by"] == f"val top-1 at epoch {best_epoch:g}"
    assert "test top-1" in capsys.readouterr().err

    # the same figures from best.safetensors on the test images, through the whole classifier
    classifier = create_model("vit_tiny_patch4", img_size=16, num_classes=10, global_pool=False, probe_bn=True,
                              **SIZE).eval()
    load_weights(classifier, out / "best.safetensors", strict=True)
    used = yaml.safe_load((out / "config.yaml").read_text())["data"]
    loader = make_loader(test, transform=eval_transform(16, mean=used["mean"], std=used["std"]), batch_size=24,
                         shuffle=False, drop_last=False)
    batch = next(iter(loader))
    with torch.no_grad():
        logits = classifier(batch["image"])
    top1 = (logits.argmax(1) == batch["label"]).float().mean().item() * 100
    assert metrics["test"]["top1"] == pytest.approx(top1)
    assert metrics["test"]["loss"] == pytest.approx(F.cross_entropy(logits, batch["label"]).item(), rel=1e-4)


def test_a_probe_on_mean_pooled_tokens_reads_the_layer_normed_mean_of_the_patch_tokens_and_trains_only_the_head(
        shards, tmp_path, mae16):
    cfg = cfg_for(tmp_path, shards, "model.global_pool=true")
    probe, report = build_probe(cfg.model, num_classes=10, pretrained=read_pretrained(str(mae16)))
    assert set(report.missing) == HEAD - {"head.0.num_batches_tracked"} | {"fc_norm.weight", "fc_norm.bias"}
    assert [n for n, p in probe.named_parameters() if p.requires_grad] == ["module.head.1.weight", "module.head.1.bias"]
    encoder = create_model("vit_tiny_patch4", img_size=16, num_classes=0, global_pool=False, **SIZE).eval()
    load_weights(encoder, mae16)
    images = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        tokens = encoder.run_blocks(encoder.prepend_cls(encoder.embed(images)))  # (4, 1 + 16, 48), no final norm
        expected = F.layer_norm(tokens[:, 1:].mean(dim=1), (48,), eps=1e-6)  # fc_norm as initialised: weight 1, bias 0
    probe.train()
    assert torch.allclose(probe.features(images), expected, atol=1e-5)
