#!/usr/bin/env python
"""Time the MAE pretraining train step and count its FLOPs: the yardstick for speed work.

    python tools/benchmark.py                                   # mae_vit_base_patch16, batch 8, 224 px
    python tools/benchmark.py --model mae_vit_large_patch16 --batch-size 64 compile=true --json bench.json

Prints model, parameters, device, precision, train-step images/s (median of the timed steps), FLOPs
per image (FlopCounterMode: matmul, conv and attention only), achieved FLOP/s and peak memory.
`--help` lists every option. The library code is mae_vit/engine/benchmark.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from mae_vit.cli import run_tool
from mae_vit.config import BenchmarkConfig, parse_config
from mae_vit.engine.benchmark import benchmark_train_step, format_table, write_result


def main(argv):
    cfg = parse_config(BenchmarkConfig, argv, prog="benchmark.py")
    result = benchmark_train_step(cfg.model, batch_size=cfg.batch_size, img_size=cfg.img_size,
                                  mask_ratio=cfg.mask_ratio, device=cfg.device, precision=cfg.precision,
                                  steps=cfg.steps, warmup=cfg.warmup, compile_model=cfg.compile)
    print(format_table(result))
    if cfg.json:
        write_result(result, cfg.json)
    return result


if __name__ == "__main__":
    run_tool(main)
