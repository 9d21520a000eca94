"""The speed switches keep the numbers, and the benchmark's modes measure what they say (tiny models, CPU)."""

import contextlib
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mae_vit.bench.costs import activation_bytes, sweep
from mae_vit.bench.loader_speed import loader_speed
from mae_vit.data.demo import ensure_demo_shards
from mae_vit.layers import attention
from mae_vit.models import create_model
from mae_vit.train.device import compiled, fast_bf16, make_accelerator
from mae_vit.train.optim import build_optimizer, param_groups

TINY = dict(img_size=16, embed_dim=32, depth=2, num_heads=4, decoder_embed_dim=32, decoder_depth=1,
            decoder_num_heads=4, norm_pix_loss=True)
TOOL = Path(__file__).resolve().parent.parent / "tools" / "benchmark.py"


def tiny_mae():
    torch.manual_seed(0)
    return create_model("mae_vit_tiny_patch4", **TINY)


def train_five_steps(fused: bool):
    model = tiny_mae()
    opt = build_optimizer("adamw", param_groups(model, 0.05), lr=1e-3, betas=(0.9, 0.95), fused=fused)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(5):
        imgs, noise = torch.randn(4, 3, 16, 16, generator=gen), torch.rand(4, 16, generator=gen)
        loss = model(imgs, noise=noise)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return model, losses


def test_fused_adamw_trains_the_same_weights_as_foreach_to_float_rounding():
    fused, fused_losses = train_five_steps(fused=True)
    plain, plain_losses = train_five_steps(fused=False)
    assert isinstance(build_optimizer("adamw", param_groups(fused, 0.0), lr=1.0, fused=True).defaults["fused"], bool)
    assert fused_losses == pytest.approx(plain_losses, rel=1e-5)
    # The key part of qkv.bias is left out: its gradient is zero in exact arithmetic (softmax ignores a shift
    # common to all keys), so it is rounding noise, and Adam divides noise by its own size.
    for (name, a), b in zip(fused.named_parameters(), plain.parameters()):
        if name.endswith("qkv.bias"):
            a, b = a.view(3, -1)[[0, 2]], b.view(3, -1)[[0, 2]]
        assert torch.allclose(a, b, atol=1e-7), name
    assert plain_losses[-1] < plain_losses[0]  # they did train


def test_explicit_attention_under_cpu_bf16_gives_the_loss_of_sdpa_and_of_fp32():
    model, imgs, noise = tiny_mae(), torch.randn(4, 3, 16, 16), torch.rand(4, 16)
    fp32 = model(imgs, noise=noise)[0].item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explicit = model(imgs, noise=noise)[0].item()
        attention.EXPLICIT_ON_CPU_BF16 = False
        try:
            fused = model(imgs, noise=noise)[0].item()
        finally:
            attention.EXPLICIT_ON_CPU_BF16 = True
    assert explicit == pytest.approx(fused, rel=2e-2) and explicit == pytest.approx(fp32, rel=2e-2)
    block = model.blocks[0].attn
    x = torch.randn(2, 5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention._cpu_bf16(x) and not attention._cpu_bf16(x.to("meta"))
    assert not attention._cpu_bf16(x)  # fp32: the fused kernel
    assert block(x).dtype == torch.float32


def test_mixed_precision_auto_is_bf16_only_on_a_cpu_with_amx(tmp_path, monkeypatch):
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(True)  # the Accelerator keeps one state per process
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a GPU host: its CPU side (tests/test_device.py)
    try:
        expected = "bf16" if fast_bf16(torch.device("cpu")) else "no"
        assert make_accelerator(str(tmp_path), "auto").mixed_precision == expected
        AcceleratorState._reset_state(True)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
        assert not fast_bf16(torch.device("cpu"))
        assert make_accelerator(str(tmp_path), "auto").mixed_precision == "no"
    finally:
        AcceleratorState._reset_state(True)


def test_compile_falls_back_to_the_eager_model_with_one_warning_where_torch_cannot_compile(monkeypatch, caplog):
    model = tiny_mae()
    assert compiled(model, False) is model
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with caplog.at_level(logging.WARNING, logger="mae_vit"):
        assert compiled(model, True) is model
    assert "cannot compile here" in caplog.text and "C++ compiler" in caplog.text


@pytest.mark.slow
def test_a_compiled_model_gives_the_eager_loss_and_gradients():
    model, imgs, noise = tiny_mae(), torch.randn(4, 3, 16, 16), torch.rand(4, 16)
    eager = model(imgs, noise=noise)[0]
    eager.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    fast = compiled(model, True)
    assert fast is not model
    loss = fast(imgs, noise=noise)[0]
    loss.backward()
    assert loss.item() == pytest.approx(eager.item(), rel=1e-5)
    for g, p in zip(grads, [p for p in model.parameters() if p.grad is not None]):
        assert torch.allclose(g, p.grad, atol=1e-5)


def test_masking_more_patches_costs_fewer_flops_and_less_activation_memory():
    rows = sweep("mae_vit_tiny_patch4", img_sizes=(8, 16), mask_ratios=(0.5, 0.75), batch_size=2, device="cpu",
                 precision="fp32", steps=1, model_options={k: v for k, v in TINY.items() if k != "img_size"},
                 report=lambda _: None)["rows"]
    assert [(r["img_size"], r["mask_ratio"], r["patches"], r["visible"]) for r in rows] == [
        (8, 0.5, 4, 2), (8, 0.75, 4, 1), (16, 0.5, 16, 8), (16, 0.75, 16, 4)]
    for a, b in ((rows[0], rows[1]), (rows[2], rows[3])):  # same size, more masked
        assert b["train_flops_per_image"] < a["train_flops_per_image"]
        assert b["activation_bytes_per_image"] < a["activation_bytes_per_image"]
    assert rows[2]["activation_bytes_per_image"] > rows[0]["activation_bytes_per_image"]
    assert all(r["images_per_s"] > 0 for r in rows)


def test_activation_bytes_leave_out_the_weights_and_grow_with_the_batch():
    model = tiny_mae()
    one = activation_bytes(model, torch.randn(1, 3, 16, 16), 0.75, contextlib.nullcontext)
    two = activation_bytes(model, torch.randn(2, 3, 16, 16), 0.75, contextlib.nullcontext)
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert 0 < one < weights and two == pytest.approx(2 * one, rel=0.1)


def test_the_loader_speed_gives_a_rate_per_worker_count_and_a_verdict(tmp_path):
    train, _ = ensure_demo_shards(tmp_path, num_samples=64, num_classes=4, img_size=8)
    slow_model = loader_speed(train, img_size=8, batch_size=8, workers=(0, 1), seconds=0.2, step_images_per_s=1.0,
                              report=lambda _: None)
    assert [r["workers"] for r in slow_model["rows"]] == [0, 1]
    assert all(r["images_per_s"] > 1.0 and r["images"] % 8 == 0 for r in slow_model["rows"])
    assert slow_model["verdict"] == "compute-bound" and slow_model["samples"] == 64
    fast_model = loader_speed(train, img_size=8, batch_size=8, workers=(0,), seconds=0.2, step_images_per_s=1e12,
                              report=lambda _: None)
    assert fast_model["verdict"] == "data-bound"


def test_compare_times_ours_against_transformers_and_writes_the_readme_table(tmp_path):
    pytest.importorskip("transformers", reason="transformers is an optional benchmark dependency")
    out = tmp_path / "c.json"
    result = subprocess.run([sys.executable, str(TOOL), "--model", "mae_vit_tiny_patch4", "--img-size", "8",
                             "--batch-size", "2", "--compare", "hf", "--steps", "1", "rounds=1", "--json", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    table = subprocess.run([sys.executable, str(TOOL), "--table", str(out)], capture_output=True, text=True)
    lines = table.stdout.splitlines()
    names = [line.split(" | ")[0].lstrip("| ") for line in lines if line.startswith("| ") and "train step" not in line]
    assert names == ["hf fp32", "hf bf16", "ours, plain", "ours + fused AdamW", "ours + fused AdamW + bf16",
                     "ours + fused AdamW + bf16 + explicit attention"]
    assert "| hf fp32 | fp32 |" in table.stdout and "1.00x" in table.stdout
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": "x"}')
    refused = subprocess.run([sys.executable, str(TOOL), "--table", str(bad)], capture_output=True, text=True)
    assert refused.returncode == 2 and "no table to print" in refused.stderr
