"""Export to Hugging Face transformers: the folder loads with from_pretrained and computes what our model does."""

import json

import pytest
import torch

from mae_vit.errors import CheckpointError
from mae_vit.export.hf import export_hf
from mae_vit.models import create_model

transformers = pytest.importorskip("transformers", reason="transformers is an optional test dependency")


def test_an_exported_mae_loads_in_transformers_and_gives_the_same_loss_prediction_and_mask(tmp_path):
    torch.manual_seed(0)
    ours = create_model("mae_vit_tiny_patch4", img_size=16, depth=2, decoder_depth=1, decoder_embed_dim=32,
                        decoder_num_heads=2).eval()
    export_hf(ours, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["layer_norm_eps"] == 1e-6
    theirs = transformers.ViTMAEForPreTraining.from_pretrained(str(tmp_path / "hf")).eval()
    imgs, noise = torch.randn(3, 3, 16, 16), torch.rand(3, 16)
    with torch.no_grad():
        loss, pred, mask = ours(imgs, mask_ratio=0.75, noise=noise)
        out = theirs(pixel_values=imgs, noise=noise)
    torch.testing.assert_close(out.mask, mask)
    torch.testing.assert_close(out.logits, pred, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.loss, loss, atol=1e-5, rtol=1e-4)


def test_an_exported_class_token_classifier_gives_the_same_logits_and_a_pooled_one_is_refused(tmp_path):
    torch.manual_seed(0)
    ours = create_model("vit_tiny_patch4", img_size=16, depth=2, num_classes=7, global_pool=False).eval()
    torch.nn.init.normal_(ours.head.weight)  # a head that is not zero, so the logits say something
    export_hf(ours, tmp_path / "cls")
    theirs = transformers.ViTForImageClassification.from_pretrained(str(tmp_path / "cls")).eval()
    imgs = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(theirs(pixel_values=imgs).logits, ours(imgs), atol=1e-5, rtol=1e-4)
    pooled = create_model("vit_tiny_patch4", img_size=16, depth=2, num_classes=7, global_pool=True)
    with pytest.raises(CheckpointError, match="class token only"):
        export_hf(pooled, tmp_path / "pooled")


def test_the_export_tool_turns_a_pretraining_run_into_a_folder_transformers_loads(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from mae_vit.data import ensure_demo_shards

    root = Path(__file__).resolve().parents[1]
    train, _ = ensure_demo_shards(tmp_path / "cache", num_samples=64)
    run = tmp_path / "run"
    tiny = ["model.img_size=16", "model.embed_dim=48", "model.depth=1", "model.num_heads=3",
            "model.decoder_embed_dim=32", "model.decoder_depth=1", "model.decoder_num_heads=2", "data.batch_size=16",
            "data.num_workers=0", "optim.epochs=1", "optim.warmup_epochs=0", "knn.vs_random=false",
            "model.mask_ratio=0.5"]
    for cmd in (["pretrain.py", "--output-dir", str(run), "--data", train, *tiny],
                ["export_hf.py", "--checkpoint", str(run), "--output-dir", str(tmp_path / "hf")]):
        result = subprocess.run([sys.executable, str(root / "tools" / cmd[0]), *cmd[1:]], capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
    theirs = transformers.ViTMAEForPreTraining.from_pretrained(str(tmp_path / "hf"))
    assert theirs.config.hidden_size == 48 and theirs.config.image_size == 16 and theirs.config.num_hidden_layers == 1
    assert theirs.config.mask_ratio == 0.5  # the run's, not HF's default 0.75
    exported = theirs.state_dict()["vit.embeddings.cls_token"]
    from safetensors.torch import load_file
    assert torch.equal(exported, load_file(str(run / "model.safetensors"))["cls_token"])


def test_a_hybrid_is_refused_because_transformers_has_no_resnet_stem(tmp_path):
    from mae_vit.errors import ConfigError
    hybrid = create_model("mae_vit_tiny_hybrid_r18", img_size=32, embed_dim=32, depth=1, num_heads=2,
                          decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    with pytest.raises(ConfigError, match="ResNet stem"):
        export_hf(hybrid, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_the_exported_mae_masks_the_share_of_patches_it_was_trained_with(tmp_path):
    ours = create_model("mae_vit_tiny_patch4", img_size=16, depth=1, decoder_depth=1, decoder_embed_dim=32,
                        decoder_num_heads=2).eval()
    export_hf(ours, tmp_path / "hf", mask_ratio=0.5)
    theirs = transformers.ViTMAEForPreTraining.from_pretrained(str(tmp_path / "hf")).eval()
    assert theirs.config.mask_ratio == 0.5
    with torch.no_grad():
        assert theirs(pixel_values=torch.randn(2, 3, 16, 16)).mask.sum(1).tolist() == [8, 8]  # 8 of 16 patches


def test_the_export_tool_refuses_a_hybrid_run_with_exit_2_and_writes_nothing(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from mae_vit.checkpoint import export_safetensors

    run = tmp_path / "run"
    run.mkdir()
    model = {"name": "mae_vit_tiny_hybrid_r18", "img_size": 32, "embed_dim": 32, "depth": 1, "num_heads": 2,
             "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2}
    (run / "config.yaml").write_text(json.dumps({"model": model}))  # JSON is YAML
    export_safetensors(create_model(**model), run / "model.safetensors")
    tool = Path(__file__).resolve().parents[1] / "tools" / "export_hf.py"
    result = subprocess.run([sys.executable, str(tool), "--checkpoint", str(run), "--output-dir", str(tmp_path / "hf")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "exported" not in result.stdout
    assert "ResNet stem" in result.stderr and not (tmp_path / "hf").exists()
