"""Export a checkpoint to the Hugging Face transformers layout: an MAE as ViTMAEForPreTraining, a class-token
classifier as ViTForImageClassification.

    python tools/export_hf.py --checkpoint runs/pretrain --output-dir runs/pretrain_hf
    # then: transformers.ViTMAEForPreTraining.from_pretrained("runs/pretrain_hf")

The model is the one the checkpoint's run was trained as (its config.yaml, or an export's metadata); model.* keys
override it. An MAE keeps its run's mask ratio. Hybrids (a ResNet stem) are refused: transformers has no such stem.
"""

from _run import run_tool  # tools/_run.py: puts this checkout on sys.path, so no install is needed

from mae_vit.config import ExportHfConfig, parse_config


def main(argv):
    cfg = parse_config(ExportHfConfig, argv, prog="export_hf.py")
    from mae_vit.export.hf import export_hf
    from mae_vit.train.build import checkpoint_model
    from mae_vit.train.run_config import run_value

    cfg, model = checkpoint_model(cfg, argv)
    folder = export_hf(model, cfg.output_dir, mask_ratio=run_value(cfg.checkpoint, "model.mask_ratio", 0.75))
    print(f"exported {cfg.checkpoint} to {folder} (config.json, model.safetensors)")
    return folder


if __name__ == "__main__":
    run_tool(main)
