"""Export a checkpoint to the Hugging Face transformers layout: an MAE as ViTMAEForPreTraining, a class-token
classifier as ViTForImageClassification.

    python tools/export_hf.py --checkpoint runs/pretrain --output-dir runs/pretrain_hf
    # then: transformers.ViTMAEForPreTraining.from_pretrained("runs/pretrain_hf")

The model is the one the checkpoint's run was trained as (its config.yaml); model.* keys override it.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from mae_vit.cli import run_tool
from mae_vit.config import ExportHfConfig, parse_config
from mae_vit.errors import ConfigError


def main(argv):
    cfg = parse_config(ExportHfConfig, argv, prog="export_hf.py")
    if cfg.checkpoint is None:
        raise ConfigError("nothing to export: pass --checkpoint PATH (a run directory or a weights file).")
    from mae_vit.checkpoint import read_file, to_state_dict
    from mae_vit.engine.build import model_config_from_run, model_from_weights, user_set_keys
    from mae_vit.hf import export_hf

    cfg = model_config_from_run(cfg.checkpoint, cfg, user_keys=user_set_keys(cfg, argv))
    model, _ = model_from_weights(cfg.model, to_state_dict(read_file(cfg.checkpoint)), source=cfg.checkpoint)
    folder = export_hf(model, cfg.output_dir)
    print(f"exported {cfg.checkpoint} to {folder} (config.json, model.safetensors)")
    return folder


if __name__ == "__main__":
    run_tool(main)
