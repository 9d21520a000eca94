#!/usr/bin/env python
"""Time the MAE pretraining train step and count its FLOPs: the yardstick for speed work.

    python tools/benchmark.py                                   # mae_vit_base_patch16, batch 8, 224 px
    python tools/benchmark.py --model mae_vit_large_patch16 --batch-size 64 --compile --json bench.json

Prints model, parameters, device, precision, train-step images/s (median of the timed steps), FLOPs
per image (FlopCounterMode: matmul, conv and attention only), achieved FLOP/s and peak memory.
The library code is mae_vit/engine/benchmark.py.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from mae_vit.cli import run_tool
from mae_vit.engine.benchmark import benchmark_train_step, format_table, write_json


def main(argv):
    parser = argparse.ArgumentParser(prog="benchmark.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mae_vit_base_patch16", help="an MAE model name (create_model)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per step")
    parser.add_argument("--img-size", type=int, default=224, help="image size in pixels (square)")
    parser.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of patches removed")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="auto = bf16 autocast on a GPU that has it, else fp32")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--compile", action="store_true", help="time torch.compile(model)")
    parser.add_argument("--json", metavar="FILE", help="also write the numbers to FILE as JSON")
    args = parser.parse_args(argv)
    result = benchmark_train_step(
        args.model,
        batch_size=args.batch_size,
        img_size=args.img_size,
        mask_ratio=args.mask_ratio,
        device=args.device,
        precision=args.precision,
        steps=args.steps,
        warmup=args.warmup,
        compile_model=args.compile,
    )
    print(format_table(result))
    if args.json:
        write_json(result, args.json)
    return result


if __name__ == "__main__":
    run_tool(main)
