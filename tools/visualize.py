"""Figures of what a checkpoint's ViT learned, and MAE reconstructions at several mask ratios.

    python tools/visualize.py --checkpoint runs/pretrain                    # demo images
    python tools/visualize.py --checkpoint runs/finetune/best.safetensors --data 'val/shard-{000000..000009}.tar'

Writes into output_dir: patch_embedding.png, position_similarity.png, attention_distance.png,
cls_attention.png, reconstructions.png (MAE checkpoints) and summary.json. The model is the one the
checkpoint's run was trained as (its config.yaml); model.* keys override it. Run with --help for every option.
"""

from _run import run_tool  # tools/_run.py: puts this checkout on sys.path, so no install is needed

from mae_vit.config import VisualizeConfig, parse_config


def main(argv):
    cfg = parse_config(VisualizeConfig, argv, prog="visualize.py")
    from mae_vit.apps.visualize import visualize
    from mae_vit.train.run_config import user_set_keys  # after parsing: --help and config errors stay fast

    return visualize(cfg, user_keys=user_set_keys(cfg, argv))


if __name__ == "__main__":
    run_tool(main)
