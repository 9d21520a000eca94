"""The checkpoint sweep scores every kept checkpoint and exports the one with the best kNN top-1."""

import json

import pytest
import torch
from conftest import tool
from safetensors.torch import load_file

from mae_vit.checkpoint import read_file, to_state_dict
from mae_vit.data import ensure_demo_shards

TINY = ["model.img_size=16", "model.embed_dim=48", "model.depth=2", "model.num_heads=3", "model.decoder_embed_dim=32",
        "model.decoder_depth=1", "model.decoder_num_heads=2", "data.batch_size=16", "data.num_workers=0",
        "optim.warmup_epochs=0", "train.vis_every=1000", "knn.vs_random=false"]


@pytest.mark.slow
def test_the_sweep_scores_every_kept_checkpoint_and_exports_the_best_one(tmp_path):
    train, val = ensure_demo_shards(tmp_path / "cache", num_samples=128)
    run = tmp_path / "run"
    tool("pretrain.py", "--output-dir", str(run), "--data", train, f"data.val={val}", *TINY, "optim.epochs=3",
         "train.save_every=8", "train.keep_last=5")
    tool("sweep.py", "--run", str(run), "fewshot.shots=[2]")
    result = json.loads((run / "sweep.json").read_text())
    assert [p["step"] for p in result["points"]] == [8, 16, 24, 24]  # three checkpoints and the exported weights
    assert all(0 <= p["knn"] <= 100 and p["fewshot"] is not None for p in result["points"])
    assert result["data"] == {"train": train, "val": val}  # the run's own shards
    best = max(result["points"], key=lambda p: (p["knn"], p["step"]))
    assert result["best"] == best
    exported = load_file(str(run / "best_encoder.safetensors"))
    chosen = to_state_dict(read_file(best["weights"]))  # the online probe's head and the "mae." prefix are dropped
    assert not any(k.startswith(("mae.", "head.")) for k in chosen)
    assert exported.keys() == chosen.keys() and all(torch.equal(exported[k], chosen[k]) for k in exported)
    assert (run / "sweep.png").stat().st_size > 1000
