"""Config schema and command line: merge order, shorthand flags, errors, --help, run_tool, save_config."""

import os

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError

from mae_vit.config import (
    EvaluateConfig,
    FinetuneConfig,
    LinprobeConfig,
    MakeShardsConfig,
    PretrainConfig,
    VisualizeConfig,
    parse_config,
    save_config,
)
from mae_vit.config.cli import run_tool
from mae_vit.errors import ConfigError, DataError


def here(path: str) -> str:
    """A relative path as parse_config resolves it: absolute, under the current folder."""
    return os.path.join(os.getcwd(), path)


def write(path, text):
    path.write_text(text)
    return str(path)


# ------------------------------------------------------------------ defaults and merge order


def test_defaults_per_tool():
    pre = parse_config(PretrainConfig, [])
    # the pretraining defaults are the CPU demo (the paper's recipes are YAML files in configs/)
    assert pre.model.name == "mae_vit_mini_patch8" and pre.model.depth is None  # the size comes with the name
    assert (pre.model.mask_ratio, pre.data.synthetic_samples) == (0.5, 8192)
    assert pre.optim.base_lr == 4e-3 and pre.optim.epochs == 12
    assert pre.data.in_memory is None  # resolved by the tool: true for the synthetic demo only
    assert (pre.model.decoder_embed_dim, pre.model.decoder_depth, pre.model.decoder_num_heads) == (128, 1, 4)
    assert list(pre.optim.betas) == [0.9, 0.95] and pre.train.output_dir == here("runs/pretrain")

    fin = parse_config(FinetuneConfig, [])
    assert fin.model.name == "vit_tiny_patch4"
    assert (fin.optim.base_lr, fin.optim.layer_decay, fin.optim.epochs) == (5e-4, 0.75, 100)
    assert (fin.optim.warmup_epochs, fin.optim.min_lr, list(fin.optim.betas)) == (5, 1e-6, [0.9, 0.999])
    assert fin.train.output_dir == here("runs/finetune") and fin.augment.mixup == 0.8 and fin.resolution is None

    assert fin.data.in_memory is False

    lin = parse_config(LinprobeConfig, [])
    assert lin.model.global_pool is False and list(lin.data.crop_scale) == [0.08, 1.0]
    assert (lin.optim.base_lr, lin.optim.weight_decay, lin.optim.epochs, lin.optim.warmup_epochs) == (0.1, 0, 90, 10)
    assert lin.feature_cache is False and lin.train.output_dir == here("runs/linprobe")

    ev = parse_config(EvaluateConfig, [])
    assert list(ev.metrics) == ["top1", "knn", "fewshot"] and list(ev.fewshot.shots) == [1, 5, 10, 25]
    vis = parse_config(VisualizeConfig, [])
    assert list(vis.mask_ratios) == [0.5, 0.75, 0.9] and vis.output_dir == here("runs/visualize")
    shards = parse_config(MakeShardsConfig, [])
    assert (shards.source, shards.samples_per_shard, shards.max_shard_bytes) == ("synthetic", 1000, 100_000_000)


def test_defaults_of_one_tool_do_not_leak_into_another():
    parse_config(FinetuneConfig, ["optim.epochs=7"])
    assert parse_config(FinetuneConfig, []).optim.epochs == 100
    assert parse_config(PretrainConfig, []).optim.epochs == 12


def test_merge_order_defaults_then_yaml_then_cli(tmp_path):
    path = write(tmp_path / "c.yaml", "optim:\n  lr: 0.01\n  epochs: 70\ndata:\n  batch_size: 16\n")
    cfg = parse_config(PretrainConfig, ["optim.lr=0.02", "--config", path])
    assert cfg.optim.lr == 0.02            # CLI beats YAML, wherever --config stands
    assert cfg.optim.epochs == 70           # YAML beats default
    assert cfg.data.batch_size == 16
    assert cfg.optim.min_lr == 0.0         # untouched default
    # two files: the later one wins; the CLI still wins over both
    path2 = write(tmp_path / "d.yaml", "optim: {epochs: 90}\n")
    cfg = parse_config(PretrainConfig, ["--config", path, f"--config={path2}", "data.batch_size=4"])
    assert (cfg.optim.epochs, cfg.optim.lr, cfg.data.batch_size) == (90, 0.01, 4)


def test_cli_values_are_yaml():
    cfg = parse_config(
        FinetuneConfig,
        ["optim.betas=[0.8,0.9]", "optim.lr=1e-3", "model.num_classes=5", "model.num_classes=null",
         "data.train=123", "train.resume=false", "optim.clip_grad=1"],
    )
    assert list(cfg.optim.betas) == [0.8, 0.9]
    assert cfg.optim.lr == 0.001 and isinstance(cfg.optim.lr, float)
    assert cfg.model.num_classes is None   # the later override wins
    assert cfg.data.train == here("123")   # numbers become strings for str keys (a path: made absolute)
    assert cfg.train.resume is False and cfg.optim.clip_grad == 1.0


def test_result_is_struct_mode():
    cfg = parse_config(PretrainConfig, [])
    with pytest.raises(ConfigAttributeError, match="Key 'lrr' not in 'AdamWConfig'"):
        cfg.optim.lrr = 1.0


# ------------------------------------------------------------------ shorthand flags


def test_shorthand_flags_both_spellings():
    cfg = parse_config(
        FinetuneConfig,
        ["--output-dir", "out/a", "--data=shards/{0..3}.tar", "--checkpoint", "ck.pt", "--resolution=48",
         "--num-classes", "7"],
    )
    assert cfg.train.output_dir == here("out/a") and cfg.data.train == here("shards/{0..3}.tar")
    assert (cfg.checkpoint, cfg.resolution, cfg.model.num_classes) == (here("ck.pt"), 48, 7)


def test_output_dir_flag_maps_to_each_tools_key():
    assert parse_config(EvaluateConfig, ["--output-dir", "e"]).output_dir == here("e")
    assert parse_config(VisualizeConfig, ["--output-dir=v", "--checkpoint", "m.pt"]).checkpoint == here("m.pt")
    assert parse_config(LinprobeConfig, ["--output-dir", "l"]).train.output_dir == here("l")
    assert parse_config(MakeShardsConfig, ["--output-dir", "s", "--source", "img"]).output_dir == here("s")


def test_flags_and_keys_apply_left_to_right():
    assert parse_config(PretrainConfig, ["--output-dir", "a", "train.output_dir=b"]).train.output_dir == here("b")
    assert parse_config(PretrainConfig, ["train.output_dir=b", "--output-dir", "a"]).train.output_dir == here("a")


def test_checkpoint_flag_only_where_declared():
    with pytest.raises(ConfigError, match="unknown flag '--checkpoint'"):
        parse_config(PretrainConfig, ["--checkpoint", "x.pt"])
    with pytest.raises(ConfigError, match="unknown flag '--resolution'"):
        parse_config(LinprobeConfig, ["--resolution", "64"])


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["optim.lrr=0.1"], ["unknown config key 'optim.lrr' (from the command line)", "optim.lr, optim.min_lr"]),
        (["lr=0.1"], ["unknown config key 'lr'", "Did you mean: optim.lr"]),
        (["optim.epochs=abc"], ["'optim.epochs' (from the command line) must be an integer", "'abc'"]),
        (["optim.betas=0.9"], ["'optim.betas'", "a list of numbers"]),
        (["model.name=null"], ["'model.name'", "must be a string", "null"]),
        (["optim=3"], ["'optim'", "is a section"]),
        (["foo"], ["'foo'", "key=value"]),
        (["=3"], ["'=3'", "key=value"]),
        (["optim.betas=[0.9,"], ["'optim.betas'", "not valid YAML"]),
        (["--ouput-dir", "x"], ["unknown flag '--ouput-dir'", "Did you mean: --output-dir"]),
        (["--optim.lr=3"], ["unknown flag '--optim.lr'", "optim.lr=VALUE"]),
        (["--data"], ["--data needs a value"]),
        (["train.mixed_precision=fp32"], ["train.mixed_precision", "'fp32'", "no, fp16, bf16"]),
        (["model.pos_embed=rope"], ["model.pos_embed", "sincos, learned"]),
        (["model.mask_ratio=1.0"], ["model.mask_ratio", "(0, 1)"]),
        (["model.mask_ratio=-0.1"], ["model.mask_ratio"]),
        (["model.mask_ratio=0"], ["model.mask_ratio", "nothing to learn"]),
        (["optim.base_lr=.inf"], ["optim.base_lr", "finite"]),
        (["optim.min_lr=.nan"], ["optim.min_lr", "finite"]),
        (["data.interpolation=lanczos"], ["data.interpolation", "nearest, bilinear, bicubic"]),
        (["data.batch_size=0"], ["data.batch_size", "positive"]),
        (["optim.epochs=-5"], ["optim.epochs", "positive"]),
        (["data.crop_scale=[0.5,0.2]"], ["data.crop_scale", "two increasing numbers in (0, 1]"]),
        (["data.crop_scale=[0,1]"], ["data.crop_scale"]),
        (["data.crop_scale=[0.2,1.5]"], ["data.crop_scale"]),
        (["data.crop_scale=[0.2]"], ["data.crop_scale"]),
        (["data.mean=[0.5]", "data.std=[0.2,0.2,0.2]"], ["data.mean has 1 value(s) but data.std has 3"]),
        (["data.mean=[0.5]", "data.std=[0.5]"], ["model.in_chans is 3", "model.in_chans=1"]),
        (["optim.warmup_epochs=900"], ["optim.warmup_epochs", "optim.epochs"]),
        (["optim.betas=[0.9]"], ["optim.betas", "two numbers"]),
        (["optim.layer_decay=0"], ["optim.layer_decay"]),
    ],
)
def test_command_line_errors_name_the_key(argv, expected):
    with pytest.raises(ConfigError) as info:
        parse_config(PretrainConfig, argv)
    message = str(info.value)
    for text in expected:
        assert text in message
    assert "\n" not in message  # one paragraph


def test_valid_edge_values_pass():
    cfg = parse_config(
        PretrainConfig,
        ["model.mask_ratio=0.01", "data.crop_scale=[1.0,1.0]", "optim.warmup_epochs=10", "model.in_chans=1",
         "data.mean=[0.5]", "data.std=[0.25]"],
    )
    assert cfg.model.mask_ratio == 0.01 and list(cfg.data.std) == [0.25]


def test_per_tool_value_checks():
    with pytest.raises(ConfigError, match="'metrics'"):
        parse_config(EvaluateConfig, ["metrics=[top1,top5]"])
    with pytest.raises(ConfigError, match="'mask_ratios'"):
        parse_config(VisualizeConfig, ["mask_ratios=[0.5,1.0]"])
    with pytest.raises(ConfigError, match="'resolution'"):
        parse_config(FinetuneConfig, ["--resolution", "0"])
    with pytest.raises(ConfigError, match="'samples_per_shard'"):
        parse_config(MakeShardsConfig, ["samples_per_shard=0"])
    with pytest.raises(ConfigError, match="'prefix'"):
        parse_config(MakeShardsConfig, ["prefix=a/b"])


def test_yaml_unknown_key_names_file_and_suggests(tmp_path):
    path = write(tmp_path / "bad.yaml", "optim:\n  weight_decy: 0.1\n")
    with pytest.raises(ConfigError) as info:
        parse_config(PretrainConfig, ["--config", path])
    assert f"'optim.weight_decy' (in config file '{path}')" in str(info.value)
    assert "Did you mean: optim.weight_decay" in str(info.value)


def test_yaml_unknown_section_suggests_full_key(tmp_path):
    path = write(tmp_path / "bad.yaml", "optimm:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"'optimm\.lr'.*Did you mean: optim\.lr"):
        parse_config(PretrainConfig, ["--config", path])


def test_yaml_wrong_type_names_file(tmp_path):
    path = write(tmp_path / "bad.yaml", "data:\n  batch_size: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"'data\.batch_size' \(in config file .*bad\.yaml'\) must be an integer"):
        parse_config(PretrainConfig, ["--config", path])


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "does not exist"),
        ("optim: [1, 2\n", "is not valid YAML"),
        ("- 1\n- 2\n", "must hold a mapping"),
    ],
)
def test_bad_yaml_files(tmp_path, content, expected):
    path = tmp_path / "c.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as info:
        parse_config(PretrainConfig, ["--config", str(path)])
    assert expected in str(info.value) and str(path) in str(info.value)


def test_config_flag_pointing_at_directory(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        parse_config(PretrainConfig, ["--config", str(tmp_path)])


def test_empty_yaml_is_no_change(tmp_path):
    path = write(tmp_path / "empty.yaml", "")
    assert parse_config(PretrainConfig, ["--config", path]) == parse_config(PretrainConfig, [])


# ------------------------------------------------------------------ --help


def test_help_lists_flags_and_every_key_with_default_and_comment(capsys):
    with pytest.raises(SystemExit) as info:
        parse_config(FinetuneConfig, ["optim.lr=0.1", "--help"], prog="finetune")
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: finetune")
    for flag in ("--config FILE", "--output-dir DIR", "--data URLS", "--checkpoint PATH", "--resolution N",
                 "--num-classes K"):
        assert flag in out
    assert "same as model.num_classes=..." in out
    lines = {line.split("=")[0].strip(): line for line in out.splitlines() if " = " in line}
    assert "0.0005" in lines["optim.base_lr"] and "lr = base_lr * effective_batch / 256" in lines["optim.base_lr"]
    assert "[0.9, 0.999]" in lines["optim.betas"]
    assert "reached by gradient accumulation" in lines["optim.effective_batch"]
    assert "null" in lines["checkpoint"]
    # every leaf key of the schema appears once
    keys = [k for k in lines]
    assert len(keys) == len(set(keys)) == 12 + 18 + 12 + 6 + 15 + 2  # model, data, optim, augment, train, tool


def test_short_help_flag(capsys):
    with pytest.raises(SystemExit) as info:
        parse_config(MakeShardsConfig, ["-h"], prog="make_shards")
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--source SRC" in out and "samples_per_shard = 1000" in out


# ------------------------------------------------------------------ run_tool


def test_run_tool_turns_config_error_into_exit_2(capsys):
    def main(argv):
        parse_config(PretrainConfig, argv)

    with pytest.raises(SystemExit) as info:
        run_tool(main, ["optim.lrr=0.1"])
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: unknown config key 'optim.lrr'")
    assert "Traceback" not in captured.err and captured.out == ""
    assert all(len(line) <= 100 for line in captured.err.splitlines())


def test_run_tool_wraps_long_messages_to_100_columns(capsys):
    def main(argv):
        raise DataError("word " * 60)

    with pytest.raises(SystemExit) as info:
        run_tool(main, [])
    assert info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) > 2 and all(len(line) <= 100 for line in lines)


def test_run_tool_passes_argv_and_result_and_other_errors():
    assert run_tool(lambda argv: argv, ["a=1"]) == ["a=1"]

    def buggy(argv):
        raise KeyError("bug")

    with pytest.raises(KeyError):  # programming errors keep their traceback
        run_tool(buggy, [])


def test_run_tool_keyboard_interrupt_exits_130(capsys):
    def main(argv):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as info:
        run_tool(main, [])
    assert info.value.code == 130
    assert "interrupted" in capsys.readouterr().err


# ------------------------------------------------------------------ save_config


def test_save_config_round_trip(tmp_path):
    cfg = parse_config(FinetuneConfig, ["optim.lr=0.003", "--num-classes", "4", "data.mean=[0.1,0.2,0.3]"])
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    assert OmegaConf.to_container(OmegaConf.load(path))["optim"]["lr"] == 0.003
    again = parse_config(FinetuneConfig, ["--config", str(path)])
    assert again == cfg
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temp file left behind


def test_save_config_replaces_existing_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("old: true\n")
    save_config(parse_config(PretrainConfig, ["train.seed=5"]), path)
    assert "old" not in path.read_text()
    assert parse_config(PretrainConfig, ["--config", str(path)]).train.seed == 5


def test_string_keys_take_the_command_line_text_literally():
    """`no`, `yes`, `0755`, `*.tar` and `{a,b}.tar` are YAML booleans, octal ints or invalid YAML; for a
    string key they are just the text the user typed."""
    cfg = parse_config(PretrainConfig, ["train.mixed_precision=no", "--data", "{a,b}.tar", "data.val=*.tar",
                                        "data.interpolation=bicubic"])
    assert cfg.train.mixed_precision == "no" and cfg.data.interpolation == "bicubic"
    assert cfg.data.train == here("{a,b}.tar") and cfg.data.val == here("*.tar")
    assert parse_config(PretrainConfig, ["--output-dir", "yes"]).train.output_dir == here("yes")
    assert parse_config(PretrainConfig, ["--output-dir", "0755"]).train.output_dir == here("0755")
    assert parse_config(PretrainConfig, ["data.val=null"]).data.val is None      # null still means "unset"
    assert parse_config(PretrainConfig, ["optim.lr=1e-3"]).optim.lr == 0.001     # other keys: YAML as before


# ------------------------------------------------------------------ each tool holds only the keys it reads


@pytest.mark.parametrize("schema, key", [
    (PretrainConfig, "optim.layer_decay=0.75"), (PretrainConfig, "optim.momentum=0.9"),
    (PretrainConfig, "model.global_pool=false"), (PretrainConfig, "train.eval_every=2"),
    (FinetuneConfig, "model.mask_ratio=0.5"), (FinetuneConfig, "optim.momentum=0.9"), (FinetuneConfig, "knn.k=5"),
    (FinetuneConfig, "train.vis_every=10"), (LinprobeConfig, "optim.betas=[0.9,0.9]"),
    (LinprobeConfig, "optim.layer_decay=0.5"), (LinprobeConfig, "model.drop_path_rate=0.1"),
    (EvaluateConfig, "data.crop_scale=[0.5,1.0]"), (EvaluateConfig, "knn.every=1"),
])
def test_a_key_the_tool_would_ignore_is_an_unknown_key(schema, key):
    with pytest.raises(ConfigError, match=f"unknown config key '{key.split('=')[0]}'"):
        parse_config(schema, [key])


def test_layer_decay_given_to_the_pretraining_tool_exits_2_without_a_traceback(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "tools" / "pretrain.py"
    result = subprocess.run([sys.executable, str(tool), "--output-dir", str(tmp_path / "run"),
                             "optim.layer_decay=0.75"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unknown config key 'optim.layer_decay'" in result.stderr and not (tmp_path / "run").exists()


# ------------------------------------------------------------------ nothing from a config file runs a command


def test_a_pipe_url_runs_only_with_allow_shell_on_the_command_line(tmp_path):
    path = write(tmp_path / "shared.yaml", "data:\n  val: 'pipe:id'\n")
    refused = "'data.val' is 'pipe:id': a `pipe:` data URL runs a shell command.*--allow-shell"
    with pytest.raises(ConfigError, match=refused):
        parse_config(PretrainConfig, ["--config", path])
    with pytest.raises(ConfigError, match="--allow-shell"):
        parse_config(PretrainConfig, ["--data", "shards/a.tar::pipe:curl -s http://h/b.tar"])
    assert parse_config(PretrainConfig, ["--config", path, "--allow-shell"]).data.val == "pipe:id"


def test_environment_variables_reach_the_config_only_with_allow_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MAE_VIT_SECRET", "s3cr3t")
    path = write(tmp_path / "shared.yaml", "train:\n  output_dir: runs/${oc.env:MAE_VIT_SECRET}\n")
    with pytest.raises(ConfigError, match="oc.env.*copies an environment variable.*--allow-env"):
        parse_config(PretrainConfig, ["--config", path])
    assert parse_config(PretrainConfig, ["--allow-env", "--config", path]).train.output_dir == here("runs/s3cr3t")


def test_a_null_mean_and_std_become_the_shards_own_statistics_else_imagenets(tmp_path, caplog):
    import logging

    import numpy as np

    from mae_vit.data.writer import shard_urls, write_shards
    from mae_vit.train.build import fill_normalisation

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in range(6)]  # grey
    from PIL import Image
    samples = [(f"{i:08d}", Image.fromarray(img), i % 2) for i, img in enumerate(images)]
    written = write_shards(samples, tmp_path / "a", progress=False)
    with_stats = shard_urls(tmp_path / "a", "shard", len(written["shards"]))
    without = shard_urls(tmp_path / "b", "shard", len(write_shards(samples, tmp_path / "b", progress=False,
                                                                   stats=False)["shards"]))
    pixels = np.stack(images).astype(np.float64) / 255
    cfg = parse_config(PretrainConfig, ["model.in_chans=1"])
    assert cfg.data.mean is None and cfg.data.std is None
    with caplog.at_level(logging.INFO, logger="mae_vit"):
        fill_normalisation(cfg, with_stats)
    assert cfg.data.mean[0] == pytest.approx(pixels.mean(), abs=1e-5)
    assert cfg.data.std[0] == pytest.approx(pixels.std(), abs=1e-4)
    assert "statistics of the training shards" in caplog.text
    imagenet = parse_config(PretrainConfig, [])
    fill_normalisation(imagenet, without)
    assert list(imagenet.data.mean) == [0.485, 0.456, 0.406] and list(imagenet.data.std) == [0.229, 0.224, 0.225]
    mine = parse_config(PretrainConfig, ["model.in_chans=1", "data.mean=[0.1]", "data.std=[0.2]"])
    fill_normalisation(mine, with_stats)
    assert list(mine.data.mean) == [0.1] and list(mine.data.std) == [0.2]
