"""Export a checkpoint to ONNX: a classifier as image -> logits, an MAE as its encoder (image -> features).

    python tools/export_onnx.py --checkpoint runs/finetune --output runs/finetune/model.onnx
    # then: onnxruntime.InferenceSession("runs/finetune/model.onnx").run(None, {"image": images})

The model is the one the checkpoint's run was trained as (its config.yaml, or an export's metadata); model.* keys
override it. Hybrids export with their ResNet stem.
Inputs are images normalised as in training (data.mean / data.std, also in the file's metadata).
"""

from _run import run_tool  # tools/_run.py: puts this checkout on sys.path, so no install is needed

from mae_vit.config import ExportOnnxConfig, parse_config


def main(argv):
    cfg = parse_config(ExportOnnxConfig, argv, prog="export_onnx.py")
    from mae_vit.export.onnx import export_onnx
    from mae_vit.train.build import checkpoint_model
    from mae_vit.train.run_config import read_run_config, run_value

    cfg, model = checkpoint_model(cfg, argv)
    mean, std = run_value(cfg.checkpoint, "data.mean"), run_value(cfg.checkpoint, "data.std")  # into the metadata
    path = export_onnx(model, cfg.output, mean=mean, std=std)
    known = read_run_config(cfg.checkpoint) is not None
    print(f"exported {cfg.checkpoint} to {path}" + ("" if known else " (no run config.yaml: model.* as given)"))
    return path


if __name__ == "__main__":
    run_tool(main)
