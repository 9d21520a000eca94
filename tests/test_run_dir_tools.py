"""The training tools and their run directory, as a user runs them: overwrite, bad output folders, bigger batches."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mae_vit.data.synthetic import synthetic_samples
from mae_vit.data.writer import shard_urls, write_shards
from mae_vit.train.rundir import RunDir, read_state

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.img_size=16", "model.depth=1", "model.embed_dim=32", "model.num_heads=2", "model.decoder_embed_dim=32",
        "model.decoder_depth=1", "model.decoder_num_heads=2", "data.batch_size=16", "data.num_workers=0"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    index = write_shards(synthetic_samples(128, img_size=16, num_classes=4), folder, samples_per_shard=32,
                         progress=False)
    return shard_urls(folder, "shard", len(index["shards"]))


def pretrain(out, data, *extra, cwd=None):
    argv = [sys.executable, str(ROOT / "tools" / "pretrain.py"), "--data", data, *TINY, *extra]
    if out is not None:
        argv[2:2] = ["--output-dir", str(out)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=cwd)


def test_overwrite_of_a_real_run_deletes_its_own_files_and_no_one_elses(tmp_path, shards):
    out = tmp_path / "run"
    first = pretrain(out, shards, "train.max_steps=4", "train.vis_every=2")
    assert first.returncode == 0, first.stderr[-3000:]
    old_events = sorted(p.name for p in (out / "logs").rglob("events.out.tfevents.*"))
    assert len(old_events) == 1 and (out / "reconstructions" / "step_0000002.png").exists()
    others = {"checkpoints/step_mine/notes.txt": "mine", "logs/other_project/run1/events.out.tfevents.1.host": "theirs",
              "reconstructions/step_notes.png": "a picture", "notes.md": "keep"}
    for name, text in others.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    again = pretrain(out, shards, "train.max_steps=2", "train.resume=false", "train.overwrite=true")
    assert again.returncode == 0, again.stderr[-3000:]
    assert {name: (out / name).read_text() for name in others} == others
    assert not (out / "reconstructions" / "step_0000004.png").exists()
    assert not any((out / "logs").rglob(old_events[0]))
    assert [p.name for p in RunDir(out).complete_checkpoints()] == ["step_0000002"]
    assert "checkpoints/step_0000002" in json.loads((out / "run_files.json").read_text())["files"]


def test_an_output_dir_that_is_empty_a_file_or_inside_a_file_exits_2_and_writes_nothing(tmp_path, shards):
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "cwd").mkdir()
    cases = [(None, ["train.output_dir="], "train.output_dir is empty"),
             (tmp_path / "a_file", [], "is a file, not a folder"),
             (tmp_path / "a_file" / "run", [], "is a file, not a folder")]
    for out, extra, words in cases:
        result = pretrain(out, shards, "train.max_steps=1", *extra, cwd=tmp_path / "cwd")
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert words in " ".join(result.stderr.split())
    assert list((tmp_path / "cwd").iterdir()) == [] and (tmp_path / "a_file").read_text() == "not a folder"


def test_a_resumed_run_with_a_bigger_batch_keeps_its_new_checkpoints_and_resumes_from_them(tmp_path, shards):
    out = tmp_path / "run"
    common = ["optim.epochs=4", "train.save_every=4", "train.keep_last=2", "train.trackers=[]"]
    assert pretrain(out, shards, *common, "train.max_steps=8").returncode == 0  # batch 16: 128 samples
    result = pretrain(out, shards, *common, "data.batch_size=64", "train.max_steps=3")  # step 3 at batch 64
    assert result.returncode == 0, result.stderr[-3000:]
    assert [read_state(p).samples_seen for p in RunDir(out).complete_checkpoints()] == [128, 192]
    result = pretrain(out, shards, *common, "data.batch_size=64", "train.max_steps=4")
    assert "step_0000003 (step 3, epoch 1, 192 samples seen)" in result.stderr


def test_a_diverged_fine_tuning_exports_nothing(tmp_path, shards):
    out = tmp_path / "run"
    argv = [sys.executable, str(ROOT / "tools" / "finetune.py"), "--output-dir", str(out), "--data", shards,
            f"data.val={shards}", "model.img_size=16", "model.depth=1", "model.embed_dim=32", "model.num_heads=2",
            "data.batch_size=16", "data.num_workers=0", "train.trackers=[]", "optim.lr=1e25", "optim.epochs=2",
            "optim.warmup_epochs=0", "train.log_every=100"]  # the first loss check comes after the evaluation
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "NaN or infinite" in result.stderr
    assert not any(out.glob("*.safetensors"))


@pytest.mark.parametrize("in_memory", ["true", "false"])
def test_labels_beyond_the_model_in_shards_without_an_index_are_skipped_and_counted(tmp_path, in_memory):
    write_shards(synthetic_samples(64, img_size=16, num_classes=8), tmp_path / "shards", samples_per_shard=32,
                 progress=False)
    (tmp_path / "shards" / "shard-index.json").unlink()  # hand-made shards: no class count anywhere
    argv = [sys.executable, str(ROOT / "tools" / "finetune.py"), "--output-dir", str(tmp_path / "run"), "--data",
            str(tmp_path / "shards"), "--num-classes", "6", "model.img_size=16", "model.depth=1",
            "model.embed_dim=32", "model.num_heads=2", "data.batch_size=8", "data.num_workers=0",
            "train.trackers=[]", "optim.epochs=1", "optim.warmup_epochs=0", "train.log_every=1",
            f"data.in_memory={in_memory}", "augment.randaug_num_ops=0", "augment.reprob=0"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "label 6 is not a class" in result.stderr  # labels 6 and 7: a quarter of the samples
    skipped = read_state(RunDir(tmp_path / "run").latest()).skipped_samples
    if in_memory == "true":  # left out once, when the set is loaded
        assert "16 of the 64 samples were unreadable" in result.stderr and skipped == 0
    else:  # counted as they pass, once: the epoch reads its share again to fill the planned steps
        assert skipped == 16


def test_an_onnx_output_that_is_a_folder_is_refused_and_nothing_lands_beside_it(tmp_path):
    from mae_vit.errors import UserError
    from mae_vit.export.onnx import export_onnx
    from mae_vit.models import create_model

    (tmp_path / "out.onnx").mkdir()
    with pytest.raises(UserError, match="is a folder"):
        export_onnx(create_model("vit_tiny_patch4", img_size=16, depth=1, num_classes=3), tmp_path / "out.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"] and not any((tmp_path / "out.onnx").iterdir())


def test_an_overwrite_with_a_min_lr_above_the_peak_is_refused_before_anything_is_deleted(tmp_path, shards):
    out = tmp_path / "run"
    first = pretrain(out, shards, "train.max_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    again = pretrain(out, shards, "train.max_steps=2", "train.resume=false", "train.overwrite=true", "optim.min_lr=1")
    assert again.returncode == 2 and "optim.min_lr (1) is above the peak lr" in again.stderr
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
