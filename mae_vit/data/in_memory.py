"""Small data sets in memory: decoded once into one uint8 tensor, augmented batch by batch on the device.

The rule (`data.in_memory=true`): every sample of the training shards is decoded ONCE, in file order,
by the shard reader (`ShardDataset`: undecodable samples are skipped and logged as on the shard path)
into one uint8 tensor (N, C, H, W) and labels (N,) (-1 when unlabelled). That needs every image to
have the same size and the tensor to stay under `MEMORY_LIMIT` (8 GiB); otherwise a DataError says
which, and to set data.in_memory=false. Every process holds the whole set and takes its share of each
epoch (`train.batches.MemoryBatches`).

The training augmentation then runs on whole batches on that device: `random_resized_crop_flip` draws,
per image, the crop torchvision's RandomResizedCrop draws (10 tries of an area in `scale` and a
log-uniform aspect ratio in `ratio`, else the centre crop of the clamped ratio) and a flip, and
resamples all crops at once with `grid_sample`. It differs from the PIL path in the resampling only:
no antialiasing when a crop is shrunk (crops of 28-32 px images are mostly enlarged), and torch's
bicubic kernel (a = -0.75, clamped to [0, 1]) instead of PIL's (a = -0.5); bilinear and nearest are
the usual ones.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from mae_vit.data.shards import ShardDataset
from mae_vit.data.urls import expand_urls, read_index, shard_sample_counts
from mae_vit.errors import DataError

log = logging.getLogger(__name__)

MEMORY_LIMIT = 8 * 2**30  # bytes of the uint8 tensor (N, C, H, W)


def decode_all(urls, in_chans: int, *, labels: bool | None = None, num_classes: int | None = None,
               limit_bytes: int = MEMORY_LIMIT, transform=TF.pil_to_tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, C, H, W), labels int64 (N,)) of every readable sample of `urls`, in file order.

    `transform`: PIL image -> uint8 tensor (C, H, W); the default keeps the stored pixels.

    `labels`: read the `cls` labels (None: when the shard index lists classes); -1 where not read. A sample
    whose label is not a class (`num_classes`: the model's; the index's) is left out and counted as unreadable.
    """
    shards = expand_urls(urls)
    if labels is None:
        labels = bool((read_index(shards) or {}).get("num_classes"))
    counted = sum(shard_sample_counts(shards))  # from the index, else the tar headers
    reader = ShardDataset(shards, transform=transform, in_chans=in_chans, shuffle=False, with_labels=labels,
                          num_classes=num_classes)
    images, targets, n = None, torch.full((counted,), -1, dtype=torch.long), 0
    for sample in reader:
        if "image" not in sample:  # a count-only record: bad samples, already logged by the reader
            continue
        image = sample["image"]  # (C, H, W) uint8
        if images is None:
            _check_size(counted, image.shape, limit_bytes)
            images = torch.empty((counted, *image.shape), dtype=torch.uint8)  # (N, C, H, W), filled in place
        if image.shape != images.shape[1:]:
            raise DataError(_mixed_sizes(sample["key"], image.shape, images.shape[1:]))
        if n == counted:
            raise DataError(f"The shards {urls!r} hold more samples than their index counts ({counted}); rewrite "
                            "them with tools/make_shards.py, or set data.in_memory=false.")
        images[n] = image
        targets[n] = sample.get("label", -1)
        n += 1
    if n == 0:
        raise DataError(f"No readable image in {urls!r} (see the warnings above); data.in_memory=true has nothing "
                        "to hold. Check the shards.")
    if n < counted:
        log.warning("in memory: %d of the %d samples were unreadable and are left out", counted - n, counted)
    return images[:n], targets[:n]


def _check_size(count: int, shape, limit_bytes: int) -> None:
    size = count * math.prod(shape)
    if size > limit_bytes:
        c, h, w = shape
        raise DataError(
            f"data.in_memory=true would hold the {count} training images ({c} x {h} x {w} px each) in memory as "
            f"{size:,} bytes ({size / 2**30:.2f} GiB), more than its limit of {limit_bytes:,} bytes "
            f"({limit_bytes / 2**30:.2f} GiB). It is meant for small data sets such as Fashion-MNIST (0.05 GiB) or "
            "CIFAR (0.17 GiB); set data.in_memory=false to stream the shards instead.")


def _mixed_sizes(key: str, shape, first) -> str:
    return (f"The training images do not all have one size: sample {key!r} is {shape[2]} x {shape[1]} px "
            f"({shape[0]} channel(s)) but the first one is {first[2]} x {first[1]} px ({first[0]} channel(s)). "
            "data.in_memory=true stacks the whole data set into one tensor and so needs a single size; set "
            "data.in_memory=false to read the shards (each image is cropped and resized on its own there), or "
            "write the shards at one size.")


def crop_boxes(n: int, height: int, width: int, scale, ratio, generator=None, device=None, tries: int = 10):
    """(top, left, h, w), float (n,) each: per image the box torchvision's RandomResizedCrop.get_params draws."""
    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=generator, device=device)

    area = uniform(scale[0], scale[1], n, tries) * (height * width)  # (n, tries)
    aspect = torch.exp(uniform(math.log(ratio[0]), math.log(ratio[1]), n, tries))
    w, h = torch.sqrt(area * aspect).round(), torch.sqrt(area / aspect).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(dim=1, keepdim=True)  # (n, 1): the first try that fits
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)  # (n,)
    top, left = torch.floor(uniform(0, 1, n) * (height - h + 1)), torch.floor(uniform(0, 1, n) * (width - w + 1))
    centre_w, centre_h = _centre_size(height, width, ratio)
    none_fits = ~fits.any(dim=1)
    w, h = w.masked_fill(none_fits, centre_w), h.masked_fill(none_fits, centre_h)
    top = torch.where(none_fits, (height - h).div(2).floor(), top)
    left = torch.where(none_fits, (width - w).div(2).floor(), left)
    return top, left, h, w


def _centre_size(height: int, width: int, ratio) -> tuple[int, int]:
    """torchvision's fallback: the whole image, its aspect ratio clamped into `ratio`."""
    if width / height < min(ratio):
        return width, round(width / min(ratio))
    if width / height > max(ratio):
        return round(height * max(ratio)), height
    return width, height


def random_resized_crop_flip(images: torch.Tensor, out_size: int, scale, ratio=(3 / 4, 4 / 3), hflip: bool = True,
                             generator=None, mode: str = "bilinear") -> torch.Tensor:
    """uint8 (B, C, H, W) -> float (B, C, out_size, out_size) in [0, 1]: a random resized crop per image,
    mirrored with probability 1/2 when `hflip`, resampled with `grid_sample` (`mode`: bilinear | bicubic |
    nearest) on the images' device."""
    b, c, height, width = images.shape
    top, left, h, w = crop_boxes(b, height, width, scale, ratio, generator, images.device)
    sign = torch.ones(b, device=images.device)
    if hflip:
        sign = torch.where(torch.rand(b, generator=generator, device=images.device) < 0.5, -1.0, 1.0)
    # output pixel u samples x = left + (u + 0.5) * w / out_size (- 0.5 in pixel centres): an affine map of
    # affine_grid's [-1, 1] coordinates; a negative x scale mirrors the crop
    theta = torch.zeros(b, 2, 3, device=images.device)
    theta[:, 0, 0], theta[:, 0, 2] = sign * w / width, (2 * left + w) / width - 1
    theta[:, 1, 1], theta[:, 1, 2] = h / height, (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [b, c, out_size, out_size], align_corners=False)  # (B, out, out, 2)
    out = F.grid_sample(images.float(), grid, mode=mode, padding_mode="border", align_corners=False)
    return out.div_(255.0).clamp_(0.0, 1.0)  # (B, C, out, out)
