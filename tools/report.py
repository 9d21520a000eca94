"""A Markdown report of runs: lineage (parent checkpoint and its sha256, data fingerprints, config changes,
versions), final metrics and curves.

    python tools/report.py runs/pretrain runs/finetune --output-dir runs/report

Writes report.md and one curves PNG per run into --output-dir (default runs/report).
"""

from pathlib import Path

from _run import run_tool  # tools/_run.py: puts this checkout on sys.path, so no install is needed

from mae_vit.config import ReportConfig, parse_config
from mae_vit.config.paths import expand_path
from mae_vit.errors import ConfigError


def main(argv):
    runs, rest = [], list(argv)
    while rest and not rest[0].startswith("-") and "=" not in rest[0]:
        runs.append(Path(expand_path(rest.pop(0))))  # the run directories come first
    cfg = parse_config(ReportConfig, rest, prog="report.py")
    missing = [str(r) for r in runs if not (r / "metrics.json").is_file() and not (r / "lineage.json").is_file()]
    if not runs or missing:
        not_runs = f"; not runs: {', '.join(missing)}" if missing else ""
        raise ConfigError(f"give run directories first, each holding metrics.json or lineage.json "
                          f"(e.g. report.py runs/pretrain runs/finetune){not_runs}.")
    from mae_vit.viz.run_report import write_run_report

    path = write_run_report(runs, Path(cfg.output_dir))
    print(f"report written to {path}")
    return path


if __name__ == "__main__":
    run_tool(main)
