"""The device side of a run: what mixed_precision=auto picks on which GPU, and resuming across precisions.

No GPU here: the GPU's answers are monkeypatched torch.cuda functions; the GradScaler is a CPU one.
"""

import logging
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from mae_vit.train import device as dev
from mae_vit.train.device import auto_precision, fast_bf16, load_state


@pytest.fixture
def fresh_state():
    AcceleratorState._reset_state(True)  # Accelerate keeps one state per process
    yield
    AcceleratorState._reset_state(True)


def prepared(seed):
    torch.manual_seed(seed)
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 2)
    return accelerator, *accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=0.1))


def test_an_fp16_resume_from_a_checkpoint_without_a_scaler_loads_the_rest_and_keeps_a_fresh_scaler(
        tmp_path, fresh_state, caplog):
    accelerator, model, _ = prepared(0)
    accelerator.save_state(str(tmp_path / "bf16"))  # no scaler: as bf16 and fp32 runs save
    assert not (tmp_path / "bf16" / "scaler.pt").exists()
    AcceleratorState._reset_state(True)
    accelerator, other, _ = prepared(1)
    accelerator.scaler = scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)  # what fp16 makes
    with caplog.at_level(logging.INFO, logger="mae_vit"):
        load_state(accelerator, tmp_path / "bf16")
    assert torch.equal(other.weight, model.weight)  # the weights came back
    assert accelerator.scaler is scaler and scaler.get_scale() == 1024.0  # fresh, and still in use
    assert "no scaler.pt" in caplog.text and "fresh GradScaler" in caplog.text


def test_an_fp16_checkpoint_restores_its_scalers_state(tmp_path, fresh_state):
    accelerator, _, _ = prepared(0)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=64.0, growth_interval=7)
    accelerator.save_state(str(tmp_path / "fp16"))
    assert (tmp_path / "fp16" / "scaler.pt").exists()
    AcceleratorState._reset_state(True)
    accelerator, _, _ = prepared(1)
    accelerator.scaler = scaler = torch.amp.GradScaler("cpu", init_scale=2.0)
    load_state(accelerator, tmp_path / "fp16")
    assert scaler.get_scale() == 64.0 and scaler.get_growth_interval() == 7


def gpu(monkeypatch, major, emulated_bf16=True):
    """A machine whose GPUs have compute capability `major`.x; the calls that would touch a device are recorded."""
    touched = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)

    def properties(device=None):
        touched.append(torch.device("cuda", device) if isinstance(device, int) else torch.device(device))
        return SimpleNamespace(major=major, minor=0, name=f"sm_{major}0")
    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: emulated_bf16)  # makes a tensor
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.version, "hip", None)
    return touched


@pytest.mark.parametrize("major, expected", [(9, "bf16"), (8, "bf16"), (7, "fp16"), (6, "fp16")])
def test_auto_precision_is_bf16_from_ampere_on_and_fp16_with_loss_scaling_before(monkeypatch, major, expected):
    touched = gpu(monkeypatch, major)  # V100 (7.0), T4 (7.5): bf16 only emulated, fp16 tensor cores
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert auto_precision() == expected
    assert fast_bf16(torch.device("cuda", 3)) == (expected == "bf16")
    assert touched and set(touched) == {torch.device("cuda", 3)}  # the process's own GPU, never cuda:0


def test_auto_precision_without_a_gpu_is_bf16_only_with_amx(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert auto_precision() == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert auto_precision() == "no"


def test_the_own_device_follows_the_launchers_local_rank(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert dev.own_cuda_device() == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "5")
    assert dev.own_cuda_device() == torch.device("cuda", 5)
