"""Does the loader keep the model fed? The shard loader alone (read, decode, augment, batch), in images/s.

For each worker count the pretraining loader (`make_loader` with the pretraining transform at
`img_size`, shuffled, as training builds it) runs for `seconds` after its first batch (which pays
for starting the workers and filling the shuffle buffer) or until one epoch ends. Per worker: the
rate divided by the number of workers (worker count 0 = the main process alone, counted as one).
With `gpu_decode` (a device name) the loader is `data.gpu_decode`'s: the workers read and the main
process decodes, crops and flips each batch on that device (timed to the end of the batch's work).
The verdict compares the best rate, and the rate 16 workers would give at the measured per-worker
rate, with the train step's images/s: below it, training waits for data.

`epoch_boundary` (run for the largest worker count): the stall from the last batch of an epoch to the
first of the next, over the first shards (about three batches per worker, so that an epoch is short), with a new loader
per epoch (workers forked again) and with one loader whose workers are kept (what training does).
"""

from __future__ import annotations

import statistics
import time
from types import SimpleNamespace
from typing import Dict, Optional, Sequence

import torch
from omegaconf import OmegaConf

from mae_vit.config.schema import TrainDataConfig
from mae_vit.data import expand_urls, make_loader, read_index
from mae_vit.data.urls import shard_sample_counts
from mae_vit.errors import DataError
from mae_vit.train.batches import GpuDecodeBatches, transform_for

PROJECTED_WORKERS = 16


def loader_rate(urls: str, *, img_size: int, in_chans: int, batch_size: int, num_workers: int,
                seconds: float, gpu_decode: Optional[str] = None) -> Dict:
    """Images/s of the pretraining loader over `urls` with `num_workers` workers (see the module doc)."""
    options, cfg = _pretrain_loader_options(img_size, in_chans, batch_size, num_workers)
    if gpu_decode:
        device = torch.device(gpu_decode)
        place = SimpleNamespace(device=device, process_index=0, num_processes=1)
        loader = GpuDecodeBatches(urls, cfg, accelerator=place, img_size=img_size, labels=False).batches(0)
    else:
        device = None
        loader = make_loader(urls, **options)
    images, start = 0, None
    for batch in loader:
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)  # the batch's decode and crops are done
        if start is None:  # the first batch pays for worker start-up
            start = time.perf_counter()
            continue
        images += batch["image"].shape[0]
        if time.perf_counter() - start >= seconds:
            break
    if start is None or images == 0:
        raise DataError(f"the loader over {urls} gave fewer than two batches of {batch_size}; give more data or a "
                        "smaller --batch-size to measure it.")
    rate = images / (time.perf_counter() - start)
    return {"workers": num_workers, "images_per_s": rate, "images_per_s_per_worker": rate / max(num_workers, 1),
            "images": images}


def _pretrain_loader_options(img_size: int, in_chans: int, batch_size: int, num_workers: int) -> dict:
    """make_loader's options for the pretraining loader (as training builds it) and its config."""
    data = OmegaConf.structured(TrainDataConfig(batch_size=batch_size, num_workers=num_workers,
                                                mean=[0.5] * in_chans, std=[0.5] * in_chans))  # the speed is the same
    cfg = OmegaConf.create({"model": {"img_size": img_size, "in_chans": in_chans}, "data": data,
                            "train": {"seed": 0}})
    return dict(transform=transform_for(cfg, "pretrain"), batch_size=batch_size, num_workers=num_workers,
                in_chans=in_chans, shuffle=True, shuffle_buffer=data.shuffle_buffer, with_labels=False,
                drop_last=True), cfg


def _first_shards(urls: str, samples: int, at_least: int) -> list[str]:
    """The first shards of `urls` that hold `samples` samples, and at least `at_least` of them (when there are)."""
    shards, total = [], 0
    for url in expand_urls(urls):
        if len(shards) >= at_least and total >= samples:
            break
        shards.append(url)
        total += shard_sample_counts([url])[0]
    return shards


def epoch_boundary(urls: str, *, img_size: int, in_chans: int, batch_size: int, num_workers: int,
                   epochs: int = 3) -> Dict:
    """Median seconds from the last batch of an epoch to the first of the next, new loader vs kept workers,
    and the median seconds between batches inside an epoch (with kept workers) to compare them with."""
    shards = _first_shards(urls, max(num_workers, 1) * 3 * batch_size, max(num_workers, 1))
    options, _ = _pretrain_loader_options(img_size, in_chans, batch_size, num_workers)
    kept = make_loader(shards, persistent_workers=True, **options)
    passes = {"new_loader_s": lambda epoch: make_loader(shards, epoch=epoch, **options), "kept_workers_s": kept.epoch}
    result = {"workers": num_workers, "shards": len(shards), "boundaries": epochs - 1}
    for name, epoch_batches in passes.items():
        gaps, intervals, last = [], [], None
        for epoch in range(epochs):
            for i, _ in enumerate(epoch_batches(epoch)):
                now = time.perf_counter()
                if last is not None:
                    (gaps if i == 0 else intervals).append(now - last)
                last = now
        if len(gaps) < epochs - 1 or not intervals:
            raise DataError(f"an epoch of {shards} gave fewer than two batches of {batch_size}: give a smaller "
                            "--batch-size to measure the epoch boundary.")
        result[name], result["batch_interval_s"] = statistics.median(gaps), statistics.median(intervals)
    return result


def loader_speed(urls: str, *, img_size: int = 224, in_chans: int = 3, batch_size: int = 64,
                 workers: Sequence[int] = (0, 1, 2), seconds: float = 10.0, step_images_per_s: Optional[float] = None,
                 gpu_decode: Optional[str] = None, report=print) -> Dict:
    """`loader_rate` for each worker count, and the verdict against `step_images_per_s` when given."""
    expand_urls(urls)  # a missing path is a clear error before any worker starts
    index = read_index(urls) or {}
    rows = []
    for n in workers:
        row = loader_rate(urls, img_size=img_size, in_chans=in_chans, batch_size=batch_size, num_workers=n,
                          seconds=seconds, gpu_decode=gpu_decode)
        report(f"loader, {n} worker(s): {row['images_per_s']:.0f} img/s "
               f"({row['images_per_s_per_worker']:.0f} per worker)")
        rows.append(row)
    boundary = None
    if max(workers) > 0 and not gpu_decode:
        boundary = epoch_boundary(urls, img_size=img_size, in_chans=in_chans, batch_size=batch_size,
                                  num_workers=max(workers))
        report(f"epoch boundary, {boundary['workers']} worker(s): {boundary['new_loader_s']:.3f} s with a new loader "
               f"per epoch, {boundary['kept_workers_s']:.3f} s with its workers kept (between batches: "
               f"{boundary['batch_interval_s']:.3f} s)")
    best = max(r["images_per_s"] for r in rows)
    per_worker = max(r["images_per_s_per_worker"] for r in rows if r["workers"] > 0) if any(
        r["workers"] for r in rows) else rows[0]["images_per_s"]
    result = {"kind": "data", "urls": urls, "gpu_decode": gpu_decode, "img_size": img_size, "batch_size": batch_size,
              "rows": rows, "epoch_boundary": boundary,
              "samples": index.get("num_samples"), "best_images_per_s": best,
              f"projected_images_per_s_{PROJECTED_WORKERS}_workers": per_worker * PROJECTED_WORKERS,
              "step_images_per_s": step_images_per_s, "verdict": None}
    if step_images_per_s:
        projected = per_worker * PROJECTED_WORKERS
        result["verdict"] = ("compute-bound" if best >= step_images_per_s else
                             "data-bound here; compute-bound with 16 workers" if projected >= step_images_per_s else
                             "data-bound")
        report(f"verdict: {result['verdict']} (train step {step_images_per_s:.1f} img/s, loader {best:.0f} img/s here, "
               f"~{projected:.0f} img/s with {PROJECTED_WORKERS} workers)")
    return result
