"""Memory: activation checkpointing covers the encoder and the decoder; the batch per GPU that fits, on paper."""

import contextlib

import pytest
import torch

from mae_vit.bench import memory
from mae_vit.bench.costs import activation_bytes
from mae_vit.layers import attention
from mae_vit.models import create_model
from mae_vit.models import vit as vit_module

TINY = dict(img_size=16, embed_dim=32, depth=2, num_heads=4, decoder_embed_dim=32, decoder_depth=2,
            decoder_num_heads=4, norm_pix_loss=True)


def tiny(checkpointing: bool):
    torch.manual_seed(0)
    return create_model("mae_vit_tiny_patch4", grad_checkpointing=checkpointing, **TINY).train()


def test_checkpointing_recomputes_every_encoder_and_decoder_block_and_keeps_loss_and_gradients(monkeypatch):
    imgs, noise = torch.randn(4, 3, 16, 16), torch.rand(4, 16)
    plain, recomputed = tiny(False), tiny(True)
    calls = []
    real = vit_module.checkpoint
    monkeypatch.setattr(vit_module, "checkpoint", lambda block, *a, **k: calls.append(block) or real(block, *a, **k))
    losses = [model(imgs, noise=noise)[0] for model in (plain, recomputed)]
    for loss in losses:
        loss.backward()
    assert {id(b) for b in calls} == {id(b) for b in [*recomputed.blocks, *recomputed.decoder_blocks]}
    assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-6)
    for a, b in zip(plain.parameters(), recomputed.parameters()):
        assert (a.grad is None) == (b.grad is None) and (a.grad is None or torch.allclose(a.grad, b.grad, atol=1e-6))


def test_the_paper_batch_table_shrinks_with_model_size_and_grows_with_memory_and_checkpointing():
    rows = memory.fit_table()
    assert {(r["model"], r["task"]) for r in rows} == {(m, t) for m in ("ViT-B/16", "ViT-L/16", "ViT-H/14")
                                                       for t in ("pretrain", "finetune")}
    for r in rows:
        assert r["batch_80GB"] <= r["batch_141GB"] and r["batch_80GB_ckpt"] <= r["batch_141GB_ckpt"]
        assert r["batch_80GB"] <= r["batch_80GB_ckpt"]
        assert r["act_MiB_per_image_ckpt"] < r["act_MiB_per_image"]
    by = {(r["model"], r["task"]): r for r in rows}
    assert by["ViT-B/16", "pretrain"]["batch_80GB"] > by["ViT-L/16", "pretrain"]["batch_80GB"] > \
        by["ViT-H/14", "pretrain"]["batch_80GB"] > 0
    # pretraining sees a quarter of the patches in the encoder: more images fit than in fine-tuning
    assert by["ViT-L/16", "pretrain"]["batch_80GB"] > by["ViT-L/16", "finetune"]["batch_80GB"]
    assert "| ViT-B/16 | pretrain |" in memory.fit_markdown(rows)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_papers_bytes_per_token_and_channel_of_a_block_are_what_autograd_keeps(precision, monkeypatch):
    monkeypatch.setattr(attention, "EXPLICIT_ON_CPU_BF16", False)  # the fused kernel, as on a GPU
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext

    def per_image(depth, decoder_depth):  # the slope over the batch: weight copies drop out
        torch.manual_seed(0)
        model = create_model("mae_vit_tiny_patch4", **{**TINY, "img_size": 32, "embed_dim": 128, "depth": depth,
                                                      "decoder_embed_dim": 128, "decoder_depth": decoder_depth})
        return (activation_bytes(model.train(), torch.randn(4, 3, 32, 32), 0.75, autocast)
                - activation_bytes(model, torch.randn(2, 3, 32, 32), 0.75, autocast)) / 2
    encoder = (per_image(3, 1) - per_image(1, 1)) / 2 / (17 * 128)  # 64 patches, 16 kept, + class token
    decoder = (per_image(1, 3) - per_image(1, 1)) / 2 / (65 * 128)
    assert encoder == pytest.approx(memory.BLOCK_BYTES[precision], abs=0.5)
    assert decoder == pytest.approx(memory.BLOCK_BYTES[precision], abs=0.5)
