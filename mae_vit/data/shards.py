"""Read WebDataset tar shards as a PyTorch IterableDataset and DataLoader, for one or many ranks.

Splitting (details in `mae_vit.data.split`): shards are shuffled by (seed, epoch) identically on every
rank, dealt to ranks, then to DataLoader workers. With at least world_size x num_workers shards each
process reads whole shards; with fewer, processes read shared shards and keep every n-th sample
(sample-level split), so an epoch reads every sample exactly once either way. Within a process the
samples pass a shuffle buffer seeded by (seed, epoch, rank, worker); `shuffle=False` keeps file order.

Pipeline per process: read tar members (webdataset's tar iteration) -> group into samples -> keep
this process's samples -> shuffle buffer -> skip (resume) -> decode image (PIL, to "RGB" or "L" by
in_chans) and label (`cls` text) -> transform -> yield.

Bad data never stops a run: a sample that cannot be decoded (corrupt bytes, no image, bad label)
and a shard that cannot be read (missing, not a tar, truncated) are skipped, logged (a warning per
bad shard; per bad sample up to a few) and COUNTED. Samples lost inside a damaged shard are counted
when the shard index says how many there should be. The counts travel in band with the data, since
decoding runs in DataLoader worker processes: each worker batches its own samples (as a DataLoader
does anyway) and every batch carries `skipped` (samples) and `skipped_shards` counted since the
worker's previous batch; what is left when the worker ends comes as a count-only record
`{"skipped": n, "skipped_shards": m}`, which `ShardLoader` folds into a neighbouring batch (it holds
one batch back for that). So the batches of an epoch add up to every skip of the epoch -- unless the
rank got no batch at all, in which case the counts are only logged.

Batches (from `make_loader`, in `mae_vit.data.loader`) are plain dicts: `image` float (B, C, H, W),
`label` long (B,) when with_labels, `key` list[str], `skipped` int, `skipped_shards` int. With
`keep_jpeg` (data.gpu_decode) JPEG members are not decoded: the batch has `encoded`, a list of B
tensors, each the JPEG's bytes (1-D uint8) or, for other formats, the transform's output;
`mae_vit.data.gpu_decode` finishes them.
"""

from __future__ import annotations

import io
import itertools
import logging
import random
from typing import Callable, Iterator

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from torchvision.transforms.v2 import functional as TF

from mae_vit.data.epoch_state import EpochState, resume_point, seed_worker
from mae_vit.data.remote import shard_samples
from mae_vit.data.split import assign, kept_in_range
from mae_vit.data.transforms import to_8bit
from mae_vit.data.urls import expand_urls, read_index, shard_sample_counts
from mae_vit.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm", "pgm", "pnm", "tif", "tiff", "gif")
_MAX_SAMPLE_WARNINGS = 5


class _SkipCounter:
    """Skips counted in one worker since its last yield."""

    def __init__(self):
        self.samples = 0
        self.shards = 0

    def drain(self) -> tuple[int, int]:
        counts = (self.samples, self.shards)
        self.samples = self.shards = 0
        return counts


def _check_common(rank: int, world_size: int, in_chans: int, shuffle_buffer: int) -> None:
    if not isinstance(world_size, int) or world_size < 1 or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ConfigError(
            f"rank must be in [0, world_size) and world_size >= 1; got rank={rank}, world_size={world_size}."
        )
    if in_chans not in (1, 3):
        raise ConfigError(f"in_chans must be 1 (grey) or 3 (RGB), got {in_chans!r}.")
    if not isinstance(shuffle_buffer, int) or shuffle_buffer < 0:
        raise ConfigError(f"shuffle_buffer must be an integer >= 0, got {shuffle_buffer!r}.")


class ShardDataset(IterableDataset):
    """This rank's share of the shards, as batches (batch_size set) or single samples (batch_size None).

    Yields batch dicts (see module doc) or samples `{"image", "label"?, "key", "skipped",
    "skipped_shards"}`, and possibly a final count-only record `{"skipped", "skipped_shards"}` (see
    module doc; `ShardLoader` and `collate_samples` handle it). urls: a spec for `expand_urls` (or a
    list of them). transform: PIL image -> tensor (default: float in [0, 1]). With batch_size, each
    worker makes its own batches and drop_last drops its last partial one.

    skip_batches (resume inside an epoch): leave out the first `skip_batches` batches the DataLoader
    (with this batch_size and drop_last) would have returned this epoch; the rest come in the same
    order when no sample of the skipped part was bad. Augmentation randomness is not replayed.

    num_classes (the model's): a label outside [0, num_classes) makes its sample bad (skipped and counted), as
    a label beyond the index's classes does; shards without an index are checked against it alone.
    """

    def __init__(
        self,
        urls: str | list[str],
        *,
        transform: Callable | None = None,
        in_chans: int = 3,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        epoch: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        with_labels: bool = True,
        skip_batches: int = 0,
        batch_size: int | None = None,
        drop_last: bool = True,
        keep_jpeg: bool = False,
        num_classes: int | None = None,
    ):
        _check_common(rank, world_size, in_chans, shuffle_buffer)
        self.urls = expand_urls(urls)
        index = read_index(self.urls)
        # Expected samples per shard (None without an index): detects truncated shards, counts lost samples.
        self.expected = [index["shards"][u] for u in self.urls] if index else None
        # labels must lie in [0, num_classes): the model's classes (given) and the index's, where either says
        limits = [n for n in (num_classes, index["num_classes"] if index else None) if n is not None]
        self.num_classes = min(limits) if limits else None
        if with_labels and index is not None and index["num_classes"] is None and index["labels_known"]:
            raise DataError(
                f"The shards {urls!r} are unlabeled (their index has no classes) but labels were asked for. "
                f"Use them where no labels are needed (pretraining), or write labelled shards."
            )
        self.transform = transform
        self.keep_jpeg = keep_jpeg  # JPEG members stay encoded (1-D uint8 "encoded"): decoded later, on the GPU
        self.mode = "RGB" if in_chans == 3 else "L"
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.shuffle, self.shuffle_buffer = shuffle, shuffle_buffer
        self.with_labels = with_labels
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}.")
        self.batch_size, self.drop_last = batch_size, drop_last
        self.state = EpochState()  # shared with the workers: a loader keeps them from epoch to epoch
        self.set_epoch(epoch, skip_batches)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """The epoch of the next pass and the batches it leaves out (a resume); reaches started workers too."""
        if not isinstance(skip_batches, int) or skip_batches < 0:
            raise ConfigError(f"skip_batches must be an integer >= 0, got {skip_batches!r}.")
        if skip_batches and not self.batch_size:
            raise ConfigError("skip_batches counts batches: it needs batch_size (a positive integer).")
        self.state.set(epoch, skip_batches)

    # -- pipeline stages ---------------------------------------------------------------------------

    def _raw_samples(self, assignment, counter: _SkipCounter) -> Iterator[dict]:
        """Raw samples of the process's shards that it keeps (position % stride == slot)."""
        position = 0  # raw sample position over the process's shards, identical in every process reading them
        for shard in assignment.shards:
            url = self.urls[shard]
            expected = self.expected[shard] if self.expected else None
            reader, n_read = shard_samples(url, expected), 0  # a remote shard is retried (mae_vit.data.remote)
            while True:
                try:
                    sample = next(reader)
                except StopIteration as stop:
                    n_read, error = stop.value
                    break
                if (position + n_read) % assignment.stride == assignment.slot:
                    yield sample
                n_read += 1
            if error is not None:
                counter.shards += 1
                if expected is not None:
                    lost = kept_in_range(position + n_read, position + expected, assignment.stride, assignment.slot)
                    counter.samples += lost
                log.warning("skipping the rest of unreadable shard %s (%d samples read): %s", url, n_read, error)
            position += max(n_read, expected or 0)

    def _shuffled(self, samples: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        if not self.shuffle or self.shuffle_buffer <= 1:
            yield from samples
            return
        buffer: list[dict] = []
        for sample in samples:
            buffer.append(sample)
            if len(buffer) >= self.shuffle_buffer:
                j = rng.randrange(len(buffer))
                buffer[j], buffer[-1] = buffer[-1], buffer[j]
                yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer

    def _decode(self, raw: dict) -> dict | None:
        """Image (and label) of a raw sample, transformed; None when the sample is unusable."""
        try:
            image_key = next((k for k in IMAGE_KEYS if k in raw), None)
            if image_key is None:
                raise ValueError(f"no image member (has {sorted(k for k in raw if not k.startswith('__'))})")
            # open() reads the header only: the format from the bytes (a PNG named .jpg is decoded here) and
            # PIL's decompression-bomb limit, the same for JPEGs kept encoded for the GPU (data.gpu_decode)
            with Image.open(io.BytesIO(raw[image_key])) as opened:
                encoded = self.keep_jpeg and opened.format == "JPEG"
                if not encoded:
                    image = to_8bit(opened).convert(self.mode)  # forces the full decode
            label = None
            if self.with_labels:
                if "cls" not in raw:
                    raise ValueError("no cls member")
                label = int(raw["cls"].decode("utf-8").strip())
                if label < 0 or (self.num_classes is not None and label >= self.num_classes):
                    raise ValueError(f"label {label} is not a class of this data set ({self.num_classes} classes)")
        except Exception as exc:  # corrupt bytes raise many PIL/OS/value error types
            self._bad_samples += 1
            if self._bad_samples <= _MAX_SAMPLE_WARNINGS:
                log.warning("skipping undecodable sample %s in %s: %s", raw.get("__key__"), raw.get("__url__"), exc)
            return None
        if encoded:
            tensor = torch.frombuffer(bytearray(raw[image_key]), dtype=torch.uint8)  # the JPEG's bytes, 1-D
        elif self.transform is not None:
            tensor = self.transform(image)
        else:
            tensor = TF.to_dtype(TF.to_image(image), torch.float32, scale=True)
        out = {"encoded" if self.keep_jpeg else "image": tensor, "key": raw["__key__"]}
        if self.with_labels:
            out["label"] = label
        return out

    def _decoded(self, stream: Iterator[dict], counter: _SkipCounter) -> Iterator[dict]:
        for raw in stream:
            sample = self._decode(raw)
            if sample is None:
                counter.samples += 1
            else:
                yield sample

    def _batched(self, samples: Iterator[dict], counter: _SkipCounter) -> Iterator[dict]:
        batch = []
        for sample in samples:
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield _with_counts(collate_samples(batch), counter)
                batch = []
        if batch and not self.drop_last:
            yield _with_counts(collate_samples(batch), counter)

    def __iter__(self) -> Iterator[dict]:
        """A pass over (epoch, skip_batches) as `set_epoch` left them when the DataLoader asked for it."""
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, skip_batches = self.state.get()  # now: the next pass's epoch may be set before this one is read
        if info is not None:
            seed_worker(self.seed, epoch, self.rank, worker)  # a kept worker draws as a new one would
        return self._pass(epoch, skip_batches, worker, num_workers)

    def _pass(self, epoch: int, skip_batches: int, worker: int, num_workers: int) -> Iterator[dict]:
        skip, split = 0, dict(rank=self.rank, world_size=self.world_size, num_workers=num_workers, seed=self.seed,
                              epoch=epoch, shuffle=self.shuffle)
        if skip_batches:  # this process plays the worker whose turn comes next (see split.resume_plan)
            worker, skip = resume_point(self.expected or shard_sample_counts(self.urls), skip_batches=skip_batches,
                                        batch_size=self.batch_size, drop_last=self.drop_last, worker=worker, **split)
        assignment = assign(len(self.urls), worker=worker, **split)
        rng = random.Random(f"mae_vit-samples-{self.seed}-{epoch}-{self.rank}-{worker}")
        counter = _SkipCounter()
        self._bad_samples = 0
        stream = self._shuffled(self._raw_samples(assignment, counter), rng)
        if skip:
            stream = itertools.islice(stream, skip, None)  # raw samples: skipped without decoding
        samples = self._decoded(stream, counter)
        if self.batch_size:
            yield from self._batched(samples, counter)
        else:
            for sample in samples:
                yield _with_counts(sample, counter)
        if counter.samples or counter.shards:
            yield _with_counts({}, counter)  # count-only record: skips after the last yield


def _with_counts(item: dict, counter: _SkipCounter) -> dict:
    item["skipped"], item["skipped_shards"] = counter.drain()
    return item


def collate_samples(samples: list[dict]) -> dict:
    """Stack samples into a batch dict and sum their skip counts (count-only records add counts only)."""
    real = [s for s in samples if "image" in s or "encoded" in s]
    batch = {
        "skipped": sum(s.get("skipped", 0) for s in samples),
        "skipped_shards": sum(s.get("skipped_shards", 0) for s in samples),
    }
    if real:
        if "encoded" in real[0]:  # keep_jpeg: a list of 1-D JPEG bytes or decoded (C, H, W), sizes differ
            batch["encoded"] = [s["encoded"] for s in real]
        else:
            batch["image"] = torch.stack([s["image"] for s in real])  # (B, C, H, W)
        batch["key"] = [s["key"] for s in real]
        if "label" in real[0]:
            batch["label"] = torch.tensor([s["label"] for s in real], dtype=torch.long)  # (B,)
    return batch
