"""Side by side in one process: our MAE train step against Hugging Face's ViTMAEForPreTraining, switch by switch.

    contender                         what it runs
    hf fp32 / hf bf16                 transformers' ViTMAEForPreTraining (attn_implementation="sdpa", the same
                                      config and weights layout as ours), torch's AdamW as users build it (foreach)
    ours, plain                       our model with the same kernels: foreach AdamW, fused SDPA attention
    ours + fused AdamW                optim.fused=true (the default)
    ours + bf16                       + train.mixed_precision=bf16, still SDPA attention
    ours + bf16 + explicit attention  + the CPU rule of layers/attention.py (CPU only): our bf16 default
    ours + torch.compile              + train.compile=true (only with compile=true: minutes to compile)

All contenders take the same batch, optimizer recipe (betas 0.9 / 0.95, weight decay 0.05, the MAE
parameter groups) and mask ratio. They are timed in interleaved rounds (every contender once per round,
one untimed step first, then `steps` timed steps), so that a slow minute of the machine hits all of
them alike; the figure is the median over all timed steps. Our contenders share one model (each switch
is a different way to run the same parameters), so memory holds two models, not six.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

from mae_vit.bench.benchmark import BETAS, LR, WEIGHT_DECAY, build_mae, device_name, resolve_device, synchronize
from mae_vit.bench.flops import count_flops
from mae_vit.bench.peaks import peak_for
from mae_vit.errors import ConfigError
from mae_vit.layers import attention
from mae_vit.train.optim import param_groups


@dataclasses.dataclass
class Contender:
    name: str
    precision: str                 # "fp32" | "bf16"
    step: Callable[[], None]       # one train step: forward, backward, optimizer step, zero_grad
    seconds: List[float] = dataclasses.field(default_factory=list)


def hf_mae(model) -> torch.nn.Module:
    """transformers' ViTMAEForPreTraining with the same configuration as our `model` (SDPA attention)."""
    try:
        import transformers
    except ImportError:
        raise ConfigError("--compare hf needs the transformers package (pip install transformers); it is an optional "
                          "benchmark dependency.") from None
    from mae_vit.export.hf import hf_config
    settings = {k: v for k, v in hf_config(model).items() if k not in ("architectures", "model_type")}
    config = transformers.ViTMAEConfig(**settings, attn_implementation="sdpa")
    return transformers.ViTMAEForPreTraining(config)


def _adamw(model, fused: bool) -> torch.optim.Optimizer:
    groups = param_groups(model, WEIGHT_DECAY)
    return torch.optim.AdamW(groups, lr=LR, betas=BETAS, fused=fused or None, foreach=None if fused else True)


def _step(forward: Callable[[], torch.Tensor], optimizer, precision: str, device: torch.device,
          explicit_attention: bool = True) -> Callable[[], None]:
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" \
        else contextlib.nullcontext

    def step():
        attention.EXPLICIT_ON_CPU_BF16 = explicit_attention
        try:
            with autocast():
                loss = forward()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        finally:
            attention.EXPLICIT_ON_CPU_BF16 = True
    return step


def contenders(model, imgs, mask_ratio: float, device: torch.device, *, hf: bool, compile_model: bool,
               bf16: bool) -> List[Contender]:
    """The contenders of the module doc, for `model` (ours, on `device`) and the batch `imgs`."""
    ours = lambda m=model: m(imgs, mask_ratio=mask_ratio)[0]  # noqa: E731
    plain, fused = _adamw(model, fused=False), _adamw(model, fused=True)
    out = [Contender("ours, plain", "fp32", _step(ours, plain, "fp32", device)),
           Contender("ours + fused AdamW", "fp32", _step(ours, fused, "fp32", device))]
    if bf16:
        out.append(Contender("ours + fused AdamW + bf16", "bf16", _step(ours, fused, "bf16", device, False)))
        if device.type == "cpu":
            out.append(Contender("ours + fused AdamW + bf16 + explicit attention", "bf16",
                                 _step(ours, fused, "bf16", device)))
    if compile_model:
        compiled = torch.compile(model)
        precision = "bf16" if bf16 else "fp32"
        out.append(Contender(f"ours, all switches, {precision} + torch.compile", precision,
                             _step(lambda: compiled(imgs, mask_ratio=mask_ratio)[0], fused, precision, device)))
    if hf:
        torch.manual_seed(0)
        peer = hf_mae(model).to(device).train()
        peer.config.mask_ratio = mask_ratio
        peer_opt = _adamw(peer, fused=False)
        forward = lambda: peer(pixel_values=imgs).loss  # noqa: E731
        out.insert(0, Contender("hf fp32", "fp32", _step(forward, peer_opt, "fp32", device)))
        if bf16:
            out.insert(1, Contender("hf bf16", "bf16", _step(forward, peer_opt, "bf16", device)))
    return out


def run_rounds(entries: List[Contender], device: torch.device, rounds: int, steps: int, report=print) -> None:
    """Time every contender in interleaved rounds (one untimed step, then `steps` timed ones each)."""
    for r in range(rounds):
        for c in entries:
            c.step()
            for _ in range(steps):
                synchronize(device)
                start = time.perf_counter()
                c.step()
                synchronize(device)
                c.seconds.append(time.perf_counter() - start)
        medians = (f"{c.name} {len(c.seconds) and statistics.median(c.seconds):.3f} s" for c in entries)
        report(f"round {r + 1}/{rounds}: " + ", ".join(medians))


def compare(model_name: str = "mae_vit_base_patch16", *, batch_size: int = 8, img_size: int = 224,
            mask_ratio: float = 0.75, device: str = "auto", rounds: int = 3, steps: int = 2, hf: bool = True,
            compile_model: bool = False, bf16: Optional[bool] = None, model_options: Optional[dict] = None,
            report=print) -> Dict:
    """Build the contenders, count the step's FLOPs, time the rounds; the JSON-ready result.

    `model_options` are extra create_model options (e.g. depth=2 for a test)."""
    dev = resolve_device(device)
    bf16 = (dev.type == "cpu" or torch.cuda.is_bf16_supported()) if bf16 is None else bf16
    torch.manual_seed(0)
    model = build_mae(model_name, img_size, **(model_options or {})).to(dev).train()
    imgs = torch.randn(batch_size, model.in_chans, img_size, img_size, device=dev)  # (B, C, H, W)
    flops = count_flops(model, imgs, mask_ratio)[0] / batch_size
    entries = contenders(model, imgs, mask_ratio, dev, hf=hf, compile_model=compile_model, bf16=bf16)
    run_rounds(entries, dev, rounds, steps, report)
    name = device_name(dev)
    peaks = {p: peak_for(name, p)[0] if dev.type == "cuda" else None for p in ("bf16", "fp32")}  # fp32: TF32 if on
    rows = []
    for c in entries:
        median = statistics.median(c.seconds)
        peer = next((p for p in entries if p.name == f"hf {c.precision}"), None)
        achieved = flops * batch_size / median
        rows.append({"name": c.name, "precision": c.precision, "step_s_median": median,
                     "images_per_s": batch_size / median, "achieved_flops_per_s": achieved,
                     "mfu": achieved / peaks[c.precision] if peaks[c.precision] else None,
                     "vs_hf": statistics.median(peer.seconds) / median if peer else None})
    return {"kind": "compare", "model": model_name, "device": name, "batch_size": batch_size, "img_size": img_size,
            "mask_ratio": mask_ratio, "rounds": rounds, "steps_per_round": steps, "train_flops_per_image": flops,
            "bf16_peak_flops_per_s": peaks["bf16"], "fp32_peak_flops_per_s": peaks["fp32"], "torch": torch.__version__,
            "rows": rows}


def markdown(result: Dict) -> str:
    """The README table of a compare result (`tools/benchmark.py --table FILE`)."""
    lines = [f"{result['model']}, batch {result['batch_size']}, {result['img_size']} px, "
             f"mask {result['mask_ratio']:g}, {result['device']}, torch {result['torch']}; "
             f"median of {result['rounds']} interleaved rounds x "
             f"{result['steps_per_round']} steps", "",
             "| train step | precision | img/s | vs HF (same precision) | achieved FLOP/s | MFU |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        vs = f"{r['vs_hf']:.2f}x" if r["vs_hf"] else "-"
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else "-"
        lines.append(f"| {r['name']} | {r['precision']} | {r['images_per_s']:.2f} | {vs} | "
                     f"{r['achieved_flops_per_s'] / 1e9:.0f} G | {mfu} |")
    return "\n".join(lines)
