"""tools/evaluate.py and mae_vit.apps.evaluate: exact top-1 of a hand-set head, kNN / few-shot, the model from the
run's config.yaml, errors (missing head, MAE with top1, bad path, foreign metrics.json), two processes."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port

from mae_vit.apps.evaluate import features_in_key_order, key_id
from mae_vit.checkpoint import export_safetensors, load_weights
from mae_vit.config import EvaluateConfig, FinetuneConfig, LinprobeConfig, PretrainConfig, parse_config, save_config
from mae_vit.config.cli import run_tool
from mae_vit.data import ensure_demo_shards, eval_transform, make_loader
from mae_vit.eval import knn_accuracy
from mae_vit.models import create_model
from mae_vit.train.build import build_model
from mae_vit.train.run_config import find_run_config, model_config_from_run, user_set_keys

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "evaluate.py"
BIAS = torch.arange(10, 0, -1).float()  # logits of the hand-set head: class 0 first, then 1, 2, ...
# a 2-block, 32-wide ViT on 4 px patches
SMALL = ["model.img_size=16", "model.patch_size=4", "model.embed_dim=32", "model.depth=2", "model.num_heads=2"]
MAE_SMALL = [*SMALL, "model.decoder_embed_dim=16", "model.decoder_depth=1", "model.decoder_num_heads=2"]


def load_tool(path: Path):
    spec = importlib.util.spec_from_file_location(f"tool_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


evaluate_tool = load_tool(TOOL)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The folder holding the 64-sample demo shards (what the tool uses without --data)."""
    folder = tmp_path_factory.mktemp("cache")
    ensure_demo_shards(folder, num_samples=64)
    return folder


@pytest.fixture(scope="module")
def shards(cache):
    return ensure_demo_shards(cache, num_samples=64)  # (train, val) brace specs: 64 and 16 samples


def data_args(cache):
    return [f"data.cache_dir={cache}", "data.synthetic_samples=64", "data.num_workers=0", "data.batch_size=8"]


def labels_of(urls):
    loader = make_loader(urls, batch_size=100, shuffle=False, drop_last=False, transform=None)
    return torch.cat([b["label"] for b in loader])


def make_run(folder: Path, schema, args, *, num_classes=None, probe_bn=False, hand_set_head=False) -> Path:
    """A run directory as the training tools leave it: config.yaml + model.safetensors of the model it describes."""
    cfg = parse_config(schema, args)
    if cfg.data.mean is None:  # a training run saves the numbers it used (here ImageNet's, as eval_transform's default)
        cfg.data.mean, cfg.data.std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    save_config(cfg, folder / "config.yaml")
    mae = cfg.model.name.startswith("mae_")
    torch.manual_seed(0)
    extra = {} if mae else {"num_classes": num_classes or cfg.model.num_classes, "probe_bn": probe_bn}
    model = build_model(cfg.model, mae=mae, **extra)
    if hand_set_head:
        linear = model.head[1] if probe_bn else model.head
        with torch.no_grad():
            linear.weight.zero_()
            linear.bias.copy_(BIAS)  # every image gets these logits: prediction class 0, top-5 = classes 0..4
    export_safetensors(model, folder / "model.safetensors")
    return folder


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("pretrain"), PretrainConfig, MAE_SMALL)


def finetune_run(folder: Path) -> Path:
    return make_run(folder, FinetuneConfig, [*SMALL, "model.num_classes=10"], hand_set_head=True)


def run(argv):
    return run_tool(evaluate_tool.main, [str(a) for a in argv])


def run_fails(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        run(argv)
    assert exc.value.code == 2
    return " ".join(capsys.readouterr().err.split())


# ---------------------------------------------------------------- top-1 with a known answer


@pytest.mark.parametrize("probe_bn", [False, True], ids=["finetune", "linprobe"])
def test_top1_of_a_hand_set_head_is_exact(tmp_path, cache, shards, probe_bn):
    if probe_bn:  # a linear-probe run: BatchNorm head (head.0 / head.1), class token, num_classes left to the weights
        run_dir = make_run(tmp_path / "run", LinprobeConfig, SMALL, num_classes=10, probe_bn=True, hand_set_head=True)
    else:
        run_dir = finetune_run(tmp_path / "run")
    out = tmp_path / "eval"
    result = run(["--checkpoint", run_dir, "--output-dir", out, "metrics=[top1]", *data_args(cache)])

    labels = labels_of(shards[1])
    assert labels.numel() == 16
    expected_loss = float((torch.logsumexp(BIAS, 0) - BIAS[labels]).mean())
    top1 = result["metrics"]["top1"]
    assert top1["n"] == 16
    assert top1["top1"] == pytest.approx(100.0 * float((labels == 0).float().mean()), abs=1e-9)
    assert top1["top5"] == pytest.approx(100.0 * float((labels < 5).float().mean()), abs=1e-9)
    assert top1["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert result["load_report"] == "all keys matched"  # probe_bn and num_classes were read off the weights
    written = json.loads((out / "metrics.json").read_text())
    assert written["tool"] == "evaluate" and written["metrics"]["top1"] == pytest.approx(top1)
    assert set(written["metrics"]) == {"top1"}


# ---------------------------------------------------------------- kNN and few-shot, model from config.yaml


def test_knn_and_fewshot_of_an_mae_run_on_the_demo_data(tmp_path, cache, shards, mae_run, capsys):
    out = tmp_path / "eval"
    result = run(["--checkpoint", mae_run, "--output-dir", out, "fewshot.shots=[1,50]", "fewshot.draws=2",
                  *data_args(cache)])
    # the model is the run's (16 px, 32 wide, decoder 16 x 1): the tool's defaults (ViT-Tiny, 512-wide decoder)
    # would not load
    assert result["model"]["img_size"] == 16 and result["model"]["embed_dim"] == 32
    assert result["model"]["decoder_embed_dim"] == 16
    assert result["load_report"] == "all keys matched"
    assert "top1" in result["skipped"] and "top1" not in result["metrics"]  # default metrics: skipped for an MAE
    assert result["data"]["num_train"] == 64 and result["data"]["num_val"] == 16
    assert result["data"]["num_classes"] == 10

    knn = result["metrics"]["knn"]
    assert 0.0 <= knn["top1"] <= 100.0 and knn["k"] == 20 and knn["temperature"] == 0.07
    # the same number from features computed here by hand: the class token after the final norm
    model = build_model(parse_config(PretrainConfig, MAE_SMALL).model, mae=True)
    load_weights(model, mae_run, verbose=False)
    model.eval()
    tf = eval_transform(16)  # ImageNet's normalisation, which make_run wrote into the run's config

    def feats(urls):
        batches = list(make_loader(urls, transform=tf, batch_size=100, shuffle=False, drop_last=False))
        with torch.no_grad():
            return (torch.cat([model.forward_features(b["image"])[:, 0] for b in batches]),
                    torch.cat([b["label"] for b in batches]))

    (tx, ty), (vx, vy) = feats(shards[0]), feats(shards[1])
    assert knn["top1"] == pytest.approx(knn_accuracy(tx, ty, vx, vy, num_classes=10, k=20, temperature=0.07))

    few = result["metrics"]["fewshot"]
    one = few["shots"]["1"]
    assert 0.0 <= one["mean"] <= 100.0 and one["std"] >= 0.0 and len(one["accs"]) == 2
    assert one["mean"] == pytest.approx(sum(one["accs"]) / 2)
    assert few["shots"]["50"]["mean"] is None and "skipped" in few["shots"]["50"]["note"]
    printed = capsys.readouterr().out
    assert "kNN top-1 (k=20, T=0.07)" in printed and "1-shot linear (2 draws)" in printed and "±" in printed
    assert json.loads((out / "metrics.json").read_text())["metrics"]["knn"]["top1"] == knn["top1"]


def test_run_config_gives_the_model_and_explicit_keys_win(tmp_path):
    run_dir = tmp_path / "run"
    save_config(parse_config(FinetuneConfig, ["model.img_size=16", "model.num_classes=7", "resolution=24",
                                              "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]",
                                              "data.crop_pct=1.0", "data.batch_size=3"]),
                run_dir / "config.yaml")
    (run_dir / "checkpoints" / "step_0000010").mkdir(parents=True)
    weights = run_dir / "checkpoints" / "step_0000010" / "model.safetensors"
    weights.write_bytes(b"")
    foreign = tmp_path / "mae_pretrain_vit_base.pth"
    foreign.write_bytes(b"")
    for path in (run_dir, run_dir / "model.safetensors", weights.parent, weights):
        assert find_run_config(path) == run_dir / "config.yaml"
    assert find_run_config(foreign) is None

    cfg = parse_config(EvaluateConfig, [])
    merged = model_config_from_run(run_dir, cfg, user_keys=user_set_keys(cfg, []))
    assert merged.model.name == "vit_tiny_patch4" and merged.model.num_classes == 7
    assert merged.model.img_size == 24  # the fine-tuning resolution
    assert list(merged.data.mean) == [0.5] * 3 and list(merged.data.std) == [0.25] * 3
    assert merged.data.crop_pct == 1.0  # the run's evaluation crop ...
    assert merged.data.batch_size == cfg.data.batch_size == 64  # ... but not its other data settings
    assert cfg.model.img_size == 32 and cfg.data.crop_pct is None  # the input config is not changed

    # explicit settings win, even one equal to the tool's default (model.img_size=32)
    argv = ["model.img_size=32", "data.std=[0.3,0.3,0.3]", "--checkpoint", "x=y"]
    cfg = parse_config(EvaluateConfig, argv)
    keys = user_set_keys(cfg, argv)
    assert {"model.img_size", "data.std", "checkpoint"} <= keys and "x" not in keys
    merged = model_config_from_run(run_dir, cfg, user_keys=keys)
    assert merged.model.img_size == 32 and list(merged.data.std) == [0.3] * 3
    assert list(merged.data.mean) == [0.5] * 3 and merged.model.name == "vit_tiny_patch4"
    assert model_config_from_run(foreign, cfg, user_keys=keys) is cfg  # a foreign file: the command line alone


def test_features_come_in_key_order_whatever_the_loading_order(shards):
    model = create_model("vit_tiny_patch4", img_size=16, num_classes=10, embed_dim=32, depth=2, num_heads=2).eval()
    fn = lambda x: model.pool(model.forward_features(x))  # noqa: E731
    tf = eval_transform(16)
    in_order = make_loader(shards[1], transform=tf, batch_size=5, shuffle=False, drop_last=False)
    shuffled = make_loader(shards[1], transform=tf, batch_size=3, shuffle=True, seed=3, drop_last=False)
    batch = next(iter(make_loader(shards[1], batch_size=100, shuffle=False, drop_last=False)))
    by_key = sorted(zip((key_id(k) for k in batch["key"]), batch["label"].tolist()))
    a_x, a_y = features_in_key_order(fn, in_order, None)
    b_x, b_y = features_in_key_order(fn, shuffled, None)
    assert a_y.tolist() == [label for _, label in by_key]
    assert torch.equal(a_y, b_y) and torch.allclose(a_x, b_x, atol=1e-5)
    assert a_y.tolist() != batch["label"].tolist()  # key order is not file order here: the sort did something


# ---------------------------------------------------------------- user errors: exit 2, nothing written


def test_classifier_without_trained_head_exits_2(tmp_path, cache, mae_run, capsys):
    out = tmp_path / "eval"
    err = run_fails(["--checkpoint", mae_run, "--output-dir", out, "model.name=vit_small_patch4", "metrics=[top1]",
                     *data_args(cache)], capsys)
    assert "this checkpoint has no trained head; run finetune or linprobe first" in err
    assert "metrics=[knn,fewshot]" in err
    assert not (out / "metrics.json").exists()


def test_top1_asked_of_an_mae_exits_2(tmp_path, cache, mae_run, capsys):
    err = run_fails(["--checkpoint", mae_run, "--output-dir", tmp_path / "eval", "metrics=[top1]",
                     *data_args(cache)], capsys)
    assert "MAE" in err and "metrics=[knn,fewshot]" in err


def test_bad_checkpoint_path_exits_2(tmp_path, cache, capsys):
    out = tmp_path / "eval"
    err = run_fails(["--checkpoint", tmp_path / "no_such_run", "--output-dir", out, *data_args(cache)], capsys)
    assert "does not exist" in err and "no_such_run" in err
    assert not (out / "metrics.json").exists()


def test_a_metrics_json_of_another_tool_is_never_replaced(tmp_path, cache, mae_run, capsys):
    out = tmp_path / "finetune_run"
    out.mkdir()
    (out / "metrics.json").write_text('{"best": {"top1": 91.5}}')
    err = run_fails(["--checkpoint", mae_run, "--output-dir", out, "metrics=[knn]", *data_args(cache)], capsys)
    assert "not written by evaluate" in err
    assert (out / "metrics.json").read_text() == '{"best": {"top1": 91.5}}'


# ---------------------------------------------------------------- two processes: every sample once, same numbers


def test_two_processes_count_every_val_sample_once(tmp_path, cache):
    run_dir = finetune_run(tmp_path / "run")
    # 16 val samples, batch 5: the ranks get uneven, partial batches; few-shot must not depend on the split
    args = ["--checkpoint", str(run_dir), *data_args(cache)[:-1], "data.batch_size=5", "fewshot.shots=[1,2]",
            "fewshot.draws=2"]
    single = run([*args, "--output-dir", tmp_path / "one"])
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    # --multi_gpu with no GPU visible starts the processes with torch's launcher; they join as gloo CPU ranks
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()),
           str(TOOL), *args, "--output-dir", str(tmp_path / "two")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["metrics"]["top1"]["n"] == 16
    assert two["metrics"]["top1"] == pytest.approx(single["metrics"]["top1"])
    assert two["metrics"]["knn"]["top1"] == pytest.approx(single["metrics"]["knn"]["top1"])
    for shots in ("1", "2"):
        assert two["metrics"]["fewshot"]["shots"][shots]["accs"] == \
            pytest.approx(single["metrics"]["fewshot"]["shots"][shots]["accs"])


def test_progress_bar_knows_the_batches_of_each_rank(shards):
    from mae_vit.apps.evaluate import rank_batches

    val = shards[1]  # 16 samples in 4 shards of 4
    assert rank_batches(val, rank=0, world_size=1, num_workers=0, batch_size=5) == 4  # 5 + 5 + 5 + 1
    assert rank_batches(val, rank=1, world_size=2, num_workers=0, batch_size=5) == 2  # 8 samples: 5 + 3
    assert rank_batches(val, rank=0, world_size=1, num_workers=2, batch_size=5) == 4  # 2 workers x (5 + 3)
    loader = make_loader(val, batch_size=5, shuffle=False, drop_last=False, transform=None, rank=1, world_size=2)
    assert len(list(loader)) == 2
