"""Several processes and nodes (gloo on CPU): one time budget, per-rank random streams, one resume decision,
the collective timeout, and a two-node run under torchrun that is stopped, resumed and ends with equal weights."""

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

from mae_vit.data import ensure_demo_shards
from mae_vit.train.rundir import RunDir, read_state

ROOT = Path(__file__).resolve().parent.parent
DRIVER = str(ROOT / "tests" / "mp_driver.py")
TINY = ["model.img_size=16", "model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.decoder_embed_dim=32",
        "model.decoder_depth=1", "model.decoder_num_heads=2", "data.batch_size=8", "data.num_workers=0",
        "train.vis_every=100000", "knn.vs_random=false", "online_probe=false", "train.trackers=[]"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return ensure_demo_shards(tmp_path_factory.mktemp("cache"), num_samples=64)


def child_env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(ROOT), **extra}


def start_ranks(argvs: list[list[str]], logs: Path, **extra_env) -> list[subprocess.Popen]:
    """One process per argv, joined as ranks 0..n-1 of one gloo group (what torchrun sets up, without it)."""
    port, procs = free_port(), []
    logs.mkdir(parents=True, exist_ok=True)
    for rank, argv in enumerate(argvs):
        env = child_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(len(argvs)),
                        LOCAL_WORLD_SIZE=str(len(argvs)), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **extra_env)
        out = open(logs / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, DRIVER, *argv], stdout=out, stderr=subprocess.STDOUT, env=env))
    return procs


def wait_all(procs: list[subprocess.Popen], logs: Path, timeout: float) -> list[tuple[int, str]]:
    """(exit status, output) of every process; fails the test (after killing them) if they do not all end in time."""
    deadline = time.time() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(deadline - time.time(), 1))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the processes did not finish within {timeout} s (a hang):\n" +
                    "\n".join((logs / f"rank{r}.log").read_text()[-1500:] for r in range(len(procs))))
    return [(p.returncode, (logs / f"rank{r}.log").read_text()) for r, p in enumerate(procs)]


@pytest.mark.slow
def test_processes_that_start_seconds_apart_share_one_time_budget_and_end_at_the_same_step(shards, tmp_path):
    out = tmp_path / "run"
    argv = ["--output-dir", str(out), "--data", shards[0], *TINY, "optim.epochs=100000", "optim.warmup_epochs=1",
            "optim.time_budget=40s", "train.log_every=1000", "train.save_every=100000"]
    procs = start_ranks([argv, argv], tmp_path / "logs", MP_DELAY_1="8", MP_RECORD=str(tmp_path))
    results = wait_all(procs, tmp_path / "logs", timeout=240)
    assert [rc for rc, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    steps = {out.split("ENDED AT STEP ")[1].split()[0] for _, out in results}
    budget = read_state(RunDir(out).latest()).budget
    assert steps == {str(budget["steps"])} and budget["steps"] > 22  # one total, run to its end by both
    final = [torch.load(tmp_path / f"final_{r}.pt") for r in (0, 1)]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


@pytest.mark.slow
def test_each_process_draws_its_own_masks_from_the_same_initial_weights_and_resumes_exactly(shards, tmp_path):
    # in memory: the batches' crops are seeded by (seed, epoch, rank, batch), the masks come from each process's
    # random stream, saved in its checkpoint (streamed shards' crops are not replayed bit for bit on a resume)
    common = ["--data", shards[0], *TINY, "data.in_memory=true", "optim.epochs=2", "train.log_every=1",
              "train.save_every=1"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    for name, argvs in (("straight", [[]]), ("stopped", [["train.max_steps=3"], []])):
        for extra in argvs:
            rec = tmp_path / f"rec_{name}"
            rec.mkdir(exist_ok=True)
            argv = ["--output-dir", str(tmp_path / name), *common, *extra]
            results = wait_all(start_ranks([argv, argv], tmp_path / "logs", MP_RECORD=str(rec)), tmp_path / "logs", 180)
            assert [rc for rc, _ in results] == [0, 0], results[0][1][-3000:]
    init = [torch.load(tmp_path / "rec_straight" / f"init_{r}.pt") for r in (0, 1)]
    assert all(torch.equal(init[0][k], init[1][k]) for k in init[0])  # the common seed: the same weights
    masks = [torch.load(tmp_path / "rec_straight" / f"masks_{r}.pt") for r in (0, 1)]
    assert not any(torch.equal(a, b) for a, b in zip(*masks))  # seed + rank: each process its own masks
    # 8 steps straight vs 3 steps, stop, resume to 8: the same weights on each process, bit for bit
    for r in (0, 1):
        a, b = (torch.load(tmp_path / f"rec_{n}" / f"final_{r}.pt") for n in ("straight", "stopped"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_state(RunDir(straight).latest()).step == read_state(RunDir(stopped).latest()).step == 8


@pytest.mark.slow
def test_processes_that_see_different_run_directories_all_stop_with_exit_2_and_write_nothing(shards, tmp_path):
    first = tmp_path / "node0" / "run"
    common = ["--data", shards[0], *TINY, "optim.epochs=1"]
    wait_all(start_ranks([["--output-dir", str(first), *common]] * 2, tmp_path / "logs0"), tmp_path / "logs0", 180)
    assert RunDir(first).latest() is not None  # node 0's disk holds a run to resume; node 1's disk nothing
    before = sorted(str(p) for p in (tmp_path / "node0").rglob("*"))
    argvs = [["--output-dir", str(first), *common, "optim.epochs=2"],
             ["--output-dir", str(tmp_path / "node1" / "run"), *common, "optim.epochs=2"]]
    results = wait_all(start_ranks(argvs, tmp_path / "logs"), tmp_path / "logs", 180)
    assert [rc for rc, _ in results] == [2, 2], results[0][1][-3000:] + results[1][1][-3000:]
    for _, output in results:
        assert "do not see the same run directory" in " ".join(output.split()) and "Traceback" not in output
    assert sorted(str(p) for p in (tmp_path / "node0").rglob("*")) == before  # nothing written, nothing removed
    assert not (tmp_path / "node1").exists()


@pytest.mark.slow
def test_a_collective_waits_no_longer_than_train_collective_timeout(shards, tmp_path):
    argv = ["--output-dir", str(tmp_path / "run"), "--data", shards[0], *TINY, "optim.epochs=1",
            "train.save_every=2", "train.collective_timeout=5s"]
    began = time.time()
    procs = start_ranks([argv, argv], tmp_path / "logs", MP_SLEEP_IN_SAVE_1="90")
    procs[0].wait(timeout=80)  # rank 1 sleeps 90 s before its checkpoint: rank 0 gives up after 5 s, not 30 min
    elapsed = time.time() - began
    procs[1].kill()
    output = (tmp_path / "logs" / "rank0.log").read_text()
    assert procs[0].returncode != 0 and elapsed < 80
    assert "timed out" in output.lower() or "timeout" in output.lower(), output[-3000:]
    assert "unknown" not in output.lower()


def torchrun_node(node: int, argv: list[str], port: int, home: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2", "--node_rank",
           str(node), "--master_addr", "127.0.0.1", "--master_port", str(port), DRIVER, *argv]
    home.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=child_env(HOME=str(home)),
                            start_new_session=True)


@pytest.mark.slow
def test_two_nodes_under_torchrun_stop_together_resume_and_end_with_the_same_weights(tmp_path):
    out, rec = tmp_path / "shared" / "run", tmp_path / "rec"
    rec.mkdir()
    argv = ["--output-dir", str(out), *TINY, "data.synthetic_samples=64", "optim.epochs=100000",
            "optim.warmup_epochs=1", "optim.time_budget=30s", "train.save_every=4", "train.log_every=1000"]
    os.environ["MP_RECORD"] = str(rec)  # read by the driver in every process
    nodes = []
    try:
        port = free_port()
        nodes = [torchrun_node(n, argv, port, tmp_path / f"home{n}", tmp_path / f"node{n}.log") for n in (0, 1)]
        deadline = time.time() + 120
        while RunDir(out).latest() is None and time.time() < deadline and nodes[0].poll() is None:
            time.sleep(0.2)
        assert RunDir(out).latest() is not None, (tmp_path / "node0.log").read_text()[-3000:]
        nodes[1].send_signal(signal.SIGTERM)  # node 1 is pre-empted: its launcher passes SIGTERM to its workers
        for node in nodes:
            node.wait(timeout=90)  # all four stop (none hangs) after a checkpoint
        stopped = json.loads((out / "stopped.json").read_text())  # written by the main process, on node 0
        assert stopped["step"] == read_state(RunDir(out).latest()).step
        assert stopped["reason"] == "a stop signal on another process"
        port = free_port()
        nodes = [torchrun_node(n, argv, port, tmp_path / f"home{n}", tmp_path / f"again{n}.log") for n in (0, 1)]
        for n, node in enumerate(nodes):
            assert node.wait(timeout=150) == 0, (tmp_path / f"again{n}.log").read_text()[-3000:]
    finally:
        os.environ.pop("MP_RECORD")
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    logs = (tmp_path / "again0.log").read_text() + (tmp_path / "again1.log").read_text()
    state = read_state(RunDir(out).latest())
    assert "resuming from" in logs and not (out / "stopped.json").exists()
    assert sorted(logs.count(f"RANK {r} ENDED AT STEP {state.step}") for r in range(4)) == [1, 1, 1, 1]
    assert state.step == state.budget["steps"]
    final = [torch.load(rec / f"final_{r}.pt") for r in range(4)]
    assert all(torch.equal(final[0][k], f[k]) for f in final[1:] for k in final[0])
