"""Sample sources: Fashion-MNIST idx files (hand-made, tiny) and folders of images."""

import gzip
import io
import json
import struct
import tarfile

import numpy as np
import pytest
from PIL import Image

from mae_vit.data.fashion_mnist import CLASS_NAMES, load_fashion_mnist, read_idx
from mae_vit.data.sources import open_source
from mae_vit.data.writer import make_shards
from mae_vit.errors import DataError


def idx_bytes(array: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_fashion(folder, split_stem, images, labels, gz=True):
    folder.mkdir(parents=True, exist_ok=True)
    for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
        data = idx_bytes(array)
        name = f"{split_stem}-{kind}-ubyte"
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)


def tar_members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


IMAGES = np.arange(5 * 3 * 4, dtype=np.uint8).reshape(5, 3, 4) * 4
LABELS = np.array([9, 0, 3, 3, 1], dtype=np.uint8)


def test_read_idx_plain_and_gzip(tmp_path):
    (tmp_path / "a").write_bytes(idx_bytes(IMAGES))
    (tmp_path / "b.gz").write_bytes(gzip.compress(idx_bytes(LABELS)))
    assert np.array_equal(read_idx(tmp_path / "a"), IMAGES) and read_idx(tmp_path / "a").shape == (5, 3, 4)
    assert read_idx(tmp_path / "b.gz").tolist() == [9, 0, 3, 3, 1]


@pytest.mark.parametrize(
    "data, message",
    [(b"\x08\x03\x00\x00", "not an idx file"), (idx_bytes(IMAGES)[:-1], "damaged"), (b"", "not an idx file")],
)
def test_read_idx_rejects_bad_files(tmp_path, data, message):
    (tmp_path / "bad").write_bytes(data)
    with pytest.raises(DataError, match=message):
        read_idx(tmp_path / "bad")


def test_fashion_mnist_layouts_and_splits(tmp_path):
    write_fashion(tmp_path / "plain", "train", IMAGES, LABELS, gz=False)
    write_fashion(tmp_path / "tv" / "FashionMNIST" / "raw", "t10k", IMAGES[:2], LABELS[:2])
    images, labels = load_fashion_mnist(tmp_path / "plain", "train")
    assert np.array_equal(images, IMAGES) and labels.tolist() == [9, 0, 3, 3, 1]
    images, labels = load_fashion_mnist(tmp_path / "tv", "val")  # val = test = t10k files
    assert images.shape == (2, 3, 4) and labels.tolist() == [9, 0]
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "tv", "train")


def test_fashion_mnist_mismatched_files(tmp_path):
    write_fashion(tmp_path, "train", IMAGES, LABELS[:3])
    with pytest.raises(DataError, match="same split"):
        load_fashion_mnist(tmp_path, "train")


def test_make_shards_from_fashion_mnist(tmp_path):
    write_fashion(tmp_path / "fm", "train", IMAGES, LABELS)
    index, _ = make_shards(f"fashion-mnist:{tmp_path / 'fm'}", tmp_path / "out", samples_per_shard=3, progress=False)
    assert index["shards"] == {"shard-000000.tar": 3, "shard-000001.tar": 2}
    assert index["num_classes"] == 10 and index["class_names"] == list(CLASS_NAMES)
    assert index["class_counts"] == {"0": 1, "1": 1, "3": 2, "9": 1}
    stored = tar_members(tmp_path / "out" / "shard-000000.tar")
    image = Image.open(io.BytesIO(stored["00000002.png"]))
    assert image.mode == "L" and np.array_equal(np.asarray(image), IMAGES[2]) and stored["00000002.cls"] == b"3"
    # A folder holding the idx files is recognised as Fashion-MNIST without the prefix.
    assert open_source(str(tmp_path / "fm")).class_names == list(CLASS_NAMES)


def save(path, image, fmt):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)
    return path.read_bytes()


def test_folder_with_class_subfolders(tmp_path):
    root = tmp_path / "imgs"
    jpg = save(root / "dog" / "a.b.jpg", Image.new("RGB", (6, 5), (10, 200, 30)), "JPEG")
    png = save(root / "cat" / "nested" / "x.png", Image.new("L", (3, 3), 77), "PNG")
    save(root / "cat" / "y.bmp", Image.new("RGB", (4, 2), (1, 2, 3)), "BMP")
    (root / "cat" / "broken.png").write_bytes(b"not a png at all")
    (root / "cat" / "notes.txt").write_text("ignored")
    (root / ".hidden").mkdir()
    index, _ = make_shards(str(root), tmp_path / "out", progress=False)
    assert index["class_names"] == ["cat", "dog"] and index["num_classes"] == 2
    assert index["class_counts"] == {"0": 2, "1": 1} and index["num_samples"] == 3
    stored = tar_members(tmp_path / "out" / "shard-000000.tar")
    by_stem = {name.split("_", 1)[1]: data for name, data in stored.items()}
    assert by_stem["a_b.jpg"] == jpg and by_stem["x.png"] == png  # copied byte for byte
    assert by_stem["a_b.cls"] == b"1" and by_stem["x.cls"] == b"0"
    bmp_as_png = Image.open(io.BytesIO(by_stem["y.png"]))  # bmp re-encoded losslessly
    assert bmp_as_png.format == "PNG" and bmp_as_png.getpixel((0, 0)) == (1, 2, 3)


def test_unlabeled_folder_and_split_subfolder(tmp_path):
    root = tmp_path / "data"
    for i in range(3):
        save(root / "val" / f"{i}.png", Image.new("RGB", (2, 2), (i, i, i)), "PNG")
    save(root / "train" / "dog" / "t.png", Image.new("RGB", (2, 2)), "PNG")
    index, _ = make_shards(str(root), tmp_path / "out", split="val", progress=False)
    assert index["num_samples"] == 3 and index["num_classes"] is None
    assert not any(name.endswith(".cls") for name in tar_members(tmp_path / "out" / "shard-000000.tar"))
    saved = json.loads((tmp_path / "out" / "shard-index.json").read_text())
    assert saved["class_names"] is None


def test_missing_sources(tmp_path):
    with pytest.raises(DataError, match="neither"):
        open_source(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="No images"):
        open_source(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="not found"):
        open_source(f"fashion-mnist:{tmp_path / 'empty'}")


def test_16_bit_pngs_are_scaled_not_clipped_by_the_writer_and_the_reader(tmp_path):
    from mae_vit.data import make_loader

    ramp = np.linspace(0, 65535, 256).reshape(16, 16).astype(np.uint16)  # mean 32767.5: half the range
    (tmp_path / "imgs").mkdir()
    Image.fromarray(ramp).save(tmp_path / "imgs" / "deep.png")
    assert Image.open(tmp_path / "imgs" / "deep.png").mode == "I;16"
    _, urls = make_shards(str(tmp_path / "imgs"), tmp_path / "shards", progress=False)  # the PNG goes in as it is
    batch = next(iter(make_loader(urls, batch_size=1, in_chans=1, with_labels=False, shuffle=False)))
    assert batch["image"].mean().item() == pytest.approx(0.5, abs=0.01)  # clipped, it was 0.996
    from mae_vit.data.writer import write_shards
    write_shards([("k", Image.fromarray(ramp), None)], tmp_path / "direct", progress=False)  # PIL image path
    png = next(data for name, data in tar_members(tmp_path / "direct" / "shard-000000.tar").items()
               if name.endswith(".png"))
    assert np.asarray(Image.open(io.BytesIO(png))).mean() / 255 == pytest.approx(0.5, abs=0.01)


def test_a_class_folder_named_like_a_split_is_a_class(tmp_path):
    for cls in ("bus", "tractor", "train"):  # CIFAR-100 has a class called "train"
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / cls / f"{i}.png")
    index, _ = make_shards(str(tmp_path), tmp_path.parent / "out_classes", progress=False)
    assert index["num_samples"] == 15 and index["num_classes"] == 3
    split = tmp_path.parent / "split_layout"
    for part, n in (("train", 4), ("val", 2)):
        (split / part / "cat").mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8)).save(split / part / "cat" / f"{i}.png")
    index, _ = make_shards(str(split), tmp_path.parent / "out_split", split="val", progress=False)
    assert index["num_samples"] == 2  # train/ + val/ only: the split layout


def test_an_output_folder_inside_the_source_folder_is_refused_before_anything_is_written(tmp_path):
    for cls in ("cat", "dog"):
        for i in range(2):
            save(tmp_path / "imgs" / cls / f"{i}.png", Image.new("RGB", (8, 8), (i * 90, 0, 0)), "PNG")
    with pytest.raises(DataError, match="inside the source folder"):
        make_shards(str(tmp_path / "imgs"), tmp_path / "imgs" / "shards", progress=False)
    assert sorted(p.name for p in (tmp_path / "imgs").iterdir()) == ["cat", "dog"]
