"""Where the MAE train step's cost goes: how it grows with the visible tokens, its activation memory, its operators.

    sweep(...)          images/s, FLOPs and activation memory per image over image sizes x mask ratios
    activation_bytes    what autograd keeps for backward in one forward (each storage once, weights excluded)
    profile_step(...)   the top operators of two train steps by self time (torch.profiler)

The encoder sees only the visible patches, so its cost is proportional to L x (1 - mask ratio); the
decoder always sees all L patches. The sweep shows both: FLOPs and memory fall with the mask ratio,
but not below the decoder's share.
"""

from __future__ import annotations

import statistics
import time
from typing import Dict, List, Optional, Sequence

import torch

from mae_vit.bench.benchmark import (
    BETAS,
    LR,
    WEIGHT_DECAY,
    autocast_factory,
    build_mae,
    device_name,
    resolve_device,
    resolve_precision,
    synchronize,
    train_step,
)
from mae_vit.bench.flops import count_flops
from mae_vit.train.optim import build_optimizer, param_groups


def activation_bytes(model, imgs: torch.Tensor, mask_ratio: float, autocast) -> int:
    """Bytes autograd saves for backward in one forward of `model` on `imgs` (gradients cleared afterwards).

    Each storage counts once; parameters do not count (they exist anyway). Under autocast the bf16
    copies of the weights do count: a forward makes them.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
        loss = model(imgs, mask_ratio=mask_ratio)[0]
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(saved.values())


def sweep(model_name: str = "mae_vit_base_patch16", *, img_sizes: Sequence[int] = (112, 224),
          mask_ratios: Sequence[float] = (0.5, 0.75, 0.9), batch_size: int = 8, device: str = "auto",
          precision: str = "auto", steps: int = 3, model_options: Optional[dict] = None, report=print) -> Dict:
    """Time `steps` train steps (after one untimed) at every image size x mask ratio; the JSON-ready result."""
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)
    autocast = autocast_factory(dev, precision)
    rows: List[Dict] = []
    for size in img_sizes:
        torch.manual_seed(0)
        model = build_mae(model_name, size, **(model_options or {})).to(dev).train()
        optimizer = build_optimizer("adamw", param_groups(model, WEIGHT_DECAY), lr=LR, betas=BETAS, fused=True)
        imgs = torch.randn(batch_size, model.in_chans, size, size, device=dev)  # (B, C, H, W)
        patches = model.patch_embed.num_patches
        for ratio in mask_ratios:
            flops = count_flops(model, imgs, ratio, autocast)[0] / batch_size
            memory = activation_bytes(model, imgs, ratio, autocast) / batch_size
            train_step(model, optimizer, imgs, ratio, autocast)  # untimed: a new token count
            times = []
            for _ in range(steps):
                synchronize(dev)
                start = time.perf_counter()
                train_step(model, optimizer, imgs, ratio, autocast)
                synchronize(dev)
                times.append(time.perf_counter() - start)
            row = {"img_size": size, "mask_ratio": ratio, "patches": patches,
                   "visible": int(patches * (1 - ratio)), "images_per_s": batch_size / statistics.median(times),
                   "train_flops_per_image": flops, "activation_bytes_per_image": memory}
            report(f"{size} px, mask {ratio:g}: {row['visible']}/{patches} patches visible, "
                   f"{row['images_per_s']:.2f} img/s, {flops / 1e9:.1f} GFLOP/img, {memory / 2**20:.1f} MiB/img")
            rows.append(row)
    return {"kind": "sweep", "model": model_name, "device": device_name(dev), "precision": precision,
            "batch_size": batch_size, "steps": steps, "torch": torch.__version__, "rows": rows}


def sweep_markdown(result: Dict) -> str:
    lines = [f"{result['model']}, batch {result['batch_size']}, {result['precision']}, {result['device']}", "",
             "| image | mask ratio | visible patches | img/s | GFLOP/img (train) | activations MiB/img |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['img_size']} px | {r['mask_ratio']:g} | {r['visible']} / {r['patches']} | "
                     f"{r['images_per_s']:.2f} | {r['train_flops_per_image'] / 1e9:.1f} | "
                     f"{r['activation_bytes_per_image'] / 2**20:.1f} |")
    return "\n".join(lines)


def profile_step(model_name: str = "mae_vit_base_patch16", *, batch_size: int = 8, img_size: int = 224,
                 mask_ratio: float = 0.75, device: str = "auto", precision: str = "auto", top: int = 15) -> str:
    """The `top` operators of two train steps (after two untimed) by self time, as torch.profiler prints them."""
    from torch.profiler import ProfilerActivity, profile
    dev = resolve_device(device)
    autocast = autocast_factory(dev, resolve_precision(precision, dev))
    torch.manual_seed(0)
    model = build_mae(model_name, img_size).to(dev).train()
    optimizer = build_optimizer("adamw", param_groups(model, WEIGHT_DECAY), lr=LR, betas=BETAS, fused=True)
    imgs = torch.randn(batch_size, model.in_chans, img_size, img_size, device=dev)
    for _ in range(2):
        train_step(model, optimizer, imgs, mask_ratio, autocast)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            train_step(model, optimizer, imgs, mask_ratio, autocast)
        synchronize(dev)
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=top)
