"""Bad input is refused up front with exit status 2 and one paragraph, before anything is written or deleted."""

import subprocess
import sys
from pathlib import Path

import pytest

from mae_vit.data.synthetic import synthetic_samples
from mae_vit.data.writer import shard_urls, write_shards
from mae_vit.errors import DataError
from mae_vit.tasks.classify import resolve_num_classes

ROOT = Path(__file__).resolve().parent.parent


def shards(folder, n, classes):
    index = write_shards(synthetic_samples(n, img_size=16, num_classes=classes), folder, progress=False)
    return shard_urls(folder, "shard", len(index["shards"]))


def test_validation_classes_beyond_the_head_are_refused_before_training(tmp_path):
    train, val = shards(tmp_path / "train", 20, 5), shards(tmp_path / "val", 20, 10)
    assert resolve_num_classes(None, train) == 5
    with pytest.raises(DataError, match="validation shards have 10 classes but the model has 5"):
        resolve_num_classes(None, train, val)
    assert resolve_num_classes(10, train, val) == 10


@pytest.mark.parametrize("setting, words", [
    ("model.patch_size=5", "not divisible by the patch size 5"),
    ("model.embed_dim=50", "width 50 is not divisible by 4 heads"),
    ("model.mask_ratio=0", "nothing to learn"),
    ("optim.base_lr=.inf", "finite"),
    ("data.interpolation=lanczos", "nearest, bilinear, bicubic"),
])
def test_settings_that_cannot_train_exit_2_and_leave_the_folder_as_it_was(tmp_path, setting, words):
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"an earlier result")
    argv = ["--output-dir", str(out), "model.depth=1", "train.resume=false", "train.overwrite=true", setting]
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "pretrain.py"), *argv], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert words in " ".join(result.stderr.split())
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert (out / "model.safetensors").read_bytes() == b"an earlier result"


def test_a_tracker_whose_package_is_missing_exits_2_naming_the_package_and_writes_nothing(tmp_path):
    import importlib.util
    missing = next((t for t in ("wandb", "mlflow", "aim", "dvclive") if importlib.util.find_spec(t) is None), None)
    if missing is None:
        pytest.skip("every tracker package is installed here")
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "pretrain.py"), "--output-dir", str(out),
                             "model.depth=1", f"train.trackers=[tensorboard,{missing}]"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"pip install {missing}" in " ".join(result.stderr.split())
    assert not out.exists()
    unknown = subprocess.run([sys.executable, str(ROOT / "tools" / "pretrain.py"), "--output-dir", str(out),
                              "train.trackers=[neptune]"], capture_output=True, text=True, timeout=120)
    assert unknown.returncode == 2 and "a list of: tensorboard, wandb" in " ".join(unknown.stderr.split())
