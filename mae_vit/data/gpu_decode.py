"""JPEG decoding on the GPU (`data.gpu_decode=true`), for runs whose CPU cannot decode as fast as the GPU trains.

    DataLoader workers    read tar -> shuffle -> check labels -> read each image's header (PIL): keep JPEG bytes
                          as they are (the format from the bytes, not the member's name; PIL's decompression-bomb
                          pixel limit as on the shard path); other formats are decoded there, to uint8 (C, H, W)
    training process      JpegDecoder:    the batch's JPEGs in ONE call of torchvision.io.decode_jpeg on the
                                          device (nvJPEG on a GPU) -> uint8 (C, H_i, W_i) each
                          crop_flip_each: per image the box torchvision's RandomResizedCrop draws and a flip,
                                          drawn on the CPU from the sizes (no host sync), cut and resized
                                          with antialiasing on the device -> float (B, C, S, S) in [0, 1]

Without a CUDA device the same code runs on the CPU in the training process: a fallback that keeps a
config working anywhere (and lets the tests check it), slower than decoding in the workers. If the
joint decode of a batch fails, its JPEGs are decoded one by one (on the device, then on the CPU); an
image that cannot be decoded at all is left out, logged (the first few) and counted in the batch's
`skipped`, as the worker path counts it. The crop differs from the PIL path only in the resampling
kernel (torch's antialiased bicubic against PIL's): the same boxes, the same flips.

Stream order on a GPU (pytorch/vision#9606). torchvision allocates the decoded images on the caller's
current stream, then decodes on a private stream without waiting for the caller's: the caching allocator
hands it blocks freed on the current stream that kernels queued there (the previous step's, which the
loop never waits for) may still read, and nvJPEG's hardware engine overwrites them at once (it does not
even honour a device-side wait: meta-pytorch/torchcodec#1634). So `JpegDecoder` decodes with its own
side stream current: the outputs come from that stream's pool, each is marked used by the main stream
(`record_stream`), so its block goes back to the pool only once the main stream's kernels that read it
have run (an event the allocator queries on the host), and the main stream waits for the side stream
(which torchvision makes wait for its decode) before it reads them. Cost: no host sync and no idle
GPU; the decoded images of a batch stay allocated until the step that reads them has run (about one
batch of decoded uint8 images more, e.g. 140 MiB for 256 ImageNet JPEGs). The alternative, a host sync
of the current stream before each decode, would stall the GPU for the decode of every batch.
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from mae_vit.data.in_memory import crop_boxes

log = logging.getLogger(__name__)
_MAX_WARNINGS = 5


def _decode(data, mode: ImageReadMode, device):
    with warnings.catch_warnings():  # torchvision 0.29 marks its decoders deprecated in favour of TorchCodec
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(data, mode=mode, device=device)


class JpegDecoder:
    """Decodes a batch's JPEGs on `device` (see the module doc); counts what it could not decode."""

    def __init__(self, in_chans: int, device):
        self.mode = ImageReadMode.RGB if in_chans == 3 else ImageReadMode.GRAY
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None  # see the module doc
        self.failures = 0

    def __call__(self, items: list[torch.Tensor], keys=None) -> tuple[list[torch.Tensor], list[int]]:
        """(the decodable images, uint8 (C, H, W) on the device, in order; their positions in `items`).

        `items`: per sample the JPEG's bytes (1-D uint8, CPU) or an image the worker already decoded (3-D).
        On a GPU the images are ready for the current stream, and their memory stays theirs until it ran.
        """
        if self.stream is None:
            return self._decode_all(items, keys)
        main = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):  # the outputs come from the side stream's pool (module doc)
            images, kept = self._decode_all(items, keys)
        main.wait_stream(self.stream)  # torchvision made the side stream wait for its decode
        for image in images:
            image.record_stream(main)  # freed: reused only once the main stream's reads have run
        return images, kept

    def _decode_all(self, items: list[torch.Tensor], keys) -> tuple[list[torch.Tensor], list[int]]:
        jpegs = [i for i, item in enumerate(items) if item.dim() == 1]
        images = [None if item.dim() == 1 else item.to(self.device, non_blocking=True) for item in items]
        try:
            for i, image in zip(jpegs, _decode([items[i] for i in jpegs], self.mode, self.device) if jpegs else []):
                images[i] = image
        except RuntimeError:  # one bad JPEG fails the whole call: decode one by one to find it
            for i in jpegs:
                images[i] = self._decode_one(items[i], keys[i] if keys else i)
        kept = [i for i, image in enumerate(images) if image is not None]
        return [images[i] for i in kept], kept

    def _decode_one(self, data: torch.Tensor, key) -> torch.Tensor | None:
        for where in dict.fromkeys([self.device, torch.device("cpu")]):  # the device, then the CPU (CMYK, ...)
            try:
                return _decode(data, self.mode, where).to(self.device)
            except RuntimeError as exc:
                error = exc
        self.failures += 1
        if self.failures <= _MAX_WARNINGS:
            log.warning("skipping undecodable JPEG %s: %s", key, str(error).splitlines()[0])
        return None


def crop_flip_each(images: list[torch.Tensor], out_size: int, scale, ratio=(3 / 4, 4 / 3), hflip: bool = True,
                   generator: torch.Generator | None = None, interpolation: str = "bicubic") -> torch.Tensor:
    """uint8 (C, H_i, W_i) images of any sizes -> float (B, C, out_size, out_size) in [0, 1].

    Per image a random resized crop (the boxes of `crop_boxes`, drawn with the CPU `generator`) and, when
    `hflip`, a mirror with probability 1/2; resized on the images' device (antialiased unless nearest).
    """
    smooth = interpolation in ("bilinear", "bicubic")
    out = []
    for image in images:  # (C, H, W)
        _, height, width = image.shape
        top, left, h, w = (int(v) for v in torch.cat(crop_boxes(1, height, width, scale, ratio, generator)))
        crop = image[None, :, top:top + h, left:left + w].float()  # (1, C, h, w)
        crop = F.interpolate(crop, size=(out_size, out_size), mode=interpolation, antialias=smooth,
                             **({"align_corners": False} if smooth else {}))  # (1, C, S, S)
        if hflip and torch.rand(1, generator=generator).item() < 0.5:
            crop = crop.flip(-1)
        out.append(crop)
    return torch.cat(out).div_(255.0).clamp_(0.0, 1.0)  # (B, C, S, S)
