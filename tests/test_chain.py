"""The Fashion-MNIST chain end to end on tiny hand-made idx files: every stage runs its real tool."""

import gzip
import json
import struct

import numpy as np
import pytest

from mae_vit.apps import chain

TINY_MODEL = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=7"]
TINY = {
    "pretrain": [*TINY_MODEL, "model.decoder_embed_dim=32", "model.decoder_depth=1", "model.decoder_num_heads=2",
                 "data.batch_size=40", "data.num_workers=0", "optim.epochs=2", "optim.warmup_epochs=0",
                 "train.mixed_precision=no", "train.log_every=2"],
    "finetune": [*TINY_MODEL, "data.batch_size=40", "data.num_workers=0", "optim.epochs=2", "optim.warmup_epochs=0",
                 "augment.mixup=0", "augment.cutmix=0", "augment.randaug_num_ops=0", "augment.reprob=0",
                 "model.drop_path_rate=0", "train.mixed_precision=no", "train.log_every=2"],
    "linprobe": [*TINY_MODEL, "feature_cache=true", "data.batch_size=40", "data.num_workers=0", "optim.epochs=3",
                 "optim.warmup_epochs=0", "train.mixed_precision=no", "train.log_every=2"],
}


def write_idx(folder, stem, n, seed):
    """n 28x28 grey images whose class (0..9) is the row band that is bright, in idx files as Fashion-MNIST has."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    images = rng.integers(0, 60, (n, 28, 28), dtype=np.uint8)
    for i, y in enumerate(labels):
        images[i, 2 + 2 * y: 5 + 2 * y] += 180
    for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
        header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
        (folder / f"{stem}-{kind}-ubyte.gz").write_bytes(gzip.compress(header + array.tobytes()))


@pytest.mark.slow
def test_the_chain_runs_every_stage_writes_the_report_and_a_rerun_skips_finished_stages(tmp_path, monkeypatch):
    idx = tmp_path / "idx"
    idx.mkdir()
    write_idx(idx, "train", 200, 0)
    write_idx(idx, "t10k", 80, 1)
    monkeypatch.setitem(chain.PRESETS, "tiny", TINY)
    out = tmp_path / "chain"
    report = chain.run_chain("tiny", out, tmp_path / "shards", source=f"fashion-mnist:{idx}")
    results = json.loads((out / "results.json").read_text())
    top1 = {r["what"]: r["top1"] for r in results["rows"]}
    assert all(v is not None and 0 <= v <= 100 for v in top1.values()), top1
    assert top1["logistic regression on raw pixels"] == 100.0  # the bright band gives the class away
    assert set(json.loads((out / "wall_time.json").read_text())) == {
        "pretrain", "evaluate", "linprobe", "finetune_mae", "finetune_scratch"}
    assert "--checkpoint" not in results["commands"]["finetune_scratch"]
    assert f"--checkpoint {out / 'pretrain'}" in results["commands"]["finetune_mae"]
    assert (out / "finetune_top1.png").is_file() and "| fine-tuned from the MAE weights |" in report.read_text()
    lineage = (out / "runs" / "report.md").read_text()  # tools/report.py's report of the stage runs
    parent_hash = json.loads((out / "finetune_mae" / "lineage.json").read_text())["parent"]["sha256"]
    assert parent_hash[:12] in lineage and "finetune_scratch" in lineage
    before = (out / "pretrain" / "metrics.json").stat().st_mtime_ns
    chain.run_chain("tiny", out, tmp_path / "shards", source=f"fashion-mnist:{idx}")  # nothing left to do
    assert (out / "pretrain" / "metrics.json").stat().st_mtime_ns == before
