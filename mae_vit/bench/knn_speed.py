"""The kNN evaluation at scale: a (bank x D) memory bank against (queries x D) features, as the end-of-run
encoder check, the kNN monitor and the sweep run it. `python tools/benchmark.py knn=true`.

Two ways are timed on the benchmark's device, on the same random features:
- "one process, whole batch of 1024 queries": the similarity of 1024 queries against the whole bank at a
  time (what every process did before the kNN was bounded and shared);
- "bounded chunks": `knn_classify` as it runs now, its similarity matrix at most MAX_SIM_ELEMENTS.
With P processes each now scores 1/P of the queries; the time per process divides accordingly (`per_process`).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from mae_vit.bench.benchmark import device_name, synchronize
from mae_vit.eval import knn

UNBOUNDED_CHUNK = 1024  # queries per chunk before the bound: a (1024, bank) similarity matrix


def _unbounded(bank: torch.Tensor, labels: torch.Tensor, queries: torch.Tensor, classes: int, k: int) -> None:
    train = F.normalize(bank, dim=1)
    for start in range(0, queries.shape[0], UNBOUNDED_CHUNK):
        sim, idx = (F.normalize(queries[start:start + UNBOUNDED_CHUNK], dim=1) @ train.T).topk(k, dim=1)
        torch.zeros(sim.shape[0], classes, device=bank.device).scatter_add_(1, labels[idx], (sim / 0.07).exp())


def knn_speed(device: torch.device, bank: int = 200_000, queries: int = 10_000, dim: int = 768,
              classes: int = 1000, k: int = 20, processes: int = 8) -> dict:
    """Seconds and the largest similarity matrix (bytes) of both ways; see the module doc."""
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(bank, dim, generator=g).to(device)
    labels = torch.randint(0, classes, (bank,), generator=g).to(device)
    q = torch.randn(queries, dim, generator=g).to(device)
    rows = []
    for name, fn, chunk_rows in (
            ("one process, 1024 queries at a time", lambda: _unbounded(feats, labels, q, classes, k),
             min(UNBOUNDED_CHUNK, queries)),
            ("bounded chunks", lambda: knn.knn_classify(feats, labels, q, num_classes=classes, k=k),
             max(1, min(1024, queries, knn.MAX_SIM_ELEMENTS // bank)))):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        shared = processes if "bounded" in name else 1  # before, every process scored every query
        rows.append({"way": name, "seconds": seconds, "similarity_bytes": chunk_rows * bank * 4,
                     "peak_device_bytes": peak, "per_process_seconds": seconds / shared})
    return {"kind": "knn", "device": device_name(device), "bank": bank, "queries": queries, "dim": dim,
            "processes": processes, "rows": rows}


def knn_markdown(result: dict) -> str:
    lines = [f"kNN: bank {result['bank']:,} x {result['dim']}, {result['queries']:,} queries, {result['device']}", "",
             f"| way | seconds | largest similarity matrix | seconds per process with {result['processes']} |",
             "|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['way']} | {r['seconds']:.2f} | {r['similarity_bytes'] / 2**20:,.0f} MiB "
                     f"| {r['per_process_seconds']:.2f} |")
    return "\n".join(lines)
