"""Lineage and the run report: the report names the real parent checkpoint by its sha256."""

import hashlib
import json

import pytest
from conftest import tool

from mae_vit.data import ensure_demo_shards

SIZE = ["model.img_size=16", "model.embed_dim=48", "model.depth=2", "model.num_heads=3", "data.batch_size=16",
        "data.num_workers=0", "optim.epochs=1", "optim.warmup_epochs=0", "train.log_every=2"]


@pytest.mark.slow
def test_lineage_follows_pretrain_to_finetune_and_the_report_names_the_parent_hash(tmp_path):
    train, val = ensure_demo_shards(tmp_path / "cache", num_samples=64)
    pre, fin = tmp_path / "pretrain", tmp_path / "finetune"
    tool("pretrain.py", "--output-dir", str(pre), "--data", train, f"data.val={val}", *SIZE,
         "model.decoder_embed_dim=32", "model.decoder_depth=1", "model.decoder_num_heads=2", "knn.vs_random=false")
    tool("finetune.py", "--output-dir", str(fin), "--data", train, f"data.val={val}", *SIZE, "--checkpoint", str(pre))
    parent_hash = hashlib.sha256((pre / "model.safetensors").read_bytes()).hexdigest()

    first, second = (json.loads((run / "lineage.json").read_text()) for run in (pre, fin))
    assert first["task"] == "pretrain" and first["parent"] is None and first["data"]["train"]["index_sha256"]
    assert first["changes"]["optim.epochs"] == 1 and first["versions"]["torch"]
    assert second["parent"] == {"path": str(pre / "model.safetensors"), "sha256": parent_hash, "run": str(pre)}

    out = tmp_path / "report"
    tool("report.py", str(pre), str(fin), "--output-dir", str(out))
    report = (out / "report.md").read_text()
    assert f"`{fin}` (finetune) <- `{pre / 'model.safetensors'}` (sha256 `{parent_hash}`)" in report
    assert f"`{pre}` (pretrain, from scratch)" in report
    assert sorted(p.name for p in out.glob("*.png")) == ["00_pretrain_curves.png", "01_finetune_curves.png"]


@pytest.mark.slow
def test_the_report_says_when_a_parent_checkpoint_changed_and_shows_a_resumed_runs_own_changes(tmp_path):
    train, val = ensure_demo_shards(tmp_path / "cache", num_samples=64)
    pre, fin = tmp_path / "pretrain", tmp_path / "finetune"
    pretrain = ["pretrain.py", "--output-dir", str(pre), "--data", train, f"data.val={val}",
                *SIZE, "knn.vs_random=false", "model.decoder_embed_dim=32", "model.decoder_depth=1",
                "model.decoder_num_heads=2"]
    tool(*pretrain)
    tool("finetune.py", "--output-dir", str(fin), "--data", train, f"data.val={val}", *SIZE, "--checkpoint", str(pre),
         "train.max_steps=2")
    recorded = hashlib.sha256((pre / "model.safetensors").read_bytes()).hexdigest()
    tool(*pretrain, "optim.epochs=2")  # the parent run goes on: its weights file is replaced
    now = hashlib.sha256((pre / "model.safetensors").read_bytes()).hexdigest()
    assert now != recorded

    out = tmp_path / "report"
    tool("report.py", str(pre), str(fin), "--output-dir", str(out))
    report = (out / "report.md").read_text()
    assert (f"`{fin}` (finetune) <- `{pre / 'model.safetensors'}` (sha256 `{recorded}`; changed since: the file's "
            f"sha256 is now `{now}`") in report
    record = json.loads((pre / "lineage.json").read_text())
    assert record["changes"]["optim.epochs"] == 2 and record["resumes"][-1]["changed"] == {"optim.epochs": [1, 2]}
    changes = next(line for line in report.splitlines() if line.startswith("Changed from the tool's defaults"))
    assert "`optim.epochs=2`" in changes and "`optim.epochs=1`" not in changes
    resumed = next(line for line in report.splitlines() if line.startswith("Resumed"))
    assert resumed.startswith("Resumed 1 time; the last resume (from step 4, ") and resumed.endswith(
        ") changed `optim.epochs` 1 -> 2.")
