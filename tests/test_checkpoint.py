import argparse
import logging

import pytest
import torch

from mae_vit.checkpoint import export_safetensors, load_weights, read_file
from mae_vit.errors import CheckpointError
from mae_vit.models import create_model

BLOCK = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]


def official_mae_keys(depth=12, decoder_depth=8):
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias",
            "decoder_embed.weight", "decoder_embed.bias", "mask_token", "decoder_pos_embed", "decoder_norm.weight",
            "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"}
    for prefix, n in (("blocks", depth), ("decoder_blocks", decoder_depth)):
        keys |= {f"{prefix}.{i}.{m}.{p}" for i in range(n) for m in BLOCK for p in ("weight", "bias")}
    return keys


def test_base_model_has_official_keys_and_shapes():
    with torch.device("meta"):
        sd = create_model("mae_vit_base_patch16").state_dict()
    assert set(sd) == official_mae_keys()
    shapes = {"cls_token": (1, 1, 768), "pos_embed": (1, 197, 768), "patch_embed.proj.weight": (768, 3, 16, 16),
              "blocks.0.attn.qkv.weight": (2304, 768), "blocks.0.mlp.fc1.weight": (3072, 768),
              "decoder_embed.weight": (512, 768), "mask_token": (1, 1, 512), "decoder_pos_embed": (1, 197, 512),
              "decoder_pred.weight": (768, 512)}
    for k, shape in shapes.items():
        assert tuple(sd[k].shape) == shape, k


def tiny(name="mae_vit_tiny_patch4", **kw):
    return create_model(name, img_size=16, **kw)


def test_official_training_checkpoint_loads(tmp_path):
    src = tiny(decoder_depth=1)
    path = tmp_path / "checkpoint-799.pth"
    sd = {f"module.{k}": v for k, v in src.state_dict().items()}  # DDP prefix
    torch.save({"model": sd, "epoch": 799, "args": argparse.Namespace(lr=1e-3, model="mae_vit_tiny")}, path)
    dst = tiny(decoder_depth=1)
    report = load_weights(dst, path, strict=True)
    assert not report.missing and not report.unexpected
    for k, v in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[k], v)


def test_encoder_only_file_into_mae_reports_decoder_missing(tmp_path, caplog):
    src = tiny(decoder_depth=1)
    enc = {k: v for k, v in src.state_dict().items() if not k.startswith(("decoder", "mask_token"))}
    torch.save({"model": enc}, tmp_path / "mae_pretrain_vit_tiny.pth")
    with caplog.at_level(logging.WARNING):
        report = load_weights(tiny(decoder_depth=1), tmp_path / "mae_pretrain_vit_tiny.pth")
    assert "mask_token" in report.missing and "decoder_pred.weight" in report.missing
    assert "decoder weights" in caplog.text
    with pytest.raises(CheckpointError, match="missing .*mask_token, decoder_pos_embed"):
        load_weights(tiny(decoder_depth=1), {"model": enc}, strict=True)


def test_pretrained_mae_into_classifier_at_higher_resolution():
    mae = tiny(decoder_depth=1)
    torch.nn.init.normal_(mae.pos_embed)
    clf = create_model("vit_tiny_patch4", img_size=24, num_classes=3)
    report = load_weights(clf, {"model": mae.state_dict(), "epoch": 3})
    assert report.resized == ["pos_embed"]
    assert set(report.missing) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    assert "norm.weight" in report.unexpected and "mask_token" in report.unexpected
    torch.testing.assert_close(clf.pos_embed[:, 0], mae.pos_embed[:, 0])
    assert clf.pos_embed.shape == (1, 37, 192) and torch.all(clf(torch.randn(1, 3, 24, 24)) == 0)
    torch.testing.assert_close(clf.blocks[1].mlp.fc2.weight, mae.blocks[1].mlp.fc2.weight)


def test_wrong_model_size_is_clear_error():
    with pytest.raises(CheckpointError, match="another model size"):
        load_weights(create_model("vit_small_patch4", img_size=16), tiny("vit_tiny_patch4").state_dict())


def test_timm_state_dict_round_trip_and_same_logits():
    pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    ours = create_model("vit_tiny_patch4", img_size=16, num_classes=5)
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.05) if p.ndim > 1 else torch.nn.init.normal_(p, std=0.1)
    theirs = TimmViT(img_size=16, patch_size=4, embed_dim=192, depth=12, num_heads=3, num_classes=5,
                     global_pool="avg")
    theirs.load_state_dict(ours.state_dict(), strict=True)  # our keys load strictly into timm
    x = torch.randn(2, 3, 16, 16)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)
    back = create_model("vit_tiny_patch4", img_size=16, num_classes=5)
    report = load_weights(back, {"state_dict": theirs.state_dict()}, strict=True)  # and timm's into ours
    assert not report.missing
    torch.testing.assert_close(back(x.clone()).detach(), ours(x).detach(), rtol=1e-5, atol=1e-5)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        torch.save({"model": {"w": torch.zeros(1)}, "payload": _Evil(marker)}, f, pickle_protocol=2)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused.*would call io.open"):
        load_weights(tiny(), path)
    assert not marker.exists()


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_file(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        read_file(tmp_path / "junk.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(CheckpointError, match="safetensors"):
        read_file(tmp_path / "junk.safetensors")


def test_safetensors_export_and_run_dir(tmp_path):
    src = tiny(decoder_depth=1)
    src_sd = src.state_dict()
    path = export_safetensors(src, tmp_path / "run" / "model.safetensors")
    assert path.exists() and not list((tmp_path / "run").glob("*.tmp"))
    for source in (path, tmp_path / "run"):
        dst = tiny(decoder_depth=1)
        assert not load_weights(dst, source, strict=True).missing
        torch.testing.assert_close(dst.state_dict()["blocks.0.attn.qkv.weight"], src_sd["blocks.0.attn.qkv.weight"])


def test_compiled_prefix_stripped():
    src = tiny("vit_tiny_patch4", num_classes=2)
    sd = {f"_orig_mod.module.{k}": v for k, v in src.state_dict().items()}
    assert not load_weights(tiny("vit_tiny_patch4", num_classes=2), sd, strict=True).missing


def test_weights_with_a_nan_or_an_infinity_are_never_exported(tmp_path):
    from mae_vit.errors import NonFiniteLossError

    model = tiny()
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight[0, 0] = float("nan")
        model.norm.bias[0] = float("inf")
    with pytest.raises(NonFiniteLossError, match="2 of .* tensors hold NaN or infinite values"):
        export_safetensors(model, tmp_path / "model.safetensors")
    assert list(tmp_path.iterdir()) == []
