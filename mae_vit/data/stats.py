"""Statistics of a data set as the reader will see it, gathered while make_shards writes it.

Each image is decoded from the bytes that go into the shard, passed through the reader's rule for deep
images (`to_8bit`: 16-bit scaled, float as 0..1), converted to RGB (alpha dropped, grey repeated) and
to grey ("L"), and scaled to 0..1, exactly as training reads it. Recorded in the shard index:
per-channel mean and std for RGB and for grey (use the one of your `model.in_chans` as data.mean /
data.std), the image sizes, and how many images were exact byte-for-byte duplicates of an earlier one.
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter

import numpy as np
from PIL import Image

from mae_vit.data.transforms import to_8bit


class ImageStats:
    def __init__(self):
        self.sums = {"rgb": np.zeros(3), "grey": np.zeros(1)}
        self.squares = {"rgb": np.zeros(3), "grey": np.zeros(1)}
        self.pixels = 0
        self.sizes: Counter = Counter()
        self.seen: set[bytes] = set()
        self.duplicates = self.images = 0

    def add(self, data: bytes) -> None:
        digest = hashlib.sha256(data).digest()
        self.duplicates += digest in self.seen
        self.seen.add(digest)
        with Image.open(io.BytesIO(data)) as opened:
            image = to_8bit(opened)
            self.sizes[f"{image.width}x{image.height}"] += 1
            for mode, name in (("RGB", "rgb"), ("L", "grey")):
                values = np.asarray(image.convert(mode), dtype=np.float64).reshape(-1, len(self.sums[name])) / 255.0
                self.sums[name] += values.sum(0)
                self.squares[name] += (values ** 2).sum(0)
        self.pixels += image.width * image.height
        self.images += 1

    def result(self) -> dict | None:
        if not self.images:
            return None
        out = {}
        for name in ("rgb", "grey"):
            mean = self.sums[name] / self.pixels
            std = np.sqrt(np.maximum(self.squares[name] / self.pixels - mean ** 2, 0.0))
            out[name] = {"mean": [round(float(m), 6) for m in mean], "std": [round(float(s), 6) for s in std]}
        out.update(images=self.images, duplicates=self.duplicates, sizes=dict(self.sizes.most_common(20)))
        return out
