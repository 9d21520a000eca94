"""One tar shard being written under a hidden temporary name, a sample's members (reproducible headers: fixed
time, owner, mode), and the exact tar sizes that decide when a new shard starts (headers and padding included)."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

BLOCK = tarfile.BLOCKSIZE  # 512
RECORD = tarfile.RECORDSIZE  # 10240: tarfile pads the finished archive to a multiple of this


def tar_info(name: str, size: int) -> tarfile.TarInfo:
    """A reproducible member header: fixed time, owner and permissions."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def archived_size(info: tarfile.TarInfo) -> int:
    """Bytes a member takes inside the tar: header block(s) (PAX headers for long names) + padded data."""
    header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    return len(header) + -(-info.size // BLOCK) * BLOCK


def finished_size(content_bytes: int) -> int:
    """File size after `close()`: content + two zero end blocks, padded to a whole record."""
    return -(-(content_bytes + 2 * BLOCK) // RECORD) * RECORD


def sample_members(key: str, data: bytes, ext: str, label: int | None) -> list[tuple]:
    """The tar members of one sample: `{key}.{ext}` (the image) and, when labelled, `{key}.cls`."""
    members = [(tar_info(f"{key}.{ext}", len(data)), data)]
    if label is not None:
        text = str(label).encode()
        members.append((tar_info(f"{key}.cls", len(text)), text))
    return members


class PartialShard:
    """One shard being written under a hidden temporary name."""

    def __init__(self, output_dir: Path, final_name: str):
        self.final_path = output_dir / final_name
        self.temp_path = output_dir / f".{final_name}.partial-{os.getpid()}"
        self.tar = tarfile.open(self.temp_path, mode="w", format=tarfile.PAX_FORMAT)
        self.content_bytes = 0
        self.num_samples = 0

    def add(self, members: list[tuple[tarfile.TarInfo, bytes]], size: int) -> None:
        for info, data in members:
            self.tar.addfile(info, io.BytesIO(data))
        self.content_bytes += size
        self.num_samples += 1

    def close(self) -> None:
        if not self.tar.closed:
            self.tar.close()
