"""Fault injection: pretraining killed at 20 moments (optimizer steps, renames, deletes inside checkpoint saving
and pruning) and re-run each time. Every trial must end at the planned step with readable weights, and a kill
must never lose the newest complete checkpoint."""

import os
import random
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mae_vit.checkpoint import load_weights
from mae_vit.config import PretrainConfig, parse_config
from mae_vit.data import ensure_demo_shards
from mae_vit.train.build import build_model
from mae_vit.train.rundir import RunDir, read_state

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.img_size=16", "model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.decoder_embed_dim=32",
        "model.decoder_depth=1", "model.decoder_num_heads=2", "data.batch_size=16", "data.num_workers=0",
        "optim.epochs=2", "train.save_every=2", "train.keep_last=2", "train.vis_every=4", "knn.vs_random=false"]
PLANNED = 8  # 64 samples / 16 = 4 steps per epoch, 2 epochs
TRIALS = random.Random(0).sample(range(1, 70), 20)  # the K-th risky event kills the run (a full run has about 60)
KILL_DRIVER = """'''Run pretraining and kill the process (os._exit) at the K-th risky event: an optimizer step, a
rename, a delete.'''
import os, shutil, sys
import torch

K = int(sys.argv[1])
count = [0]

def killing(fn):
    def wrapper(*args, **kwargs):
        count[0] += 1
        if count[0] == K:
            os._exit(9)
        return fn(*args, **kwargs)
    return wrapper

os.replace = killing(os.replace)
os.unlink = killing(os.unlink)
shutil.rmtree = killing(shutil.rmtree)
torch.optim.AdamW.step = killing(torch.optim.AdamW.step)
from mae_vit.train import rundir
real_save = rundir.save_checkpoint
def save_and_say(*a, **kw):
    path = real_save(*a, **kw)
    print(f"SAVED {path.name}", flush=True)
    return path
rundir.save_checkpoint = save_and_say
import mae_vit.train.loop as loop
loop.save_checkpoint = save_and_say
from mae_vit.config.cli import run_tool
from mae_vit.config import PretrainConfig, parse_config
from mae_vit.tasks.pretrain import pretrain
run_tool(lambda argv: pretrain(parse_config(PretrainConfig, argv)), sys.argv[2:])
print("EVENTS", count[0], flush=True)
"""


def run(cmd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def trial(k, out, urls):
    argv = ["--output-dir", str(out), "--data", urls, *TINY]
    driver = out.parent / "kill_driver.py"
    killed = run([sys.executable, str(driver), str(k), *argv])
    assert killed.returncode in (9, 0), killed.stderr[-2000:]
    saved = re.findall(r"SAVED step_(\d+)", killed.stdout)
    run_dir = RunDir(out)
    run_dir.recover()  # what the next start does first
    newest = run_dir.latest()
    if saved:  # the newest checkpoint that was complete before the kill is still there (or a newer one)
        assert newest is not None and read_state(newest).step >= int(saved[-1]), (k, saved, newest)
    again = run([sys.executable, str(ROOT / "tools" / "pretrain.py"), *argv])
    assert again.returncode == 0, (k, again.stderr[-2000:])
    assert read_state(run_dir.latest()).step == PLANNED
    return k


@pytest.mark.slow
def test_pretraining_killed_at_20_moments_always_finishes_and_never_loses_a_checkpoint(tmp_path):
    urls, _ = ensure_demo_shards(tmp_path / "cache", num_samples=64)
    (tmp_path / "kill_driver.py").write_text(KILL_DRIVER)
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = list(pool.map(lambda k: trial(k, tmp_path / f"run_{k}", urls), TRIALS))
    assert sorted(done) == sorted(TRIALS)
    cfg = parse_config(PretrainConfig, ["--output-dir", str(tmp_path / "x"), *TINY])
    for k in TRIALS:
        assert not load_weights(build_model(cfg.model, mae=True), tmp_path / f"run_{k}" / "model.safetensors",
                                strict=True).missing
