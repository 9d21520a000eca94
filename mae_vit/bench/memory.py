"""On paper: the batch per GPU that fits MAE pretraining and fine-tuning of ViT-B/L/H at 224 px, with and
without activation checkpointing (`model.grad_checkpointing`, encoder and decoder blocks).

Activation bytes per image come from what `costs.activation_bytes` measures autograd keeping, per token
per channel of one Transformer block (fused SDPA attention saves q, k, v, its output and the log-sum-exp;
no attention matrix): 36 bytes under bf16 autocast (the fp32 residual stream at the two LayerNorms, bf16
elsewhere), 64 in fp32; `tests/test_memory.py` checks both constants against a measurement. Outside the
blocks: the loss's fp32 patch tensors (about 6 x 4 bytes per pixel value), the final norms, decoder
embedding and prediction inputs, the image's bf16 copy. With checkpointing a block keeps only its fp32
input (4 bytes per token per channel) and one block at a time is recomputed in backward.

Fixed memory: fp32 weights, gradients and two AdamW moments (16 bytes per parameter) and the bf16 weight
copies autocast makes (2). What is left of the GPU (less 1.5 GiB for the CUDA context and cuBLAS / cuDNN
workspaces, and 10% for the caching allocator's fragmentation) divided by the bytes per image is the batch.
These are estimates to size a first run; the GPU check measures the real peak.
"""

from __future__ import annotations

import torch

from mae_vit.models import create_model

BLOCK_BYTES = {"bf16": 36, "fp32": 64}  # per token per channel of one block, what autograd keeps
GIB = 2**30
GPUS = {"80GB": 79.1 * GIB, "141GB": 139.8 * GIB}  # what torch reports on an H100 80GB / an H200
MODELS = {"ViT-B/16": "vit_base_patch16", "ViT-L/16": "vit_large_patch16", "ViT-H/14": "vit_huge_patch14"}


def _params(name: str) -> tuple[torch.nn.Module, int]:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = create_model(name, img_size=224)
    return model, sum(p.numel() for p in model.parameters())


def activation_bytes_per_image(name: str, task: str, precision: str = "bf16", checkpointing: bool = False,
                               mask_ratio: float = 0.75) -> tuple[float, int]:
    """(activation bytes one image needs in training, parameters) for `task` pretrain (the MAE `mae_<name>`) or
    finetune (the classifier `<name>`) at 224 px."""
    c = BLOCK_BYTES[precision]
    model, params = _params(("mae_" if task == "pretrain" else "") + name)
    L, D = model.patch_embed.num_patches, model.embed_dim
    pixels = 3 * 224 * 224
    stacks = []  # (blocks, tokens, width)
    if task == "pretrain":
        te, td, Dd = 1 + int(L * (1 - mask_ratio)), 1 + L, model.decoder_embed_dim
        stacks = [(len(model.blocks), te, D), (len(model.decoder_blocks), td, Dd)]
        other = 6 * 4 * pixels + 6 * D * te + 6 * Dd * td + 2 * pixels
    else:
        stacks = [(len(model.blocks), 1 + L, D)]
        other = 2 * pixels + 6 * D * (1 + L)
    if checkpointing:
        kept = sum(n * 4 * t * w for n, t, w in stacks) + max(c * t * w for _, t, w in stacks)
    else:
        kept = sum(n * c * t * w for n, t, w in stacks)
    return kept + other, params


def batch_that_fits(memory_bytes: float, per_image: float, params: int) -> int:
    """Images per GPU: (memory - context - optimizer state - bf16 weights) x 0.9 / bytes per image."""
    free = (memory_bytes - 1.5 * GIB - 18 * params) * 0.9
    return max(int(free // per_image), 0)


def fit_table(precision: str = "bf16") -> list[dict]:
    """Per model and task: activation MiB per image and the batch on each GPU, without and with checkpointing."""
    rows = []
    for label, name in MODELS.items():
        for task in ("pretrain", "finetune"):
            row = {"model": label, "task": task}
            for ckpt, suffix in ((False, ""), (True, "_ckpt")):
                per_image, params = activation_bytes_per_image(name, task, precision, ckpt)
                row["params_M"] = params / 1e6
                row["act_MiB_per_image" + suffix] = per_image / 2**20
                for gpu, size in GPUS.items():
                    row[f"batch_{gpu}{suffix}"] = batch_that_fits(size, per_image, params)
            rows.append(row)
    return rows


def fit_markdown(rows: list[dict]) -> str:
    lines = ["| model | task | params | act. MiB/img | batch 80 GB | batch 141 GB | act. MiB/img, ckpt | "
             "batch 80 GB, ckpt | batch 141 GB, ckpt |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['task']} | {r['params_M']:.0f} M | {r['act_MiB_per_image']:.1f} | "
                     f"{r['batch_80GB']} | {r['batch_141GB']} | {r['act_MiB_per_image_ckpt']:.1f} | "
                     f"{r['batch_80GB_ckpt']} | {r['batch_141GB_ckpt']} |")
    return "\n".join(lines)
