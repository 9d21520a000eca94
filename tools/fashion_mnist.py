"""Fashion-MNIST end to end, from one command: shards -> MAE pretraining -> kNN / few-shot of the frozen
encoder -> linear probe -> fine-tuning from the MAE weights and from scratch -> raw-pixel baselines -> report.

    python tools/fashion_mnist.py --preset cpu      # about 95 min in fp32 on a 2-core CPU without AMX
    python tools/fashion_mnist.py --preset gpu      # 8.7 min on one H200 (time budgets: 3 min + 2 x 75 s)
    python tools/fashion_mnist.py --preset small --train-samples 5000   # "my 5,000 images": configs/*/small_data.yaml
    python tools/fashion_mnist.py shards_only=true  # only the shards, for configs/*/fashion_mnist.yaml by hand

Every choice (the checkpoint called best, the probe's best epoch, the kNN monitor) is made on 5,000
training images held out by seed (--val-samples, split_seed=); the test split is evaluated once per run.

Needs the Fashion-MNIST files (`apt-get install dataset-fashion-mnist`). Writes runs/fashion_mnist_<preset>/
with one run directory per stage and report.md, results.json and curves. Re-running the same command
continues an interrupted chain: finished stages are kept.
"""

from pathlib import Path

from _run import run_tool  # tools/_run.py: puts this checkout on sys.path, so no install is needed

from mae_vit.config import ChainConfig, parse_config
from mae_vit.config.paths import expand_path


def main(argv):
    cfg = parse_config(ChainConfig, argv, prog="fashion_mnist.py")
    from mae_vit.apps.chain import ensure_fashion_mnist_shards, run_chain  # after parsing: --help stays fast

    if cfg.shards_only:
        urls = ensure_fashion_mnist_shards(Path(expand_path(cfg.data_dir)), cfg.source, val_samples=cfg.val_samples,
                                           train_samples=cfg.train_samples, seed=cfg.split_seed)
        print("\n".join(f"{name}: {spec}" for name, spec in urls.items()))
        return
    subset = "" if cfg.train_samples is None else f"_{cfg.train_samples}"
    out = cfg.output_dir or expand_path(f"runs/fashion_mnist_{cfg.preset}{subset}")
    print(run_chain(cfg.preset, out, cfg.data_dir, cfg.source, val_samples=cfg.val_samples,
                    train_samples=cfg.train_samples, seed=cfg.split_seed))


if __name__ == "__main__":
    run_tool(main)
