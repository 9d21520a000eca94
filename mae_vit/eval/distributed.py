"""Cross-process reductions for evaluation when each process holds a different share of the samples.

The mae_vit shard loaders split the data by rank themselves (each sample read by exactly one process,
no padding duplicates), so ranks can see different numbers of samples and even of batches. Per-batch
collectives would then hang; instead each process accumulates locally and these functions combine the
results once, at the end. With a single process (or no accelerator) they return their input.
"""

from __future__ import annotations

import torch

from mae_vit.errors import StoppedBySignal


def sum_across_processes(accelerator, values: list[float]) -> list[float]:
    """Element-wise sum of a list of numbers over all processes (float64, so counts stay exact)."""
    if accelerator is None or accelerator.num_processes == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(t, reduction="sum").cpu().tolist()


def stop_if_asked(accelerator, should_stop, stopped: bool, what: str) -> None:
    """After a loop over batches that asked `should_stop()` before each (`stopped`: this process broke off): every
    process hears whether any stopped (one collective, only when `should_stop` was given), and all raise
    `StoppedBySignal` if one did. Shares differ in length, so the loops themselves cannot agree batch by batch."""
    if should_stop is not None and sum_across_processes(accelerator, [float(stopped)])[0] > 0:
        raise StoppedBySignal(f"a stop signal arrived during {what}, which stopped unfinished")


def gather_rows(accelerator, x: torch.Tensor, on_device: bool = False) -> torch.Tensor:
    """Concatenate every process's `x` along dim 0 (rank 0's rows first); row counts may differ.

    `x` is (n,) or (n, D). A process that saw nothing may pass an empty (0,) or (0, 0) tensor of the
    same dtype; the width D is taken from the processes that have rows. Returned on the CPU, or on the
    accelerator's device with `on_device` (no host copy: what a kNN on the GPU wants).
    """
    if accelerator is None or accelerator.num_processes == 1:
        return x.to(accelerator.device) if on_device and accelerator is not None else x.cpu()
    device = accelerator.device
    flat = x.ndim == 1
    x2 = (x.unsqueeze(1) if flat else x).to(device)  # (n, D)
    sizes = accelerator.gather(torch.tensor([[x2.shape[0], x2.shape[1]]], device=device)).cpu()  # (world, 2)
    # same padded shape on every process; at least 1 x 1 so that no collective moves an empty tensor
    rows, width = max(int(sizes[:, 0].max()), 1), max(int(sizes[:, 1].max()), 1)
    padded = torch.zeros(rows, width, dtype=x2.dtype, device=device)  # (rows, W)
    if x2.numel():
        padded[: x2.shape[0], : x2.shape[1]] = x2
    everything = accelerator.gather(padded).view(len(sizes), rows, width)  # (world, rows, W)
    everything = everything if on_device else everything.cpu()
    out = torch.cat([everything[r, : int(sizes[r, 0])] for r in range(len(sizes))])  # (sum n, W)
    out = out[:, : int(sizes[:, 1].max())]
    return out.squeeze(1) if flat else out
