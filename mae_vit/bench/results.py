"""A benchmark's result for people and files: the terminal table of a train step, and the JSON that
`--json` writes and `--table` reads back."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from mae_vit import files
from mae_vit.bench.benchmark import BenchmarkResult
from mae_vit.errors import ConfigError


def _si(value: float, unit: str = "") -> str:
    """1.23e10 -> '12.30 G' (+ unit)."""
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {prefix}{unit}"
    return f"{value:.2f} {unit}".rstrip()


def format_table(r: BenchmarkResult) -> str:
    """The result as an aligned two-column table (one quantity a line) for the terminal."""
    memory = "n/a" if r.peak_memory_bytes is None else f"{r.peak_memory_bytes / 2**20:.0f} MiB"
    share = r.encoder_forward_flops_per_image / r.forward_flops_per_image if r.forward_flops_per_image else 0.0
    rows = [
        ("model", r.model + (" (torch.compile)" if r.compiled else "")),
        ("params", f"{r.params / 1e6:.2f} M ({r.trainable_params / 1e6:.2f} M trainable)"),
        ("device", r.device),
        ("precision", r.precision + (" autocast" if r.precision == "bf16" else "")),
        ("batch", str(r.batch_size)),
        ("img size", f"{r.img_size} px"),
        ("mask ratio", f"{r.mask_ratio:g}"),
        ("train step", f"{r.step_seconds_median * 1e3:.1f} ms median of {len(r.step_seconds)} "
                       f"(after {r.warmup} warmup)"),
        ("train images/s", f"{r.images_per_s:.2f}"),
        ("FLOPs/img (train)", _si(r.train_flops_per_image, "FLOP") + f"  [{r.flop_note}]"),
        ("achieved FLOP/s", _si(r.achieved_flops_per_s, "FLOP/s")),
        ("MFU", (f"{r.mfu:.1%} of " + _si(r.peak_flops_per_s, "FLOP/s") if r.mfu else "n/a") + f"  [{r.peak_kind}]"),
        ("peak memory", f"{memory}  [{r.peak_memory_kind}]"),
        ("encoder fwd share", f"{share:.1%} of forward FLOPs "
                              f"({_si(r.encoder_forward_flops_per_image)} of {_si(r.forward_flops_per_image)})"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def write_result(result: "BenchmarkResult | dict", path: "str | os.PathLike[str]") -> None:
    """Write the result (a BenchmarkResult or another mode's dict) as JSON to `path` (atomically)."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise ConfigError(f"--json {path}: that is a folder; give a file name such as {Path(path) / 'bench.json'}.")
    files.write_json(target, result if isinstance(result, dict) else dataclasses.asdict(result))


def read_result(path: "str | os.PathLike[str]") -> dict:
    """A --compare or sweep=true JSON file, for --table; ConfigError for anything else."""
    try:
        result = json.loads(Path(path).expanduser().read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--table {path}: cannot read it as JSON ({e}).") from None
    if not isinstance(result, dict) or result.get("kind") not in ("compare", "sweep", "knn"):
        raise ConfigError(f"--table {path}: not a file written by --compare, sweep=true or knn=true with --json, so "
                          "there is no table to print.")
    return result
