"""Export a checkpoint to the Hugging Face transformers layout: an MAE as ViTMAEForPreTraining, a class-token
classifier as ViTForImageClassification.

    python tools/export_hf.py --checkpoint runs/pretrain --output-dir runs/pretrain_hf
    # then: transformers.ViTMAEForPreTraining.from_pretrained("runs/pretrain_hf")

The model is the one the checkpoint's run was trained as (its config.yaml); model.* keys override it.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from mae_vit.config import ExportHfConfig, parse_config
from mae_vit.config.cli import run_tool


def main(argv):
    cfg = parse_config(ExportHfConfig, argv, prog="export_hf.py")
    from mae_vit.export.hf import export_hf
    from mae_vit.train.build import checkpoint_model

    cfg, model = checkpoint_model(cfg, argv)
    folder = export_hf(model, cfg.output_dir)
    print(f"exported {cfg.checkpoint} to {folder} (config.json, model.safetensors)")
    return folder


if __name__ == "__main__":
    run_tool(main)
