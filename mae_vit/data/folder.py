"""A folder of image files as a sample source for the shard writer.

Layout: if the folder has subfolders, each subfolder is a class (sorted names -> ids 0, 1, ...) and
its images are found at any depth below it; files lying directly in the root are then ignored (a
warning says how many). Without subfolders, the images in the root are an unlabeled set.
Hidden files and folders (names starting with '.') are ignored.

jpg/jpeg/png/webp files are copied byte for byte (no re-encoding loss); bmp files are re-encoded as
PNG (lossless, much smaller). Files whose header PIL cannot read are skipped with a warning.
The file list is shuffled with a seed before writing, so that shards mix the classes.
"""

from __future__ import annotations

import io
import logging
import random
import re
from pathlib import Path

from PIL import Image

from mae_vit.errors import DataError

log = logging.getLogger(__name__)

COPY_EXTS = ("jpg", "jpeg", "png", "webp")
REENCODE_EXTS = ("bmp",)
IMAGE_EXTS = COPY_EXTS + REENCODE_EXTS


def _is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower().lstrip(".") in IMAGE_EXTS


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def scan_image_folder(root: str | Path) -> tuple[list[tuple[Path, int | None]], list[str] | None]:
    """Sorted `(path, label or None)` pairs and the class names (None when unlabeled)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"The image folder {root} does not exist or is not a folder. Check the path.")
    class_dirs = sorted((p for p in root.iterdir() if p.is_dir() and _visible(p)), key=lambda p: p.name)
    if not class_dirs:
        files = [(p, None) for p in sorted(root.iterdir()) if _is_image(p)]
        class_names = None
    else:
        class_names = [d.name for d in class_dirs]
        files = []
        for label, class_dir in enumerate(class_dirs):
            found = sorted(
                p for p in class_dir.rglob("*")
                if _is_image(p) and all(_visible(q) for q in p.relative_to(root).parents)
            )
            files.extend((p, label) for p in found)
        loose = [p for p in root.iterdir() if _is_image(p)]
        if loose:
            log.warning("%s: ignoring %d image(s) lying beside the class subfolders", root, len(loose))
    if not files:
        raise DataError(
            f"No images ({', '.join(IMAGE_EXTS)}) found in {root}. Put the images in the folder, or one subfolder "
            f"per class (e.g. {root}/cat/1.jpg, {root}/dog/2.jpg)."
        )
    return files, class_names


def _safe_key_part(path: Path) -> str:
    """File stem made safe as part of a WebDataset key (no dots, no slashes)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", path.stem)[:64]


def folder_samples(files: list[tuple[Path, int | None]], *, seed: int = 0, shuffle: bool = True,
                   unreadable: list | None = None):
    """Yield `(key, (bytes, ext), label)` for the shard writer, in a seeded random order.

    key = 8-digit position in the written order + '_' + the sanitised file stem (unique, and traceable).
    Unreadable files are skipped with a warning and, when `unreadable` is a list, appended to it.
    """
    order = list(files)
    if shuffle:
        random.Random(seed).shuffle(order)
    for position, (path, label) in enumerate(order):
        data = path.read_bytes()
        ext = path.suffix.lower().lstrip(".")
        try:
            with Image.open(io.BytesIO(data)) as image:
                if ext in REENCODE_EXTS:
                    image.load()
                    buffer = io.BytesIO()
                    image.save(buffer, format="PNG")
                    data, ext = buffer.getvalue(), "png"
        except Exception as exc:  # PIL raises many types for bad files
            log.warning("skipping unreadable image %s: %s", path, exc)
            if unreadable is not None:
                unreadable.append(str(path))
            continue
        yield f"{position:08d}_{_safe_key_part(path)}", (data, ext), label
