#!/usr/bin/env python
"""Time the MAE pretraining train step and count its FLOPs: the yardstick for speed work.

    python tools/benchmark.py                                   # mae_vit_base_patch16, batch 8, 224 px
    python tools/benchmark.py --compare hf --json bench.json    # against transformers' ViTMAE, switch by switch
    python tools/benchmark.py sweep=true                        # cost against image size and mask ratio
    python tools/benchmark.py profile=true                      # the top operators
    python tools/benchmark.py --data 'data/train/shard-{000000..000009}.tar'   # the loader alone, and a verdict
    python tools/benchmark.py --data '...' gpu_decode=true      # the same with the JPEGs decoded on the GPU
    python tools/benchmark.py --table bench.json                # the README table of a saved result

`--help` lists every option. The library code is mae_vit/bench/benchmark.py, compare.py, costs.py,
loader_speed.py.
"""

from _run import run_tool  # tools/_run.py: puts this checkout on sys.path, so no install is needed

from mae_vit.bench.benchmark import benchmark_train_step, resolve_device
from mae_vit.bench.compare import compare, markdown
from mae_vit.bench.costs import profile_step, sweep, sweep_markdown
from mae_vit.bench.knn_speed import knn_markdown, knn_speed
from mae_vit.bench.loader_speed import loader_speed
from mae_vit.bench.results import format_table, read_result, write_result
from mae_vit.config import BenchmarkConfig, parse_config


def main(argv):
    cfg = parse_config(BenchmarkConfig, argv, prog="benchmark.py")
    if cfg.table:
        result = read_result(cfg.table)
        tables = {"sweep": sweep_markdown, "knn": knn_markdown}
        print(tables.get(result.get("kind"), markdown)(result))
        return result
    shape = dict(batch_size=cfg.batch_size, img_size=cfg.img_size, mask_ratio=cfg.mask_ratio, device=cfg.device)
    if cfg.compare:
        result = compare(cfg.model, **shape, rounds=cfg.rounds, steps=cfg.steps, compile_model=cfg.compile)
        print(markdown(result))
    elif cfg.sweep:
        del shape["img_size"], shape["mask_ratio"]
        result = sweep(cfg.model, img_sizes=(cfg.img_size // 2, cfg.img_size), **shape, precision=cfg.precision,
                       steps=cfg.steps)
    elif cfg.knn:
        result = knn_speed(resolve_device(cfg.device))
        print(knn_markdown(result))
    elif cfg.profile:
        print(profile_step(cfg.model, **shape, precision=cfg.precision))
        return None
    else:
        step = benchmark_train_step(cfg.model, **shape, precision=cfg.precision, steps=cfg.steps, warmup=cfg.warmup,
                                    compile_model=cfg.compile)
        print(format_table(step))
        result = step
        if cfg.loader:
            result = loader_speed(cfg.loader, img_size=cfg.img_size, batch_size=cfg.batch_size,
                                  seconds=cfg.loader_seconds, step_images_per_s=step.images_per_s,
                                  gpu_decode=str(resolve_device(cfg.device)) if cfg.gpu_decode else None)
    if cfg.json:
        write_result(result, cfg.json)
    return result


if __name__ == "__main__":
    run_tool(main)
