"""Peak FLOP/s of GPUs, for MFU (model FLOPs utilisation = achieved FLOP/s / the peak of the precision run).

Dense peaks (no 2:4 sparsity) from the vendor's data sheets, per GPU: tensor-core bf16 and fp16, tensor-core
TF32, and plain fp32 (CUDA cores). The sheets print the sparse tensor figures; dense is half of them. Names
are matched as `torch.cuda.get_device_name` spells them ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe",
"NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA H200 NVL", "NVIDIA A100-SXM4-80GB", "Tesla V100-SXM2-16GB"), the
variants first: an H100 PCIe or NVL must not get the SXM peak, nor an A10 the A100's.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Optional

import torch

T = 1e12


class Peak(NamedTuple):
    gpu: str                # the data sheet's name
    bf16: Optional[float]   # FLOP/s; None where the GPU has no bf16 tensor cores
    fp16: float
    tf32: Optional[float]   # None where the GPU has no TF32 (before Ampere)
    fp32: float


# (pattern on the device name, its peaks), the first match wins: variants before the plain name
PEAKS: list[tuple[str, Peak]] = [
    (r"\bH100\b.*\bNVL\b", Peak("H100 NVL", 835.5 * T, 835.5 * T, 417.5 * T, 60 * T)),
    (r"\bH100\b.*\bPCIe\b", Peak("H100 PCIe", 756 * T, 756 * T, 378 * T, 51 * T)),
    (r"\bGH200\b", Peak("GH200 (H100 SXM class)", 989.4 * T, 989.4 * T, 494.7 * T, 67 * T)),
    (r"\bH200\b.*\bNVL\b", Peak("H200 NVL", 835.5 * T, 835.5 * T, 417.5 * T, 60 * T)),
    (r"\bH200\b", Peak("H200 SXM", 989.4 * T, 989.4 * T, 494.7 * T, 67 * T)),
    (r"\bH100\b", Peak("H100 SXM", 989.4 * T, 989.4 * T, 494.7 * T, 67 * T)),
    (r"\bA100\b", Peak("A100", 312 * T, 312 * T, 156 * T, 19.5 * T)),  # SXM and PCIe alike
    (r"\bL40S\b", Peak("L40S", 362.05 * T, 362.05 * T, 183 * T, 91.6 * T)),
    (r"\bL40\b", Peak("L40", 181.05 * T, 181.05 * T, 90.5 * T, 90.5 * T)),
    (r"\bL4\b", Peak("L4", 121 * T, 121 * T, 60 * T, 30.3 * T)),
    (r"\bA10\b", Peak("A10", 125 * T, 125 * T, 62.5 * T, 31.2 * T)),
    (r"\bV100\b.*\bPCIE\b", Peak("V100 PCIe", None, 112 * T, None, 14 * T)),
    (r"\bV100\b", Peak("V100 SXM2", None, 125 * T, None, 15.7 * T)),
    (r"\bT4\b", Peak("T4", None, 65 * T, None, 8.1 * T)),
]


def gpu_peak(name: str) -> Optional[Peak]:
    """The peaks of the GPU `torch.cuda.get_device_name` calls `name`; None for one not in the table."""
    return next((peak for pattern, peak in PEAKS if re.search(pattern, name, re.IGNORECASE)), None)


def tf32_matmuls() -> bool:
    """Whether fp32 matmuls run on TF32 tensor cores now (train.tf32, or float32_matmul_precision high/medium)."""
    return torch.get_float32_matmul_precision() != "highest" or bool(torch.backends.cuda.matmul.allow_tf32)


def peak_for(name: str, precision: str, tf32: Optional[bool] = None) -> tuple[Optional[float], str]:
    """(the peak FLOP/s that `precision` (bf16 | fp16 | fp32) runs at on GPU `name`, what it is), e.g.
    (989.4e12, "H100 SXM bf16 dense"); fp32 rows count the TF32 peak when `tf32` (default: as torch is set
    now), else the CUDA cores'. (None, why) for a GPU not in the table or a precision it lacks."""
    peak = gpu_peak(name)
    if peak is None:
        return None, f"no peak known for {name!r}"
    if precision == "fp32":
        tf32 = tf32_matmuls() if tf32 is None else tf32
        kind = "tf32" if tf32 and peak.tf32 else "fp32"
    else:
        kind = precision
    value = getattr(peak, kind, None)
    if value is None:
        return None, f"{peak.gpu} has no {precision} tensor cores"
    return value, f"{peak.gpu} {kind} {'dense' if kind != 'fp32' else 'CUDA cores'}"
