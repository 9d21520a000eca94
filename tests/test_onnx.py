"""ONNX export: the file passes the ONNX checker and onnxruntime gives our outputs, at any batch size."""

import pytest
import torch

from mae_vit.export.onnx import export_onnx
from mae_vit.models import create_model

onnx = pytest.importorskip("onnx", reason="onnx is an optional test dependency (pip install onnx)")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is an optional test dependency")

TINY = dict(img_size=16, embed_dim=32, depth=2, num_heads=4)


def run_onnx(path, images):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"image": images.numpy()})[0])


def test_an_exported_classifier_gives_our_logits_for_any_batch_size(tmp_path):
    model = create_model("vit_tiny_patch4", num_classes=5, **TINY).eval()
    torch.nn.init.normal_(model.head.weight, std=0.1)  # the head starts at zero: make the logits differ
    path = export_onnx(model, tmp_path / "out" / "model.onnx", mean=[0.5], std=[0.25])
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta == {"mae_vit.output": "logits", "mae_vit.mean": "[0.5]", "mae_vit.std": "[0.25]"}
    for batch in (1, 3):
        images = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            ours = model(images)
        theirs = run_onnx(path, images)
        assert theirs.shape == (batch, 5) and ours.abs().max() > 0.01
        assert torch.allclose(theirs, ours, atol=1e-4)
    assert [p.name for p in path.parent.iterdir()] == ["model.onnx"]  # no temporary file left


def test_an_exported_mae_is_its_encoder_without_masking(tmp_path):
    mae = create_model("mae_vit_tiny_patch4", decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4, **TINY)
    path = export_onnx(mae.eval(), tmp_path / "mae.onnx")
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ours = mae.forward_features(images)  # (B, 1 + L, D)
    theirs = run_onnx(path, images)
    assert theirs.shape == (2, 17, 32)
    assert torch.allclose(theirs, ours, atol=1e-4)
    assert {p.key: p.value for p in onnx.load(str(path)).metadata_props}["mae_vit.output"] == "features"


def test_the_export_tool_turns_a_fine_tuning_run_into_an_onnx_file(tmp_path):
    from conftest import tool
    from safetensors.torch import save_file
    model = create_model("vit_tiny_patch4", num_classes=3, **TINY)
    save_file(model.state_dict(), str(tmp_path / "weights.safetensors"))
    out = tmp_path / "model.onnx"
    result = tool("export_onnx.py", "--checkpoint", str(tmp_path / "weights.safetensors"), "--output", str(out),
                  "model.name=vit_tiny_patch4", "model.img_size=16", "model.embed_dim=32", "model.depth=2",
                  "model.num_heads=4")
    assert "exported" in result.stdout and out.is_file()
    assert run_onnx(out, torch.zeros(2, 3, 16, 16)).shape == (2, 3)
