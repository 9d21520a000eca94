"""Fine-tuning and linear probing take the encoder's architecture from the run they start from (its config.yaml, or
the metadata of its exported model.safetensors); keys the user gives win, and one the weights contradict is refused."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from mae_vit.config import FinetuneConfig, LinprobeConfig, PretrainConfig, parse_config
from mae_vit.data import ensure_demo_shards
from mae_vit.errors import ConfigError
from mae_vit.tasks.finetune import finetune
from mae_vit.tasks.linprobe import linprobe
from mae_vit.tasks.pretrain import pretrain
from mae_vit.train.run_config import user_set_keys

ROOT = Path(__file__).resolve().parent.parent
# the run's architecture: none of it is the classifier tools' default (12 blocks of 192, 3 heads, 32 px)
ARCH = ["model.name=mae_vit_tiny_patch4", "model.img_size=16", "model.embed_dim=64", "model.depth=2",
        "model.num_heads=2", "model.pos_embed=learned"]
MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
SHORT = ["data.batch_size=16", "data.num_workers=0", "optim.epochs=1", "optim.warmup_epochs=0", "train.max_steps=1"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return ensure_demo_shards(tmp_path_factory.mktemp("cache"), num_samples=64)


@pytest.fixture(scope="module")
def run(tmp_path_factory, shards):
    """A real (one-step) pretraining run of a 2-block, 64-wide MAE at 16 px, with its own normalisation."""
    out = tmp_path_factory.mktemp("runs") / "pretrain"
    pretrain(parse_config(PretrainConfig, [
        "--output-dir", str(out), "--data", shards[0], *ARCH, "model.decoder_embed_dim=32", "model.decoder_depth=1",
        "model.decoder_num_heads=2", "model.mask_ratio=0.5", f"data.mean={MEAN}", f"data.std={STD}",
        "knn.vs_random=false", "knn.every=0", "online_probe=false", *SHORT]))
    return out


def start(tool, cls, out, shards, checkpoint, *extra):
    """`tool` (finetune / linprobe) as its script calls it: the keys the user gave are those of argv."""
    argv = ["--output-dir", str(out), "--data", shards[0], f"data.val={shards[1]}", "--checkpoint", str(checkpoint),
            *SHORT, *extra]
    cfg = parse_config(cls, argv)
    return tool(cfg, user_keys=user_set_keys(cfg, argv))


def saved_config(out):
    from omegaconf import OmegaConf
    return OmegaConf.load(out / "config.yaml")


def test_fine_tuning_a_run_directory_takes_its_encoder_without_model_keys(run, shards, tmp_path, capsys):
    summary = start(finetune, FinetuneConfig, tmp_path / "ft", shards, run)
    assert summary["step"] == 1 and summary["img_size"] == 16
    cfg = saved_config(tmp_path / "ft")
    assert cfg.model.name == "vit_tiny_patch4"  # the run's MAE name, as a classifier
    assert (cfg.model.img_size, cfg.model.embed_dim, cfg.model.depth, cfg.model.num_heads) == (16, 64, 2, 2)
    assert cfg.model.pos_embed == "learned" and list(cfg.data.mean) == MEAN and list(cfg.data.std) == STD
    err = capsys.readouterr().err
    assert f"architecture from {run / 'config.yaml'}" in err and "model.depth=2" in err


def test_an_exported_model_safetensors_copied_alone_still_says_its_architecture(run, shards, tmp_path, capsys):
    copy = tmp_path / "elsewhere" / "weights.safetensors"
    copy.parent.mkdir()
    shutil.copy(run / "model.safetensors", copy)
    with safe_open(str(copy), framework="pt") as f:
        assert '"depth": 2' in f.metadata()["mae_vit.run"]
    summary = start(linprobe, LinprobeConfig, tmp_path / "probe", shards, copy)
    assert summary["step"] == 1 and summary["img_size"] == 16
    cfg = saved_config(tmp_path / "probe")
    assert (cfg.model.name, cfg.model.embed_dim, cfg.model.depth, cfg.model.pos_embed) == ("vit_tiny_patch4", 64, 2,
                                                                                         "learned")
    assert list(cfg.data.mean) == MEAN and cfg.model.global_pool is False  # the probe's own keys stay its own
    assert f"architecture from the metadata of {copy}" in capsys.readouterr().err
    with safe_open(str(tmp_path / "probe" / "model.safetensors"), framework="pt") as f:  # the probe's export says too
        assert '"name": "vit_tiny_patch4"' in f.metadata()["mae_vit.run"]


def test_keys_the_user_gives_win_over_the_run(run, shards, tmp_path, capsys):
    out = tmp_path / "ft"
    summary = start(finetune, FinetuneConfig, out, shards, run, "model.img_size=24", "data.mean=[0.5,0.5,0.5]",
                    "model.name=vit_tiny_patch4")  # the last one agrees with the run: not an override
    assert summary["img_size"] == 24  # pos_embed resized from the run's 4 x 4 grid to 6 x 6
    cfg = saved_config(out)
    assert cfg.model.img_size == 24 and cfg.model.depth == 2 and list(cfg.data.mean) == [0.5, 0.5, 0.5]
    assert list(cfg.data.std) == STD
    err = capsys.readouterr().err
    assert "given, kept over the run's: model.img_size=24 (the run: 16), data.mean=[0.5, 0.5, 0.5]" in err
    assert "model.name=vit_tiny_patch4 (the run" not in err


@pytest.mark.parametrize("key, value", [("model.depth", "3"), ("model.embed_dim", "32")])
def test_a_given_key_that_contradicts_the_weights_is_refused_naming_it(run, shards, tmp_path, key, value):
    out = tmp_path / "ft"
    with pytest.raises(ConfigError, match=rf"given {key}={value} \(its run has (2|64)\) contradicts the weights") as e:
        start(finetune, FinetuneConfig, out, shards, run, f"{key}={value}", "model.img_size=24",
              "data.mean=[0.5,0.5,0.5]")  # given too, but no shape depends on them: not named
    assert "img_size" not in str(e.value) and "data.mean" not in str(e.value)
    assert not (out / "config.yaml").exists() and not (out / "checkpoints").exists()


def test_foreign_weights_keep_the_model_keys_alone(shards, tmp_path):
    from mae_vit.checkpoint import export_safetensors
    from mae_vit.models import create_model
    from mae_vit.train.run_config import encoder_config_from_run

    weights = export_safetensors(create_model("vit_tiny_patch4", img_size=16, depth=1, num_classes=3),
                                 tmp_path / "timm_like.safetensors")  # no metadata, no config.yaml beside it
    cfg = parse_config(FinetuneConfig, ["--checkpoint", str(weights), "model.depth=1"])
    assert encoder_config_from_run(cfg, user_set_keys(cfg)) == (cfg, None)


def test_the_tools_fine_tune_and_probe_a_run_given_by_its_directory_alone(run, shards, tmp_path):
    common = ["--data", shards[0], f"data.val={shards[1]}", "--checkpoint", str(run), *SHORT]
    for tool, extra in (("finetune.py", ["--resolution", "24"]), ("linprobe.py", [])):
        out = tmp_path / tool
        result = subprocess.run([sys.executable, str(ROOT / "tools" / tool), "--output-dir", str(out), *common,
                                 *extra], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "model.depth=2" in result.stderr and "done: step 1" in result.stderr
        cfg = saved_config(out)
        assert (cfg.model.depth, cfg.model.embed_dim) == (2, 64)
    assert saved_config(tmp_path / "finetune.py").resolution == 24
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "linprobe.py"), "--output-dir", str(tmp_path / "x"),
                             *common, "model.patch_size=8"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "model.patch_size=8 (its run has null) contradicts" in " ".join(result.stderr.split())
