"""Fashion-MNIST from its original idx files (28x28 grey images, 10 clothing classes).

The idx format: a 4-byte magic number `0x00 0x00 <type> <ndim>` (type 0x08 = unsigned byte), then
`ndim` big-endian uint32 dimensions, then the values in C order. Files may be gzip-compressed
(`.gz`, detected from the content, not the name).

Where the files are looked for, in order, inside a given folder `F`:
`F/`, `F/raw/`, `F/FashionMNIST/raw/` (torchvision's download layout). Without a folder: the
Debian package `dataset-fashion-mnist` (`/usr/share/datasets/fashion-mnist`), then
`./data` (so torchvision's `./data/FashionMNIST/raw` is found). The splits are `train` (60,000) and
`test` (10,000; `val` is an alias, Fashion-MNIST has no separate validation set).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image

from mae_vit.errors import DataError

CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DEFAULT_DIRS = (Path("/usr/share/datasets/fashion-mnist"), Path("data"))
_FILE_STEMS = {"train": "train", "test": "t10k", "val": "t10k"}
_SUBDIRS = (".", "raw", "FashionMNIST/raw")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one idx file (plain or gzip) into a numpy array of the shape its header gives."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as exc:
        raise DataError(f"Cannot read the idx file {path}: {exc}. Check the path, or re-download the file.") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(
            f"{path} is not an idx file (its first bytes are {raw[:4].hex() or 'missing'}; an idx file starts with "
            f"00 00, a type byte and the number of dimensions). Point to the original Fashion-MNIST files."
        )
    ndim = raw[3]
    header_end = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw[4:header_end], dtype=">u4")) if ndim else ()
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header_end != expected:
        raise DataError(
            f"{path} is damaged: its header announces shape {dims} ({expected} bytes of data) but it holds "
            f"{len(raw) - header_end} bytes. Re-download or reinstall the file."
        )
    return np.frombuffer(raw, dtype=dtype, offset=header_end).reshape(dims)


def _find_file(folder: Path, name: str) -> Path | None:
    for sub in _SUBDIRS:
        for candidate in (folder / sub / name, folder / sub / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def find_idx_files(folder: str | Path, split: str) -> tuple[Path, Path] | None:
    """(images, labels) idx paths of `split` inside `folder` (see module doc for the layouts), or None."""
    if split not in _FILE_STEMS:
        raise DataError(f"Fashion-MNIST has the splits train and test (val = test); got split={split!r}.")
    stem = _FILE_STEMS[split]
    images = _find_file(Path(folder), f"{stem}-images-idx3-ubyte")
    labels = _find_file(Path(folder), f"{stem}-labels-idx1-ubyte")
    return (images, labels) if images and labels else None


def locate_fashion_mnist(folder: str | Path | None, split: str) -> tuple[Path, Path]:
    """Like `find_idx_files`, searching the default places when `folder` is None; DataError if absent."""
    folders = [Path(folder)] if folder is not None else list(DEFAULT_DIRS)
    for candidate in folders:
        found = find_idx_files(candidate, split)
        if found:
            return found
    stem = _FILE_STEMS.get(split, split)
    raise DataError(
        f"Fashion-MNIST {split} files ({stem}-images-idx3-ubyte[.gz] and {stem}-labels-idx1-ubyte[.gz]) were not "
        f"found in {', '.join(str(f) for f in folders)}. Install them with `apt-get install dataset-fashion-mnist` "
        f"(they go to /usr/share/datasets/fashion-mnist), or pass the folder that holds them."
    )


def load_fashion_mnist(folder: str | Path | None, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, 28, 28) and labels int64 (N,) of one split; checks that they match."""
    images_path, labels_path = locate_fashion_mnist(folder, split)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(
            f"{images_path} (shape {images.shape}) and {labels_path} (shape {labels.shape}) do not form an image "
            f"set: expected (N, H, W) images and N labels. Check that both files belong to the same split."
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
        raise DataError(f"{labels_path} holds labels outside 0..{len(CLASS_NAMES) - 1}; it is not Fashion-MNIST.")
    return images.astype(np.uint8, copy=False), labels.astype(np.int64)


def fashion_mnist_samples(images: np.ndarray, labels: np.ndarray):
    """Yield `(key, grey PIL image, label)` in file order; key = 8-digit position in the file."""
    for index, (pixels, label) in enumerate(zip(images, labels)):
        yield f"{index:08d}", Image.fromarray(pixels), int(label)
