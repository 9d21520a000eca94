"""The Fashion-MNIST chain end to end on tiny hand-made idx files: every stage runs its real tool."""

import gzip
import json
import struct
import tarfile

import numpy as np
import pytest
from conftest import tool

from mae_vit.apps import chain
from mae_vit.data import expand_urls, read_index
from mae_vit.data.holdout import holdout_indices

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
    report = chain.run_chain("tiny", out, tmp_path / "shards", source=f"fashion-mnist:{idx}", val_samples=40)
    results = json.loads((out / "results.json").read_text())
    top1 = {r["what"]: r["top1"] for r in results["rows"]}
    assert all(v is not None and 0 <= v <= 100 for v in top1.values()), top1
    assert top1["logistic regression on raw pixels"] == 100.0  # the bright band gives the class away
    assert set(json.loads((out / "wall_time.json").read_text())) == {
        "pretrain", "evaluate", "linprobe", "finetune_mae", "finetune_scratch"}
    assert "--checkpoint" not in results["commands"]["finetune_scratch"]
    assert f"--checkpoint {out / 'pretrain'}" in results["commands"]["finetune_mae"]
    assert (out / "finetune_top1.png").is_file() and "| fine-tuned from the MAE weights |" in report.read_text()
    assert results["splits"] == {"train": 160, "val": 40, "test": 80, "seed": 0, "source": 200}
    for name in ("linprobe", "finetune_mae", "finetune_scratch"):  # test once, with the weights chosen on held-out val
        test = json.loads((out / name / "metrics.json").read_text())["test"]
        assert test["n"] == 80 and test["chosen_by"].startswith("val top-1 at epoch"), name
    rows = {r["what"]: r for r in results["rows"]}
    assert rows["fine-tuned from the MAE weights"]["split"].startswith("test, chosen on held-out val (epoch ")
    assert "held-out val = 40 of the 200 training images (seed 0)" in report.read_text()
    lineage = (out / "runs" / "report.md").read_text()  # tools/report.py's report of the stage runs
    parent_hash = json.loads((out / "finetune_mae" / "lineage.json").read_text())["parent"]["sha256"]
    assert parent_hash[:12] in lineage and "finetune_scratch" in lineage
    before = (out / "pretrain" / "metrics.json").stat().st_mtime_ns
    chain.run_chain("tiny", out, tmp_path / "shards", source=f"fashion-mnist:{idx}", val_samples=40)  # all done
    assert (out / "pretrain" / "metrics.json").stat().st_mtime_ns == before


def fake_fashion_mnist(tmp_path, train=200, test=80):
    idx = tmp_path / "idx"
    idx.mkdir(exist_ok=True)
    write_idx(idx, "train", train, 0)
    write_idx(idx, "t10k", test, 1)
    return f"fashion-mnist:{idx}"


def keys(spec):
    """The sample keys of the shards of `spec` (the position of each image in the idx file)."""
    found = set()
    for url in expand_urls(spec):
        with tarfile.open(url) as tar:
            found |= {name.split(".")[0] for name in tar.getnames()}
    return found


def test_holdout_indices_split_every_position_once_fixed_by_the_seed():
    fit, val = holdout_indices(10, 3, seed=0)
    assert len(val) == 3 and len(fit) == 7 and sorted([*fit, *val]) == list(range(10))
    assert list(fit) == sorted(fit) and list(val) == sorted(val)  # file order: keys ascend
    again_fit, again_val = holdout_indices(10, 3, seed=0)
    assert list(again_val) == list(val) and list(again_fit) == list(fit)
    assert any(list(holdout_indices(10, 3, seed=s)[1]) != list(val) for s in (1, 2, 3))
    subset, same_val = holdout_indices(10, 3, seed=0, keep=4)  # a training subset leaves the held-out part as it was
    assert list(same_val) == list(val) and len(subset) == 4 and set(subset) <= set(fit)


def test_the_chain_holds_out_a_validation_split_from_the_training_file_fixed_by_seed(tmp_path):
    source = fake_fashion_mnist(tmp_path)
    urls = chain.ensure_fashion_mnist_shards(tmp_path / "a", source, val_samples=50, seed=0)
    train, val, test = keys(urls["train"]), keys(urls["val"]), keys(urls["test"])
    assert (len(train), len(val), len(test)) == (150, 50, 80)
    assert not train & val and train | val == {f"{i:08d}" for i in range(200)}  # disjoint, together the whole file
    assert read_index(urls["val"])["num_samples"] == 50 and read_index(urls["train"])["num_classes"] == 10
    assert keys(chain.ensure_fashion_mnist_shards(tmp_path / "b", source, val_samples=50, seed=0)["val"]) == val
    assert keys(chain.ensure_fashion_mnist_shards(tmp_path / "b", source, val_samples=50, seed=1)["val"]) != val
    small = chain.ensure_fashion_mnist_shards(tmp_path / "a", source, val_samples=50, train_samples=40, seed=0)
    assert keys(small["val"]) == val and len(keys(small["train"])) == 40 and keys(small["train"]) <= train


@pytest.mark.parametrize("bad", [dict(val_samples=200), dict(val_samples=50, train_samples=151)])
def test_a_held_out_split_or_subset_larger_than_the_file_is_refused(tmp_path, bad):
    from mae_vit.errors import ConfigError

    with pytest.raises(ConfigError, match="200 training images"):
        chain.ensure_fashion_mnist_shards(tmp_path / "a", fake_fashion_mnist(tmp_path), **bad)
    assert not (tmp_path / "a").exists()  # refused before anything is written


def test_the_plan_chooses_on_the_held_out_split_and_gives_the_test_split_only_as_data_test(tmp_path):
    urls = {"train": "/d/fit/shard-{000000..000054}.tar", "val": "/d/val/shard-{000000..000004}.tar",
            "test": "/d/test/shard-{000000..000009}.tar"}
    stages = {s.name: s for s in chain.plan("cpu", tmp_path, urls)}
    for name in ("pretrain", "linprobe", "finetune_mae", "finetune_scratch"):
        args = stages[name].args
        assert args[args.index("--data") + 1] == urls["train"], name
        assert f"data.val={urls['val']}" in args and f"data.val={urls['test']}" not in args, name
    for name in ("linprobe", "finetune_mae", "finetune_scratch"):  # evaluated once, with the weights chosen on val
        assert f"data.test={urls['test']}" in stages[name].args, name
    assert not any(a.startswith("data.test=") for a in stages["pretrain"].args)
    # the frozen encoder's kNN / few-shot choose nothing: bank = the training part, queries = the test split
    args = stages["evaluate"].args
    assert args[args.index("--data") + 1] == urls["train"] and f"data.val={urls['test']}" in args


def test_the_small_preset_runs_the_small_data_recipes_with_fashion_mnists_data_keys(tmp_path):
    from mae_vit.config import FinetuneConfig, PretrainConfig, parse_config

    urls = {"train": "/d/fit-5000/shard-{000000..000004}.tar", "val": "/d/val/shard-{000000..000004}.tar",
            "test": "/d/test/shard-{000000..000009}.tar"}
    stages = {s.name: s for s in chain.plan("small", tmp_path, urls)}
    for name, schema in (("pretrain", PretrainConfig), ("finetune_scratch", FinetuneConfig)):
        args = stages[name].args
        assert args[args.index("--config") + 1].endswith(f"{name.split('_')[0]}/small_data.yaml"), name
        cfg = parse_config(schema, [a for a in args if a != "--output-dir" and a != str(tmp_path / name)])
        assert (cfg.model.img_size, cfg.model.in_chans, list(cfg.data.mean)) == (28, 1, [0.286]), name
        assert (cfg.model.embed_dim, cfg.model.depth) == (128, 6), name
    linprobe = stages["linprobe"].args
    assert linprobe[linprobe.index("--config") + 1].endswith("linprobe/fashion_mnist.yaml")


def test_the_gpu_preset_parses_for_each_tool_and_fits_both_training_stages_to_a_time_budget(tmp_path):
    from mae_vit.config import FinetuneConfig, LinprobeConfig, PretrainConfig, parse_config

    urls = {"train": "/d/fit/shard-{000000..000054}.tar", "val": "/d/val/shard-{000000..000004}.tar",
            "test": "/d/test/shard-{000000..000009}.tar"}
    stages = {s.name: s for s in chain.plan("gpu", tmp_path, urls)}
    schemas = {"pretrain": PretrainConfig, "linprobe": LinprobeConfig, "finetune_mae": FinetuneConfig,
               "finetune_scratch": FinetuneConfig}
    cfgs = {name: parse_config(schema, stages[name].args[:-2]) for name, schema in schemas.items()}  # no --output-dir
    assert (cfgs["pretrain"].optim.time_budget, cfgs["finetune_mae"].optim.time_budget) == ("3m", "75s")
    assert cfgs["finetune_scratch"].optim == cfgs["finetune_mae"].optim  # the comparison is at the same budget
    for name in ("finetune_mae", "finetune_scratch"):  # augmented on the GPU: crop, flip, nothing the loader does
        cfg = cfgs[name]
        assert cfg.data.in_memory and (cfg.augment.randaug_num_ops, cfg.augment.reprob) == (0, 0), name
    assert cfgs["linprobe"].model.global_pool and cfgs["linprobe"].feature_cache


def test_a_chain_folder_whose_finished_stages_ran_other_commands_is_refused(tmp_path):
    from mae_vit.errors import ConfigError

    urls = {"train": "/d/fit/shard-000000.tar", "val": "/d/val/shard-000000.tar", "test": "/d/test/shard-000000.tar"}
    out = tmp_path / "chain"
    stages = chain.plan("cpu", out, urls)
    (out / "finetune_mae").mkdir(parents=True)
    (out / "finetune_mae" / "metrics.json").write_text("{}")  # finished by an earlier chain (no chain.json)
    with pytest.raises(ConfigError, match=r"finetune_mae.*an earlier chain made it, which chose on the test split"):
        chain.check_same_plan(out, stages, urls)
    assert not (out / "chain.json").exists()
    (out / "finetune_mae" / "metrics.json").unlink()
    chain.check_same_plan(out, stages, urls)  # nothing finished: this plan is recorded
    (out / "finetune_mae" / "metrics.json").write_text("{}")
    chain.check_same_plan(out, stages, urls)  # the same commands: continues
    other = {**urls, "val": "/d/other-val/shard-000000.tar"}
    with pytest.raises(ConfigError, match=r"\(finetune_mae\) .* other commands"):
        chain.check_same_plan(out, chain.plan("cpu", out, other), other)


@pytest.mark.slow
def test_shards_only_writes_the_held_out_split_and_the_test_shards_and_runs_no_stage(tmp_path):

    source, data = fake_fashion_mnist(tmp_path), tmp_path / "shards"
    done = tool("fashion_mnist.py", "shards_only=true", f"source={source}", "--data-dir", str(data),
                "--val-samples", "50", "--output-dir", str(tmp_path / "runs"))
    assert done.returncode == 0, done.stderr
    printed = dict(line.split(": ", 1) for line in done.stdout.strip().splitlines())
    assert sorted(printed) == ["test", "train", "val"]
    assert [read_index(printed[s])["num_samples"] for s in ("train", "val", "test")] == [150, 50, 80]
    assert not (tmp_path / "runs").exists()  # no stage ran
