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


def test_a_hybrid_exports_its_resnet_stem_and_onnxruntime_gives_our_outputs(tmp_path):
    """The stem's input has the image's channels (not the 1x1 projection's 64), batch norms in eval mode."""
    hybrid = dict(img_size=32, embed_dim=32, depth=1, num_heads=2, hybrid_stages=1)  # ResNet-18 conv1..layer1
    classifier = create_model("vit_tiny_hybrid_r18", num_classes=4, **hybrid).eval()
    mae = create_model("mae_vit_tiny_hybrid_r18", decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
                       **hybrid).eval()
    for model in (classifier, mae):
        torch.nn.init.normal_(model.patch_embed.backbone.bn1.running_mean, std=0.1)  # not the identity
    torch.nn.init.normal_(classifier.head.weight, std=0.1)
    images = torch.randn(2, 3, 32, 32)
    for model, shape in ((classifier, (2, 4)), (mae, (2, 1 + 8 * 8, 32))):
        path = export_onnx(model, tmp_path / "hybrid.onnx")
        with torch.no_grad():
            ours = model(images) if shape == (2, 4) else model.forward_features(images)
        theirs = run_onnx(path, images)
        assert theirs.shape == shape and ours.abs().max() > 0.01
        assert torch.allclose(theirs, ours, atol=1e-4)


def test_the_export_tool_exports_a_hybrid_from_a_weights_file_that_carries_its_run(tmp_path):
    """A copied model.safetensors alone: the architecture and mean/std come from its metadata."""
    import json

    from conftest import tool

    from mae_vit.checkpoint import RUN_METADATA, export_safetensors
    model = {"name": "vit_tiny_hybrid_r18", "img_size": 32, "embed_dim": 32, "depth": 1, "num_heads": 2,
             "num_classes": 3}
    ours = create_model(**model).eval()
    torch.nn.init.normal_(ours.head.weight, std=0.1)
    run = {"model": {**model, "global_pool": True}, "data": {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2]}}
    weights = export_safetensors(ours, tmp_path / "weights.safetensors", metadata={RUN_METADATA: json.dumps(run)})
    out = tmp_path / "hybrid.onnx"
    result = tool("export_onnx.py", "--checkpoint", str(weights), "--output", str(out))
    assert "exported" in result.stdout and "no run config" not in result.stdout
    assert {p.key: p.value for p in onnx.load(str(out)).metadata_props}["mae_vit.mean"] == "[0.5, 0.4, 0.3]"
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(run_onnx(out, images), ours(images), atol=1e-4)


def test_a_model_with_non_finite_weights_is_never_exported_to_onnx(tmp_path):
    from mae_vit.errors import NonFiniteLossError
    model = create_model("vit_tiny_patch4", num_classes=5, **TINY).eval()
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="1 of .* tensors hold NaN or infinite"):
        export_onnx(model, tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []
