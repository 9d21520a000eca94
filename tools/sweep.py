"""Which checkpoint to fine-tune: score every kept checkpoint of a pretraining run, plot it, export the best.

    python tools/sweep.py --run runs/pretrain                    # the run's own data: kNN + 10-shot
    python tools/sweep.py --run runs/mine --data 'train/shard-{000000..000009}.tar' data.val='val/*.tar'

Writes sweep.json, sweep.png and best_encoder.safetensors into the run directory. Run with --help for
every option.
"""

from _run import run_tool  # tools/_run.py: puts this checkout on sys.path, so no install is needed

from mae_vit.config import SweepConfig, parse_config
from mae_vit.config.trust import allowed_flags


def main(argv):
    cfg = parse_config(SweepConfig, argv, prog="sweep.py")
    from mae_vit.apps.sweep import sweep
    from mae_vit.train.run_config import user_set_keys  # after parsing: --help and config errors stay fast

    return sweep(cfg, user_keys=user_set_keys(cfg, argv), allowed=allowed_flags(argv))


if __name__ == "__main__":
    run_tool(main)
