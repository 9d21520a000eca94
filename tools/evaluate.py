"""Evaluate a checkpoint: top-1/top-5 of a fine-tuned or probed classifier, kNN and few-shot accuracy of its features.

    python tools/evaluate.py --checkpoint runs/finetune                       # demo shards, all metrics
    python tools/evaluate.py --checkpoint runs/pretrain metrics=[knn,fewshot]
    accelerate launch tools/evaluate.py --checkpoint runs/finetune/best.safetensors \
        --data 'train/shard-{000000..000999}.tar' data.val='val/shard-{000000..000049}.tar'

The model is the one the checkpoint's run was trained as (its config.yaml); model.* keys on the
command line override it, and describe the model of a foreign file (official MAE .pth, timm).
Writes {output_dir}/metrics.json. Run with --help for every option.
"""

from _run import run_tool  # tools/_run.py: puts this checkout on sys.path, so no install is needed

from mae_vit.config import EvaluateConfig, parse_config


def main(argv):
    cfg = parse_config(EvaluateConfig, argv, prog="evaluate.py")
    from mae_vit.apps.evaluate import evaluate
    from mae_vit.train.run_config import user_set_keys  # after parsing: --help and config errors stay fast

    return evaluate(cfg, user_keys=user_set_keys(cfg, argv))


if __name__ == "__main__":
    run_tool(main)
