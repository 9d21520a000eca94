#!/usr/bin/env python
"""The first-GPU check: precision, MFU, torch.compile, SIGTERM and resume, time budget, fp16, in-memory speed,
nvJPEG decode, kNN evaluation; under 8 minutes on one H100/H200. Writes gpu_check.json and gpu_check.md.

    python tools/gpu_check.py                                  # every check, into runs/gpu_check
    python tools/gpu_check.py --output-dir /tmp/gc --checks bench_B,bench_L

Without a GPU it runs what it can and reports the GPU-only checks as skipped. Exit status 1 when a check
failed. The library code is mae_vit/bench/gpu_check.py (its docstring lists the checks and their targets).
"""

import argparse
import sys
from pathlib import Path

from _run import run_tool  # tools/_run.py: puts this checkout on sys.path, so no install is needed

from mae_vit.bench.gpu_check import CHECKS, markdown, run_checks, write
from mae_vit.errors import ConfigError


def main(argv):
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="runs/gpu_check", help="JSON, table and scratch runs go here")
    parser.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated, of {', '.join(CHECKS)}")
    args = parser.parse_args(argv)
    names = [n for n in args.checks.split(",") if n]
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise ConfigError(f"--checks: no check named {', '.join(unknown)}; the checks are {', '.join(CHECKS)}.")
    output = Path(args.output_dir)
    result = run_checks(output, names, report=lambda line: print(line, flush=True))
    write(result, output)
    print(markdown(result))
    if any(r["status"] == "fail" for r in result["rows"]):
        sys.exit(1)
    return result


if __name__ == "__main__":
    run_tool(main)
