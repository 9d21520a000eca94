"""Every kind of user path is expanded (`~`, $VARS) and made absolute once, before anything reads or writes it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mae_vit.config import (
    BenchmarkConfig,
    EvaluateConfig,
    FinetuneConfig,
    MakeShardsConfig,
    PretrainConfig,
    parse_config,
)
from mae_vit.config.paths import expand_path, expand_source, expand_spec
from mae_vit.data import ensure_demo_shards

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty HOME and a separate current folder, as on a newcomer's machine."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("SCRATCH", str(tmp_path / "scratch"))
    monkeypatch.chdir(cwd)
    return home


def test_tilde_vars_and_relative_paths_become_absolute(home):
    assert expand_path("~/runs/a") == str(home / "runs/a")
    assert expand_path("$SCRATCH/x") == str(home.parent / "scratch/x")
    assert expand_path("runs/b") == str(home.parent / "cwd/runs/b")
    assert expand_path("/abs/./c/../d") == "/abs/d"


def test_shard_specs_expand_each_local_part_and_keep_braces_and_remote_parts(home):
    spec = "~/d/shard-{000000..000009}.tar::pipe:curl -s http://h/x.tar::http://h/{0..1}.tar::file:~/e.tar::rel/*.tar"
    assert expand_spec(spec).split("::") == [
        f"{home}/d/shard-{{000000..000009}}.tar",   # braces (and their `..`) kept for the reader
        "pipe:curl -s http://h/x.tar",               # remote parts are not paths
        "http://h/{0..1}.tar",
        f"{home}/e.tar",                             # file: is local
        f"{home.parent}/cwd/rel/*.tar",
    ]


def test_make_shards_sources_keep_builtin_names_and_expand_folders(home):
    assert expand_source("synthetic") == "synthetic" and expand_source("fashion-mnist") == "fashion-mnist"
    assert expand_source("fashion-mnist:~/fm") == f"fashion-mnist:{home}/fm"
    assert expand_source("~/images") == f"{home}/images"


def test_every_path_key_of_every_tool_is_resolved_by_parse_config(home):
    pre = parse_config(PretrainConfig, ["--output-dir", "~/runs/p", "--data", "~/s/{0..3}.tar",
                                        "data.val=$SCRATCH/v.tar", "data.cache_dir=~/cache"])
    assert pre.train.output_dir == f"{home}/runs/p"
    assert pre.data.train == f"{home}/s/{{0..3}}.tar" and pre.data.val == f"{home.parent}/scratch/v.tar"
    assert pre.data.cache_dir == f"{home}/cache"
    assert parse_config(PretrainConfig, []).data.cache_dir == f"{home}/.cache/mae_vit"  # the default too
    fin = parse_config(FinetuneConfig, ["--checkpoint", "~/runs/p", "--output-dir", "ft"])
    assert fin.checkpoint == f"{home}/runs/p" and fin.train.output_dir == f"{home.parent}/cwd/ft"
    assert parse_config(EvaluateConfig, ["--output-dir", "~/ev"]).output_dir == f"{home}/ev"
    shards = parse_config(MakeShardsConfig, ["--source", "~/imgs", "--output-dir", "~/data/train"])
    assert (shards.source, shards.output_dir) == (f"{home}/imgs", f"{home}/data/train")
    assert parse_config(BenchmarkConfig, ["--json", "~/b.json"]).json == f"{home}/b.json"
    assert parse_config(FinetuneConfig, []).checkpoint is None  # unset paths stay unset


def test_a_config_file_given_with_tilde_is_read(home):
    (home / "my.yaml").write_text("optim:\n  epochs: 3\n")
    assert parse_config(PretrainConfig, ["--config", "~/my.yaml"]).optim.epochs == 3


def test_demo_cache_with_tilde_lands_in_home_and_no_tilde_folder_appears(home):
    train, val = ensure_demo_shards("~/cache", num_samples=16)
    assert train.startswith(f"{home}/cache/") and val.startswith(f"{home}/cache/")
    assert not (Path.cwd() / "~").exists()
    assert len(list((home / "cache").glob("synthetic-*/train/*.tar"))) == 8


@pytest.mark.slow
def test_the_default_pretraining_starts_with_an_empty_home(tmp_path):
    """The README's main command, shortened to 2 steps, from the repository root with a fresh HOME."""
    home = tmp_path / "home"
    home.mkdir()
    out = tmp_path / "run"
    env = {**os.environ, "HOME": str(home), "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "tools/pretrain.py", "--output-dir", str(out), "train.max_steps=2",
                           "knn.vs_random=false"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert list((home / ".cache/mae_vit").glob("synthetic-*/train/shard-000000.tar"))
    assert (out / "model.safetensors").is_file() and not (ROOT / "~").exists()
    saved = (out / "config.yaml").read_text()
    assert f"output_dir: {out}\n" in saved and f"cache_dir: {home}/.cache/mae_vit\n" in saved  # resolved paths
