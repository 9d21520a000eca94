"""Turn a `source` string (as in `tools/make_shards.py source=...`) into samples for the shard writer.

- `"synthetic"`: the procedural data set (uses num_samples, num_classes, img_size, seed, split).
- `"fashion-mnist"`: the Fashion-MNIST idx files from their default places (see `fashion_mnist.py`);
  `"fashion-mnist:FOLDER"` names the folder. A folder path that holds the idx files is recognised too.
- any other string: a folder of images (see `folder.py`). When every subfolder of FOLDER is a split
  name (train, val, validation, test) and `FOLDER/<split>` exists, that is used (the usual `train/` +
  `val/` layout); otherwise the subfolders are classes, even one that is called `train`.

num_samples, num_classes and img_size apply to the synthetic source only; real sources are written
whole and unresized.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from mae_vit.data import fashion_mnist, folder, synthetic
from mae_vit.errors import DataError

SPLIT_NAMES = {"train", "val", "validation", "test"}


@dataclass
class SampleSource:
    """Samples `(key, image or (bytes, ext), label or None)` plus what the index records about them."""

    samples: Iterable
    total: int | None
    num_classes: int | None
    class_names: list[str] | None
    description: str
    unreadable: list | None = None  # the images the source had to skip, filled while `samples` is read


def open_source(
    source: str,
    *,
    split: str = "train",
    num_samples: int = 2048,
    num_classes: int = 10,
    img_size: int = 32,
    seed: int = 0,
) -> SampleSource:
    """Resolve `source` (see module doc) to a SampleSource; DataError when it cannot be found."""
    if source == "synthetic":
        samples = synthetic.synthetic_samples(
            num_samples, seed=seed, img_size=img_size, num_classes=num_classes, split=split
        )
        names = list(synthetic.CLASS_NAMES[:num_classes])
        desc = f"synthetic {split} ({num_samples} samples, {num_classes} classes, {img_size}px, seed {seed})"
        return SampleSource(samples, num_samples, num_classes, names, desc)

    if source == "fashion-mnist" or source.startswith("fashion-mnist:"):
        location = source.partition(":")[2] or None
        return _fashion_mnist_source(location, split)

    path = Path(source).expanduser()
    if path.is_dir() and any(fashion_mnist.find_idx_files(path, s) for s in ("train", "test")):
        return _fashion_mnist_source(path, split)
    if not path.exists():
        raise DataError(
            f"The data source {source!r} is neither 'synthetic', 'fashion-mnist' nor an existing folder. "
            f"Use source=synthetic, source=fashion-mnist, or the path of a folder of images."
        )
    subfolders = {p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")}
    if (path / split).is_dir() and subfolders <= SPLIT_NAMES:
        path = path / split
    files, class_names = folder.scan_image_folder(path)
    unreadable: list = []
    samples = folder.folder_samples(files, seed=seed, unreadable=unreadable)
    labelled = "unlabeled" if class_names is None else f"{len(class_names)} classes"
    desc = f"image folder {path} ({len(files)} files, {labelled})"
    return SampleSource(samples, len(files), len(class_names) if class_names else None, class_names, desc,
                        unreadable)


def _fashion_mnist_source(location, split: str) -> SampleSource:
    images, labels = fashion_mnist.load_fashion_mnist(location, split)
    desc = f"Fashion-MNIST {split} ({len(images)} samples)"
    return SampleSource(
        fashion_mnist.fashion_mnist_samples(images, labels),
        len(images),
        len(fashion_mnist.CLASS_NAMES),
        list(fashion_mnist.CLASS_NAMES),
        desc,
    )
