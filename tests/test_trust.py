"""The trust rule: a config file alone never runs a shell command nor copies an environment variable.

Each route is checked on the values as the tools use them: after ${...} interpolation, decoding and path
expansion, for every key that reaches a shard opener, in every tool (`check_trust`).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tool
from omegaconf import OmegaConf

from mae_vit.config import BenchmarkConfig, MakeShardsConfig, PretrainConfig, SweepConfig, parse_config
from mae_vit.data import ensure_demo_shards
from mae_vit.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def secret(monkeypatch, tmp_path):
    """An environment variable a shared recipe would like to copy, and an empty current folder."""
    monkeypatch.setenv("MAE_VIT_SECRET", "s3cr3t")
    monkeypatch.chdir(tmp_path)
    return "s3cr3t"


def write(path, text):
    path.write_text(text)
    return str(path)


def test_a_pipe_url_reached_through_an_interpolation_needs_allow_shell(tmp_path, secret):
    path = write(tmp_path / "shared.yaml", "data:\n  cache_dir: 'pipe:touch pwned'\n  val: '${data.cache_dir}'\n")
    with pytest.raises(ConfigError, match=r"'data.val' is 'pipe:touch pwned' \(from '\$\{data.cache_dir\}'\): a "
                                          r"`pipe:` data URL runs a shell command.*--allow-shell"):
        parse_config(PretrainConfig, ["--config", path])
    with pytest.raises(ConfigError, match="--allow-shell"):  # the same through a key typed on the command line
        parse_config(PretrainConfig, ["--config", path, "data.val=x.tar::${data.cache_dir}"])
    assert parse_config(PretrainConfig, ["--config", path, "--allow-shell"]).data.val == "pipe:touch pwned"


def test_a_pipe_url_with_another_case_or_leading_blanks_needs_allow_shell(tmp_path, secret):
    for url in ("PIPE:id", " \tpipe:id"):
        with pytest.raises(ConfigError, match="--allow-shell"):
            parse_config(PretrainConfig, [f"data.val={url}"])


def test_the_benchmarks_loader_urls_are_checked_like_the_data_keys(tmp_path, secret):
    path = write(tmp_path / "shared.yaml", "loader: 'pipe:touch pwned'\n")
    with pytest.raises(ConfigError, match="'loader' is 'pipe:touch pwned'.*--allow-shell"):
        parse_config(BenchmarkConfig, ["--config", path])
    with pytest.raises(ConfigError, match="--allow-shell"):
        parse_config(BenchmarkConfig, ["--data", "pipe:touch pwned"])
    assert parse_config(BenchmarkConfig, ["--data", "pipe:cat a.tar", "--allow-shell"]).loader == "pipe:cat a.tar"


@pytest.mark.parametrize("value", ["runs/${\toc.env:MAE_VIT_SECRET}", "runs/${ oc.env : MAE_VIT_SECRET }",
                                   "runs/${oc.select:nothing,${oc.env:MAE_VIT_SECRET}}"])
def test_an_env_resolver_hidden_by_blanks_or_nesting_needs_allow_env(tmp_path, secret, value):
    path = write(tmp_path / "shared.yaml", f"train:\n  output_dir: \"{value}\"\n")
    with pytest.raises(ConfigError, match="'train.output_dir'.*resolver `oc.env`.*--allow-env"):
        parse_config(PretrainConfig, ["--config", path])
    assert parse_config(PretrainConfig, ["--config", path, "--allow-env"]).train.output_dir.endswith("/runs/s3cr3t")


def test_a_decoded_string_cannot_build_an_env_resolver(tmp_path, secret):
    path = write(tmp_path / "shared.yaml", "data:\n  cache_dir: '$'\ntrain:\n  output_dir: "
                 "\"${oc.decode:'${data.cache_dir}{oc.env:MAE_VIT_SECRET}'}\"\n")
    with pytest.raises(ConfigError, match="'train.output_dir'.*resolver `oc.decode`.*--allow-env"):
        parse_config(PretrainConfig, ["--config", path])


def test_plain_interpolations_and_oc_select_need_no_flag(tmp_path, secret):
    path = write(tmp_path / "shared.yaml", "data:\n  cache_dir: cache\n  val: '${data.cache_dir}/v.tar'\n"
                 "train:\n  output_dir: '${oc.select:data.cache_dir,x}/run'\n")
    cfg = parse_config(PretrainConfig, ["--config", path])
    assert (cfg.data.val, cfg.train.output_dir) == (f"{tmp_path}/cache/v.tar", f"{tmp_path}/cache/run")


@pytest.mark.parametrize("text", ["train:\n  output_dir: runs/$MAE_VIT_SECRET\n",
                                  "data:\n  val: 'a.tar::$MAE_VIT_SECRET/v.tar'\n",
                                  "make_shards_source: fashion-mnist:$MAE_VIT_SECRET\n"])
def test_a_dollar_variable_in_a_path_from_a_config_file_needs_allow_env(tmp_path, secret, text):
    schema = MakeShardsConfig if text.startswith("make_shards_") else PretrainConfig
    path = write(tmp_path / "shared.yaml", text.removeprefix("make_shards_"))
    with pytest.raises(ConfigError, match=r"environment variable\(s\) \$MAE_VIT_SECRET .*--allow-env"):
        parse_config(schema, ["--config", path])
    cfg = OmegaConf.to_container(parse_config(schema, ["--config", path, "--allow-env"]))
    assert "s3cr3t" in str(cfg)


def test_an_escaped_interpolation_that_would_come_alive_once_resolved_is_refused(tmp_path, secret):
    path = write(tmp_path / "shared.yaml", "data:\n  cache_dir: '\\${oc.env:MAE_VIT_SECRET}'\n")
    for flags in ([], ["--allow-env"]):
        with pytest.raises(ConfigError, match=r"'data.cache_dir' is '\$\{oc.env:MAE_VIT_SECRET\}'.*escaped"):
            parse_config(PretrainConfig, ["--config", path, *flags])


def test_a_dollar_variable_typed_on_the_command_line_is_the_users_own(tmp_path, secret):
    cfg = parse_config(PretrainConfig, ["--output-dir", "runs/$MAE_VIT_SECRET", "data.val=$MAE_VIT_SECRET/v.tar"])
    assert (cfg.train.output_dir, cfg.data.val) == (f"{tmp_path}/runs/s3cr3t", f"{tmp_path}/s3cr3t/v.tar")
    path = write(tmp_path / "shared.yaml", "data:\n  interpolation: $MAE_VIT_SECRET\n")
    with pytest.raises(ConfigError, match=r"'data.val' is '\$MAE_VIT_SECRET/v.tar' \(from '\$\{data.interpolation\}"
                                          r"/v.tar'\).*--allow-env"):  # typed, but the variable comes from the file
        parse_config(PretrainConfig, ["--config", path, "data.val=${data.interpolation}/v.tar"])


def test_the_sweep_checks_the_data_it_takes_from_a_runs_config_yaml(tmp_path, secret):
    """The values a tool reads from a run's config.yaml go through the same check (`check_trust`)."""
    from mae_vit.config.trust import check_trust

    cfg = parse_config(SweepConfig, ["--run", "r"])
    cfg.data.val = "pipe:touch pwned"
    with pytest.raises(ConfigError, match="'data.val' is 'pipe:touch pwned'.*--allow-shell"):
        check_trust(cfg, set())
    cfg.data.val = "${oc.env:MAE_VIT_SECRET}"
    with pytest.raises(ConfigError, match="--allow-env"):
        check_trust(cfg, set())
    check_trust(cfg, {"--allow-env"})
    assert OmegaConf.to_container(cfg)["data"]["val"].endswith("/s3cr3t")


@pytest.mark.slow
def test_tools_sweep_refuses_a_pipe_url_in_the_runs_config_yaml(tmp_path):
    train, val = ensure_demo_shards(tmp_path / "cache", num_samples=64)
    run = tmp_path / "pretrain"
    tool("pretrain.py", "--output-dir", str(run), "--data", train, f"data.val={val}", "model.img_size=16",
         "model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.decoder_embed_dim=32",
         "model.decoder_depth=1", "model.decoder_num_heads=2", "data.batch_size=16", "data.num_workers=0",
         "train.max_steps=2", "knn.vs_random=false", "train.trackers=[]")
    config = run / "config.yaml"
    original, marker = config.read_text(), tmp_path / "pwned"
    for route in (f"'pipe:touch {marker}'", "'${oc.env:MAE_VIT_SECRET}'"):
        config.write_text(original.replace(f"  val: {val}\n", f"  val: {route}\n"))
        assert f"  val: {route}\n" in config.read_text()
        done = subprocess.run([sys.executable, str(ROOT / "tools/sweep.py"), "--run", str(run), "data.num_workers=0"],
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "MAE_VIT_SECRET": "s3cr3t"})
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert "--allow-shell" in done.stderr if "pipe" in route else "--allow-env" in done.stderr
        assert not marker.exists() and not (run / "sweep.json").exists()


def test_a_runs_config_yaml_cannot_bring_an_environment_variable_into_a_tool_that_reads_its_architecture(
        tmp_path, secret):
    from mae_vit.config import EvaluateConfig
    from mae_vit.train.run_config import model_config_from_run
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model:\n  name: mae_vit_tiny_patch4\n  depth: 2\n"
                                     "  embed_dim: '${oc.env:MAE_VIT_SECRET}'\n")
    cfg = parse_config(EvaluateConfig, ["--checkpoint", str(run)])
    with pytest.raises(ConfigError, match=r"model.embed_dim.*\$\{oc.env:MAE_VIT_SECRET\}.*not written by a run") as e:
        model_config_from_run(cfg.checkpoint, cfg)
    assert secret not in str(e.value)
