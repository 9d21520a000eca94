"""Statistics of a data set as the reader will see it, gathered while make_shards writes it.

Each image is decoded from the bytes that go into the shard, passed through the reader's rule for deep
images (`to_8bit`: 16-bit scaled, float as 0..1), converted to RGB (alpha dropped, grey repeated) and
to grey ("L"), and scaled to 0..1, exactly as training reads it. Recorded in the shard index:
per-channel mean and std for RGB and for grey (use the one of your `model.in_chans` as data.mean /
data.std), the image sizes, how many images were exact byte-for-byte duplicates of an earlier one, and
how many could not be decoded (the reader skips those too).
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
        self.duplicates = self.images = self.undecodable = 0

    def add(self, data: bytes) -> None:
        digest = hashlib.sha256(data).digest()
        self.duplicates += digest in self.seen
        self.seen.add(digest)
        try:
            with Image.open(io.BytesIO(data)) as opened:
                image = to_8bit(opened)
                planes = {name: np.asarray(image.convert(mode), dtype=np.float64).reshape(-1, len(self.sums[name]))
                          for mode, name in (("RGB", "rgb"), ("L", "grey"))}
        except Exception:  # bytes the reader will skip as well (it counts them then); PIL raises many types
            self.undecodable += 1
            return
        for name, values in planes.items():
            self.sums[name] += values.sum(0) / 255.0
            self.squares[name] += (values ** 2).sum(0) / 255.0 ** 2
        self.sizes[f"{image.width}x{image.height}"] += 1
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
        out.update(images=self.images, duplicates=self.duplicates, undecodable=self.undecodable,
                   sizes=dict(self.sizes.most_common(20)))
        return out
