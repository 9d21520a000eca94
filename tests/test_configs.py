"""The shipped YAML recipes: each parses with its tool's schema, builds its model, and holds the paper's numbers."""

import re
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from mae_vit.config import FinetuneConfig, LinprobeConfig, PretrainConfig, parse_config
from mae_vit.models import create_model

CONFIGS = Path(__file__).parents[1] / "configs"
SCHEMAS = {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "linprobe": LinprobeConfig}
ALL_FILES = sorted(CONFIGS.rglob("*.yaml"))
SIZES = ("base", "large", "huge")
IMAGENET_TRAIN = 1_281_167
FASHION_MNIST = {"train": 55_000, "test": 10_000}  # train: the 60,000 less the 5,000 held out


def load(relative: str):
    path = CONFIGS / relative
    return parse_config(SCHEMAS[path.parent.name], ["--config", str(path)])


def test_every_recipe_folder_is_known_and_the_shipped_recipes_exist():
    assert {p.parent.name for p in ALL_FILES} == set(SCHEMAS)  # a YAML elsewhere would go untested
    shipped = {"pretrain/demo.yaml", "pretrain/fashion_mnist.yaml", "finetune/fashion_mnist.yaml",
               "linprobe/fashion_mnist.yaml", "pretrain/small_data.yaml", "finetune/small_data.yaml"}
    shipped |= {f"pretrain/mae_vit_{size}_in1k.yaml" for size in SIZES}
    shipped |= {f"{tool}/vit_{size}_in1k.yaml" for tool in ("finetune", "linprobe") for size in SIZES}
    assert shipped <= {f"{p.parent.name}/{p.name}" for p in ALL_FILES}


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_parses_and_builds_its_model(path):
    cfg = parse_config(SCHEMAS[path.parent.name], ["--config", str(path)])
    m = cfg.model
    mae = path.parent.name == "pretrain"
    assert m.name.startswith("mae_") == mae
    options = dict(img_size=m.img_size, in_chans=m.in_chans)
    if mae:
        decoder = dict(decoder_embed_dim=m.decoder_embed_dim, decoder_depth=m.decoder_depth,
                       decoder_num_heads=m.decoder_num_heads)
        options.update({k: v for k, v in decoder.items() if v is not None})
    else:
        options.update(num_classes=m.num_classes or 10, global_pool=m.global_pool)
    with torch.device("meta"):  # shapes only: checks the name and that the image size fits the patches
        model = create_model(m.name, **options)
    assert model.patch_embed.num_patches == (m.img_size // model.patch_size) ** 2


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_value_that_differs_from_the_default_has_a_comment(path):
    defaults = OmegaConf.structured(SCHEMAS[path.parent.name])
    section = None
    uncommented = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = re.match(r"^(\s*)([\w]+):\s*(.*)$", line)
        assert match, f"unexpected line in {path.name}: {line!r}"
        indent, key, rest = match.groups()
        if not indent and not rest:
            section = key
            continue
        dotted = f"{section}.{key}" if indent else key
        value_text, _, comment = rest.partition("#")
        value = yaml.safe_load(value_text) if value_text.strip() else None
        default = OmegaConf.to_container(defaults)
        for part in dotted.split("."):
            default = default[part]
        if value != default and not comment.strip():
            uncommented.append(dotted)
    assert uncommented == []


def test_demo_mirrors_the_pretrain_defaults():
    assert OmegaConf.to_container(load("pretrain/demo.yaml")) == OmegaConf.to_container(
        parse_config(PretrainConfig, [])
    )


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_a_recipe_builds_the_encoder_its_model_name_gives_unless_it_sets_the_size_itself(path):
    # the demo's defaults once had depth=6: a recipe naming mae_vit_base_patch16 built a 6-block ViT-B
    from mae_vit.models import SIZES as NAMED
    from mae_vit.train.build import build_model

    cfg = parse_config(SCHEMAS[path.parent.name], ["--config", str(path)])
    named = NAMED[re.match(r"(?:mae_)?vit_([a-z]+)_", cfg.model.name)[1]]
    own = (yaml.safe_load(path.read_text()) or {}).get("model", {})
    expected = [own.get(k) or n for k, n in zip(("embed_dim", "depth", "num_heads"), named)]
    model = build_model(cfg.model, mae=path.parent.name == "pretrain") if expected[0] <= 192 else None
    if model is not None:  # the large ones: from the config alone, without building them
        assert [model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads] == expected
    assert [cfg.model[k] or n for k, n in zip(("embed_dim", "depth", "num_heads"), named)] == expected


@pytest.mark.parametrize("size", SIZES)
def test_pretrain_imagenet_recipes_are_the_papers(size):
    cfg = load(f"pretrain/mae_vit_{size}_in1k.yaml")
    assert cfg.model.name == {"base": "mae_vit_base_patch16", "large": "mae_vit_large_patch16",
                              "huge": "mae_vit_huge_patch14"}[size]
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    assert (m.img_size, m.in_chans, m.mask_ratio, m.norm_pix_loss) == (224, 3, 0.75, True)
    assert (m.decoder_embed_dim, m.decoder_depth, m.decoder_num_heads, m.drop_path_rate) == (512, 8, 16, 0.0)
    assert (o.base_lr, o.effective_batch, list(o.betas), o.weight_decay) == (1.5e-4, 4096, [0.9, 0.95], 0.05)
    assert (o.epochs, o.warmup_epochs, o.min_lr, o.lr) == (800, 40, 0.0, None) and "layer_decay" not in o
    assert o.base_lr * o.effective_batch / 256 == pytest.approx(2.4e-3)
    assert (list(d.crop_scale), d.interpolation, d.hflip) == ([0.2, 1.0], "bicubic", True)
    assert (list(d.mean), list(d.std)) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert d.train is None  # the user passes --data
    assert d.batch_size == 64 and o.effective_batch == 8 * 64 * 8  # 8 GPUs x 64 x 8 accumulation steps
    assert (t.mixed_precision, t.save_every) == ("bf16", 1000)


@pytest.mark.parametrize(
    "size, base_lr, layer_decay, epochs, drop_path",
    [("base", 5e-4, 0.65, 100, 0.1), ("large", 1e-3, 0.75, 50, 0.2), ("huge", 1e-3, 0.75, 50, 0.3)],
)
def test_finetune_imagenet_recipes_are_the_officials(size, base_lr, layer_decay, epochs, drop_path):
    cfg = load(f"finetune/vit_{size}_in1k.yaml")
    m, o, a = cfg.model, cfg.optim, cfg.augment
    assert m.name == f"vit_{size}_patch{14 if size == 'huge' else 16}" and m.img_size == 224
    assert (o.base_lr, o.layer_decay, o.epochs, m.drop_path_rate) == (base_lr, layer_decay, epochs, drop_path)
    assert (list(o.betas), o.weight_decay, o.warmup_epochs, o.min_lr) == ([0.9, 0.999], 0.05, 5, 1e-6)
    assert (o.effective_batch, o.clip_grad, m.global_pool) == (1024, None, True)
    assert (a.randaug_num_ops, a.randaug_magnitude, a.mixup, a.cutmix) == (2, 9, 0.8, 1.0)
    assert (a.label_smoothing, a.reprob) == (0.1, 0.25)
    assert list(cfg.data.crop_scale) == [0.08, 1.0]
    assert o.effective_batch == 8 * cfg.data.batch_size * 4  # 8 GPUs x 32 x 4 accumulation steps


@pytest.mark.parametrize("size", SIZES)
def test_linprobe_imagenet_recipes_are_the_papers(size):
    cfg = load(f"linprobe/vit_{size}_in1k.yaml")
    o = cfg.optim
    assert cfg.model.name == f"vit_{size}_patch{14 if size == 'huge' else 16}"
    assert (o.base_lr, o.weight_decay, o.momentum, o.epochs, o.warmup_epochs) == (0.1, 0.0, 0.9, 90, 10)
    assert (o.effective_batch, o.min_lr) == (16384, 0.0)
    assert cfg.model.global_pool is False and list(cfg.data.crop_scale) == [0.08, 1.0]
    assert o.effective_batch == 8 * cfg.data.batch_size * 4


@pytest.mark.parametrize("tool", ["pretrain", "finetune", "linprobe"])
def test_fashion_mnist_recipes_choose_on_the_held_out_split_that_fashion_mnist_py_writes(tool):
    from mae_vit.apps.chain import split_folder

    cfg = load(f"{tool}/fashion_mnist.yaml")
    assert (cfg.model.img_size, cfg.model.in_chans) == (28, 1)
    assert (list(cfg.data.mean), list(cfg.data.std)) == ([0.2860], [0.3530])
    held_out = split_folder(Path.cwd() / "data/fashion-mnist", 5000, 0)  # ChainConfig's defaults
    assert held_out == Path.cwd() / "data/fashion-mnist/heldout-5000-seed0"
    assert cfg.data.train == str(held_out / "fit/shard-{000000..000054}.tar")  # 55,000 images, 1,000 per shard
    assert cfg.data.val == str(held_out / "val/shard-{000000..000004}.tar")  # 5,000: every choice is made here
    if tool != "pretrain":  # the test split: evaluated once, at the end, with the weights chosen on val
        assert cfg.data.test == str(Path.cwd() / "data/fashion-mnist/test/shard-{000000..000009}.tar")
    assert "test/" not in cfg.data.val


def test_fashion_mnist_pretrain_is_an_mae_on_a_7x7_grid_with_a_small_decoder():
    cfg = load("pretrain/fashion_mnist.yaml")
    m = cfg.model
    assert (m.name, m.mask_ratio, m.norm_pix_loss) == ("mae_vit_tiny_patch4", 0.75, True)
    assert m.img_size // 4 == 7 and m.decoder_embed_dim < 512 and m.decoder_depth < 8
    assert cfg.knn.every > 0 and cfg.optim.warmup_epochs / cfg.optim.epochs == 40 / 800
    steps = FASHION_MNIST["train"] // cfg.data.batch_size * cfg.optim.epochs
    assert 20_000 <= steps <= 100_000  # a real schedule, sized for about an hour on one GPU


def test_imagenet_steps_per_epoch_in_the_comments():
    text = (CONFIGS / "pretrain" / "mae_vit_base_in1k.yaml").read_text()
    assert f"({IMAGENET_TRAIN // 4096} per epoch at 4096)" in text
    text = (CONFIGS / "finetune" / "vit_base_in1k.yaml").read_text()
    assert f"({IMAGENET_TRAIN // 1024} per epoch at 1024)" in text
    text = (CONFIGS / "linprobe" / "vit_base_in1k.yaml").read_text()
    assert f"({IMAGENET_TRAIN // 16384} per epoch at 16384)" in text
