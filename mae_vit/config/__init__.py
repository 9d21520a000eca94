"""Configuration: the schema's sections (`schema.py`), each tool's config (`tools.py`), the command line
(`cli.py`), the trust rule for shell and environment (`trust.py`) and path expansion (`paths.py`).

`from mae_vit.config import PretrainConfig, parse_config` is the way in for tools and tests."""

from mae_vit.config.checks import validate_config
from mae_vit.config.cli import format_help, parse_config, run_tool, save_config
from mae_vit.config.tools import (
                                  BenchmarkConfig,
                                  ChainConfig,
                                  EvaluateConfig,
                                  ExportHfConfig,
                                  ExportOnnxConfig,
                                  FinetuneConfig,
                                  LinprobeConfig,
                                  MakeShardsConfig,
                                  PretrainConfig,
                                  ReportConfig,
                                  SweepConfig,
                                  VisualizeConfig,
)

__all__ = ["BenchmarkConfig", "ChainConfig", "EvaluateConfig", "ExportHfConfig", "ExportOnnxConfig", "FinetuneConfig",
           "LinprobeConfig", "MakeShardsConfig", "PretrainConfig", "ReportConfig", "SweepConfig", "VisualizeConfig",
           "format_help", "parse_config", "run_tool", "save_config", "validate_config"]
