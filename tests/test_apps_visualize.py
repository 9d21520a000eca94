"""tools/visualize.py and mae_vit.apps.visualize: every promised file for an MAE and a classifier run, the model
from the run's config.yaml, the images picked by the seed, bad checkpoints -> exit 2."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from mae_vit.apps.visualize import sample_images
from mae_vit.checkpoint import export_safetensors
from mae_vit.config import LinprobeConfig, PretrainConfig, parse_config, save_config
from mae_vit.config.cli import run_tool
from mae_vit.data import ensure_demo_shards
from mae_vit.models import create_model
from mae_vit.train.build import build_model

TOOL = Path(__file__).resolve().parent.parent / "tools" / "visualize.py"
# a 2-block, 32-wide ViT on 4 px patches
SMALL = ["model.img_size=16", "model.patch_size=4", "model.embed_dim=32", "model.depth=2", "model.num_heads=2"]
DECODER = ["model.decoder_embed_dim=16", "model.decoder_depth=1", "model.decoder_num_heads=2"]
FIGURES = ["patch_embedding.png", "position_similarity.png", "attention_distance.png", "cls_attention.png"]


def load_tool(path: Path):
    spec = importlib.util.spec_from_file_location(f"tool_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


visualize_tool = load_tool(TOOL)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache")
    ensure_demo_shards(folder, num_samples=64)
    return folder


def data_args(cache):
    return [f"data.cache_dir={cache}", "data.synthetic_samples=64"]


def make_run(folder: Path, schema, args, **extra) -> Path:
    """A run directory as the training tools leave it: config.yaml + model.safetensors of the model it describes."""
    cfg = parse_config(schema, args)
    save_config(cfg, folder / "config.yaml")
    torch.manual_seed(0)
    export_safetensors(build_model(cfg.model, mae=cfg.model.name.startswith("mae_"), **extra),
                       folder / "model.safetensors")
    return folder


def run(argv):
    return run_tool(visualize_tool.main, [str(a) for a in argv])


def run_fails(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        run(argv)
    assert exc.value.code == 2
    return " ".join(capsys.readouterr().err.split())


def check_pngs(folder: Path, names):
    for name in names:
        with Image.open(folder / name) as img:
            img.verify()


def test_mae_run_gives_every_figure_and_reconstructions(tmp_path, cache, capsys):
    run_dir = make_run(tmp_path / "pretrain", PretrainConfig, [*SMALL, *DECODER])
    out = tmp_path / "vis"
    summary = run(["--checkpoint", run_dir / "model.safetensors", "--output-dir", out, "num_images=3",
                   "mask_ratios=[0.5,0.9]", *data_args(cache)])
    expected = FIGURES + ["reconstructions.png", "summary.json"]
    assert sorted(summary["files"]) == sorted(expected)
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)
    check_pngs(out, FIGURES + ["reconstructions.png"])
    written = json.loads((out / "summary.json").read_text())
    # the run's model (16 px, patch 4 -> a 4 x 4 grid), not the tool's default 32 px
    assert written["model"] == "MaskedAutoencoderViT" and written["grid_size"] == [4, 4]
    assert written["num_images"] == 3 and written["depth"] == 2
    assert written["reconstruction"]["mask_ratios"] == [0.5, 0.9] and len(written["reconstruction"]["loss"]) == 2
    printed = capsys.readouterr().out
    assert all(str(out / name) in printed for name in expected)


def test_classifier_run_gives_the_figures_without_reconstructions(tmp_path, cache, capsys):
    run_dir = make_run(tmp_path / "linprobe", LinprobeConfig, SMALL, num_classes=10, probe_bn=True)
    out = tmp_path / "vis"
    summary = run(["--checkpoint", run_dir, "--output-dir", out, "num_images=2", *data_args(cache)])
    assert sorted(p.name for p in out.iterdir()) == sorted(FIGURES + ["summary.json"])
    check_pngs(out, FIGURES)
    assert summary["model"] == "ViTClassifier" and summary["grid_size"] == [4, 4]
    assert "reconstructions" in summary["skipped"]
    assert "reconstructions skipped" in capsys.readouterr().out


def test_seed_picks_the_images(cache):
    train, val = ensure_demo_shards(cache, num_samples=64)
    kw = dict(num_images=4, img_size=16, in_chans=3, mean=None, std=None, crop_pct=1.0, interpolation="bicubic",
              shuffle_buffer=100)
    a, b, c = sample_images(val, seed=0, **kw), sample_images(val, seed=0, **kw), sample_images(val, seed=1, **kw)
    assert a.shape == (4, 3, 16, 16)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert sample_images(val, seed=0, **{**kw, "num_images": 50}).shape[0] == 16  # all there is


def test_bad_checkpoint_path_exits_2_and_writes_nothing(tmp_path, cache, capsys):
    out = tmp_path / "vis"
    err = run_fails(["--checkpoint", tmp_path / "missing.safetensors", "--output-dir", out, *data_args(cache)], capsys)
    assert "does not exist" in err and "missing.safetensors" in err
    assert not out.exists()


def test_foreign_file_of_another_model_exits_2(tmp_path, cache, capsys):
    """No config.yaml beside the file: the tool's defaults (ViT-Tiny, 512-wide decoder) do not fit these weights."""
    model = create_model("mae_vit_tiny_patch4", img_size=16, embed_dim=32, depth=2, num_heads=2,
                         decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    weights = export_safetensors(model, tmp_path / "foreign" / "mae.safetensors")
    out = tmp_path / "vis"
    err = run_fails(["--checkpoint", weights, "--output-dir", out, "model.img_size=16", *DECODER, *data_args(cache)],
                    capsys)
    assert "has shape" in err and "another model size" in err
    assert not out.exists()
    # described on the command line, the same file works
    summary = run(["--checkpoint", weights, "--output-dir", out, *SMALL, *DECODER, "num_images=2",
                   "mask_ratios=[0.75]", *data_args(cache)])
    assert "reconstructions.png" in summary["files"]
