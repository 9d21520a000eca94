"""Export a checkpoint to ONNX: a classifier as image -> logits, an MAE as its encoder (image -> features).

    python tools/export_onnx.py --checkpoint runs/finetune --output runs/finetune/model.onnx
    # then: onnxruntime.InferenceSession("runs/finetune/model.onnx").run(None, {"image": images})

The model is the one the checkpoint's run was trained as (its config.yaml); model.* keys override it.
Inputs are images normalised as in training (data.mean / data.std, also in the file's metadata).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import yaml

from mae_vit.cli import run_tool
from mae_vit.config import ExportOnnxConfig, parse_config
from mae_vit.errors import ConfigError


def main(argv):
    cfg = parse_config(ExportOnnxConfig, argv, prog="export_onnx.py")
    if cfg.checkpoint is None:
        raise ConfigError("nothing to export: pass --checkpoint PATH (a run directory or a weights file).")
    from mae_vit.checkpoint import read_file, to_state_dict
    from mae_vit.engine.build import find_run_config, model_config_from_run, model_from_weights, user_set_keys
    from mae_vit.to_onnx import export_onnx

    run_config = find_run_config(cfg.checkpoint)
    cfg = model_config_from_run(cfg.checkpoint, cfg, user_keys=user_set_keys(cfg, argv))
    model, _ = model_from_weights(cfg.model, to_state_dict(read_file(cfg.checkpoint)), source=cfg.checkpoint)
    data = (yaml.safe_load(run_config.read_text()) or {}).get("data") or {} if run_config else {}
    path = export_onnx(model, cfg.output, mean=data.get("mean"), std=data.get("std"))
    print(f"exported {cfg.checkpoint} to {path}" + ("" if run_config else " (no run config.yaml: model.* as given)"))
    return path


if __name__ == "__main__":
    run_tool(main)
