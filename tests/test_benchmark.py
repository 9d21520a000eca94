"""The train-step benchmark: FLOP counts against a hand count, timing output, CLI exit codes, JSON."""

import json
import runpy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils import flop_counter as torch_flop_counter

from mae_vit.bench import benchmark as bench
from mae_vit.bench import flops, results
from mae_vit.bench.peaks import gpu_peak, peak_for
from mae_vit.config.cli import run_tool
from mae_vit.errors import ConfigError

# a small decoder keeps the tests fast; the encoder is the real tiny ViT (192 wide, 12 blocks, 3 heads)
SMALL_DECODER = {"decoder_embed_dim": 64, "decoder_depth": 2, "decoder_num_heads": 4}
TOOL = Path(__file__).parents[1] / "tools" / "benchmark.py"


@pytest.fixture(autouse=True)
def _one_thread():
    """The test models are tiny: a second thread only adds waiting, badly so when the cores are busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def hand_count(img, patch, chans, width, depth, dec_width, dec_depth, mask_ratio, mlp_ratio=4):
    """FLOPs per image (train, forward, encoder forward) of the MAE, written out layer by layer.

    Linear layers: 2 * tokens * in * out forward, twice that backward (input and weight gradients).
    Patch embedding: the image needs no gradient, so backward is the weight gradient only.
    Attention over T tokens of width W: Q K^T and P V, 2 * T * T * W each forward; backward
    recomputes Q K^T and does four more products (2.5 x forward).
    """
    L = (img // patch) ** 2
    t_enc, t_dec = 1 + int(L * (1 - mask_ratio)), 1 + L
    patch_embed = 2 * L * width * chans * patch * patch

    def block(tokens, w):  # (linear, attention) FLOPs of one transformer block
        linear = 2 * tokens * w * (3 * w + w + 2 * mlp_ratio * w)  # qkv, proj, fc1, fc2
        return linear, 4 * tokens * tokens * w

    enc_lin, enc_att = (depth * f for f in block(t_enc, width))
    dec_lin, dec_att = (dec_depth * f for f in block(t_dec, dec_width))
    dec_lin += 2 * t_enc * width * dec_width + 2 * t_dec * dec_width * patch * patch * chans  # embed, pred
    encoder = patch_embed + enc_lin + enc_att
    forward = encoder + dec_lin + dec_att
    linear, attention = enc_lin + dec_lin, enc_att + dec_att
    train = forward + 2 * linear + patch_embed + 2.5 * attention
    return train, forward, encoder


@pytest.mark.parametrize("mask_ratio", [0.75, 0.0])
def test_benchmark_flops_equal_hand_count_and_timing_is_consistent(mask_ratio):
    r = bench.benchmark_train_step(
        "mae_vit_tiny_patch4", batch_size=2, img_size=16, mask_ratio=mask_ratio, device="cpu", precision="fp32",
        steps=2, warmup=0, model_options=SMALL_DECODER,
    )
    train, forward, encoder = hand_count(16, 4, 3, 192, 12, 64, 2, mask_ratio)
    assert r.train_flops_per_image == train
    assert r.forward_flops_per_image == forward
    assert r.encoder_forward_flops_per_image == encoder
    assert len(r.step_seconds) == 2 and all(t > 0 for t in r.step_seconds)
    assert r.images_per_s > 0
    assert r.images_per_s == pytest.approx(2 / r.step_seconds_median)
    assert r.achieved_flops_per_s == pytest.approx(train * r.images_per_s)
    assert (r.device, r.precision, r.batch_size, r.img_size) == ("cpu (1 thread)", "fp32", 2, 16)
    assert r.peak_memory_kind.startswith("CPU peak RSS growth") and r.peak_memory_bytes >= 0


def test_default_decoder_matches_hand_count_and_paper_scale():
    model = bench.build_mae("mae_vit_tiny_patch4", 32)
    imgs = torch.randn(1, 3, 32, 32)
    counted = bench.count_flops(model, imgs, 0.75)
    assert counted == hand_count(32, 4, 3, 192, 12, 512, 8, 0.75)
    # ViT-B/16 at 224 px with the 8 x 512 decoder: the MAE paper quotes about 56 GFLOPs per training image
    assert hand_count(224, 16, 3, 768, 12, 512, 8, 0.75)[0] == pytest.approx(56e9, rel=0.06)


def test_flops_scale_linearly_with_batch_and_masking_saves_encoder_flops():
    model = bench.build_mae("mae_vit_tiny_patch4", 16, **SMALL_DECODER)
    one = bench.count_flops(model, torch.randn(1, 3, 16, 16), 0.75)
    three = bench.count_flops(model, torch.randn(3, 3, 16, 16), 0.75)
    assert three == tuple(3 * f for f in one)
    unmasked = bench.count_flops(model, torch.randn(1, 3, 16, 16), 0.0)
    assert one[2] < unmasked[2] / 3  # 5 instead of 17 tokens through the encoder
    assert all(p.grad is None for p in model.parameters())  # counting leaves no gradients behind


def test_cpu_attention_is_counted_like_torchs_gpu_kernels():
    q, k, v = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8)
    for t in (q, k, v):
        t.requires_grad_(True)
    with flops.flop_counter() as counter:  # the fused CPU kernel, which torch's own table leaves out
        F.scaled_dot_product_attention(q, k, v).sum().backward()
    q_, kv_ = (2, 3, 10, 8), (2, 3, 6, 8)
    expected = torch_flop_counter.sdpa_flop_count(q_, kv_, kv_) + \
        torch_flop_counter.sdpa_backward_flop_count(q_, q_, kv_, kv_)
    assert counter.get_total_flops() == expected == 7 * (2 * 2 * 3 * 10 * 6 * 8)
    # values narrower than keys: the formula still equals torch's for its GPU kernels
    v_, out_ = (2, 3, 6, 4), (2, 3, 10, 4)
    forward = torch_flop_counter.sdpa_flop_count(q_, kv_, v_)
    backward = torch_flop_counter.sdpa_backward_flop_count(out_, q_, kv_, v_)
    assert flops._attention_flops(q_, kv_, v_) == (forward, backward)


def test_bf16_autocast_on_cpu_counts_the_same_flops():
    r = bench.benchmark_train_step(
        "mae_vit_tiny_patch4", batch_size=1, img_size=16, device="cpu", precision="bf16",
        steps=1, warmup=0, model_options=SMALL_DECODER,
    )
    assert r.precision == "bf16" and r.images_per_s > 0
    assert r.train_flops_per_image == hand_count(16, 4, 3, 192, 12, 64, 2, 0.75)[0]
    from mae_vit.train.device import fast_bf16
    amx = fast_bf16(torch.device("cpu"))
    assert bench.resolve_precision("auto", torch.device("cpu")) == ("bf16" if amx else "fp32")


def test_train_step_updates_weights_and_clears_gradients():
    model = bench.build_mae("mae_vit_tiny_patch4", 16, **SMALL_DECODER)
    optimizer = bench.build_optimizer("adamw", bench.param_groups(model, 0.05), lr=1e-3, betas=(0.9, 0.95))
    before = model.decoder_pred.weight.detach().clone()
    loss = bench.train_step(model, optimizer, torch.randn(2, 3, 16, 16), 0.75, bench.autocast_factory(
        torch.device("cpu"), "fp32"))
    assert torch.isfinite(loss) and not loss.requires_grad
    assert not torch.equal(before, model.decoder_pred.weight)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"mask_ratio": 1.0}, "mask ratio"),
        ({"steps": 0}, "steps"),
        ({"batch_size": 0}, "batch size"),
        ({"device": "tpu"}, "device"),
        ({"precision": "fp8"}, "precision"),
        ({"img_size": 18}, "not divisible"),
        ({"model_name": "vit_tiny_patch4"}, "classifier"),
        ({"model_name": "mae_vit_enormous_patch4"}, "unknown model name"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs, words):
    args = {"model_name": "mae_vit_tiny_patch4", "img_size": 16, "device": "cpu", **kwargs}
    with pytest.raises(ConfigError, match=words):
        bench.benchmark_train_step(**args)


def test_cuda_device_without_gpu_is_a_config_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        bench.resolve_device("cuda")
    assert bench.resolve_device("auto") == torch.device("cpu")


def test_cli_bad_model_name_exits_2(capsys):
    tool = runpy.run_path(str(TOOL))
    with pytest.raises(SystemExit) as exit_info:
        run_tool(tool["main"], ["--model", "mae_vit_nope_patch16"])
    assert exit_info.value.code == 2
    assert "unknown model name 'mae_vit_nope_patch16'" in capsys.readouterr().err


def test_cli_prints_table_and_writes_json(tmp_path, capsys):
    tool = runpy.run_path(str(TOOL))
    out = tmp_path / "sub" / "bench.json"
    argv = ["--model", "mae_vit_tiny_patch8", "--img-size", "16", "--batch-size", "1", "--steps", "1",
            "--warmup", "0", "--device", "cpu", "--json", str(out)]
    result = run_tool(tool["main"], argv)
    table = capsys.readouterr().out.splitlines()
    names = ["model", "params", "device", "precision", "batch", "img size", "mask ratio", "train step",
             "train images/s", "FLOPs/img (train)", "achieved FLOP/s", "MFU", "peak memory", "encoder fwd share"]
    assert [line[:18].strip() for line in table] == names
    assert {line[19] for line in table} != {" "}  # values start in one column
    assert all(line[18] == " " for line in table)
    assert "matmul/conv/sdpa only" in table[9]
    saved = json.loads(out.read_text())
    assert saved["train_flops_per_image"] == result.train_flops_per_image == hand_count(
        16, 8, 3, 192, 12, 512, 8, 0.75)[0]
    assert saved["images_per_s"] == result.images_per_s > 0
    assert saved["batch_size"] == 1 and saved["model"] == "mae_vit_tiny_patch8"


def test_json_to_a_folder_is_refused(tmp_path):
    r = bench.BenchmarkResult("m", 1, 1, "cpu", "fp32", 1, 16, 0.75, False, 0, [1.0], 1.0, 1.0, 1.0, 1.0, 1.0, 1.0,
                              None, "CPU peak RSS growth (ru_maxrss)")
    with pytest.raises(ConfigError, match="folder"):
        results.write_result(r, tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert "n/a" in results.format_table(r)


@pytest.mark.parametrize("name, gpu, bf16, tf32", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.4, 494.7),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756, 378),
    ("NVIDIA H100 NVL", "H100 NVL", 835.5, 417.5),
    ("NVIDIA H200", "H200 SXM", 989.4, 494.7),
    ("NVIDIA H200 NVL", "H200 NVL", 835.5, 417.5),
    ("NVIDIA A100-SXM4-80GB", "A100", 312, 156),
    ("NVIDIA A100 80GB PCIe", "A100", 312, 156),
    ("NVIDIA A10", "A10", 125, 62.5),
    ("NVIDIA L4", "L4", 121, 60),
    ("NVIDIA L40S", "L40S", 362.05, 183),
])
def test_every_gpu_variant_gets_its_own_dense_bf16_and_tf32_peak(name, gpu, bf16, tf32):
    assert gpu_peak(name).gpu == gpu
    assert peak_for(name, "bf16") == (pytest.approx(bf16 * 1e12), f"{gpu} bf16 dense")
    assert peak_for(name, "fp32", tf32=True) == (pytest.approx(tf32 * 1e12), f"{gpu} tf32 dense")
    assert peak_for(name, "fp32", tf32=False)[0] < tf32 * 1e12  # CUDA cores: slower than TF32


def test_gpus_without_bf16_or_tf32_and_unknown_gpus_have_no_such_peak():
    assert peak_for("Tesla V100-SXM2-16GB", "bf16") == (None, "V100 SXM2 has no bf16 tensor cores")
    assert peak_for("Tesla V100-PCIE-32GB", "fp16")[0] == pytest.approx(112e12)
    assert peak_for("Tesla T4", "fp32", tf32=True) == (pytest.approx(8.1e12), "T4 fp32 CUDA cores")
    assert peak_for("NVIDIA A10G", "bf16") == (None, "no peak known for 'NVIDIA A10G'")
    assert gpu_peak("NVIDIA GeForce RTX 4090") is None


def test_the_table_gives_the_mfu_of_a_gpu_run_against_its_peak():
    r = bench.BenchmarkResult("m", 1, 1, "NVIDIA H100 PCIe", "fp32", 1, 16, 0.75, False, 0, [1.0], 1.0, 1.0, 1.0, 1.0,
                              1.0, 189e12, None, "n/a", peak_flops_per_s=378e12, peak_kind="H100 PCIe tf32 dense",
                              mfu=0.5)
    assert "50.0% of 378.00 TFLOP/s  [H100 PCIe tf32 dense]" in results.format_table(r)
