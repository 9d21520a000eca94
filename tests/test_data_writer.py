"""Shard writer: layout, index, exact round trip, size limits, refusal to overwrite, crash safety."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mae_vit.data.loader import make_loader
from mae_vit.data.synthetic import synthetic_samples
from mae_vit.data.writer import make_shards, shard_urls, write_shards
from mae_vit.errors import ConfigError, DataError


def grey_samples(n, size=8):
    rng = np.random.default_rng(0)
    for i in range(n):
        yield f"g{i:03d}", Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)), i % 3


def members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_layout_index_and_exact_pixels(tmp_path):
    originals = {key: (np.asarray(img), label) for key, img, label in synthetic_samples(12, img_size=16, seed=5)}
    index = write_shards(synthetic_samples(12, img_size=16, seed=5), tmp_path, samples_per_shard=5, progress=False,
                         class_names=["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"])
    assert index == json.loads((tmp_path / "shard-index.json").read_text())
    assert index["shards"] == {"shard-000000.tar": 5, "shard-000001.tar": 5, "shard-000002.tar": 2}
    assert index["num_samples"] == 12 and index["num_classes"] == 10
    assert index["class_counts"] == {"0": 2, "1": 2, "2": 1, "3": 1, "4": 1, "5": 1, "6": 1, "7": 1, "8": 1, "9": 1}
    assert index["class_names"][:2] == ["a", "b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*index["shards"], "shard-index.json",
                                                                 "shard-index.wids.json"])

    first = members(tmp_path / "shard-000000.tar")
    assert list(first)[:4] == ["00000000.png", "00000000.cls", "00000001.png", "00000001.cls"]
    assert first["00000003.cls"] == b"3"
    image = Image.open(io.BytesIO(first["00000004.png"]))
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), originals["00000004"][0])

    # Read back through the loader in file order: same keys, labels and pixel values (x / 255).
    loader = make_loader(shard_urls(tmp_path, "shard", 3), batch_size=4, shuffle=False, drop_last=False)
    batches = list(loader)
    keys = [k for b in batches for k in b["key"]]
    assert keys == [f"{i:08d}" for i in range(12)]
    labels = [int(v) for b in batches for v in b["label"]]
    assert labels == [originals[k][1] for k in keys]
    image_7 = batches[1]["image"][3]  # (3, 16, 16)
    assert np.array_equal((image_7.numpy() * 255).round().astype(np.uint8).transpose(1, 2, 0), originals["00000007"][0])


def test_grey_images_stay_one_channel(tmp_path):
    index = write_shards(grey_samples(4), tmp_path, progress=False)
    assert index["num_classes"] == 3  # inferred: largest label + 1
    stored = Image.open(io.BytesIO(members(tmp_path / "shard-000000.tar")["g002.png"]))
    expected = np.asarray(list(grey_samples(4))[2][1])
    assert stored.mode == "L" and np.array_equal(np.asarray(stored), expected)


def test_encoded_bytes_are_copied_and_unlabeled_has_no_cls(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (10, 6), (200, 10, 30)).save(buffer, format="JPEG", quality=70)
    data = buffer.getvalue()
    index = write_shards([("a", (data, "JPG"), None), ("b", (data, "jpg"), None)], tmp_path, progress=False)
    stored = members(tmp_path / "shard-000000.tar")
    assert list(stored) == ["a.jpg", "b.jpg"] and stored["a.jpg"] == data
    assert index["num_classes"] is None and index["class_counts"] == {} and index["class_names"] is None


def test_size_limit_is_respected_and_shards_are_full(tmp_path):
    rng = np.random.default_rng(1)
    noise = [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(12)]  # ~4.8 KB PNGs
    limit = 3 * 10240
    index = write_shards(((f"n{i}", img, 0) for i, img in enumerate(noise)), tmp_path, max_shard_bytes=limit,
                         samples_per_shard=100, progress=False)
    names = list(index["shards"])
    assert len(names) > 2 and sum(index["shards"].values()) == 12
    for this, following in zip(names, names[1:]):
        assert (tmp_path / this).stat().st_size <= limit
        # The first sample of the next shard would not have fitted: the shard was closed for size.
        with tarfile.open(tmp_path / following) as tar:
            first_sample = [m for m in tar.getmembers()[:2]]
        extra = sum(512 + -(-m.size // 512) * 512 for m in first_sample)
        with tarfile.open(tmp_path / this) as tar:
            content = sum(512 + -(-m.size // 512) * 512 for m in tar.getmembers())
        assert -(-(content + extra + 1024) // 10240) * 10240 > limit
    assert (tmp_path / names[-1]).stat().st_size <= limit


def test_oversized_sample_gets_its_own_shard(tmp_path):
    rng = np.random.default_rng(2)
    big = Image.fromarray(rng.integers(0, 256, (80, 80, 3), dtype=np.uint8))  # ~19 KB PNG
    small = Image.new("RGB", (4, 4))
    index = write_shards([("s0", small, 0), ("big", big, 0), ("s1", small, 0)], tmp_path, max_shard_bytes=10240,
                         progress=False)
    assert list(index["shards"].values()) == [1, 1, 1]


def test_refuses_to_overwrite_and_leaves_data_untouched(tmp_path):
    write_shards(synthetic_samples(6, img_size=8), tmp_path, samples_per_shard=2, progress=False)
    before = snapshot(tmp_path)
    with pytest.raises(DataError, match="overwrite"):
        write_shards(synthetic_samples(6, img_size=8, seed=9), tmp_path, samples_per_shard=2, progress=False)
    assert snapshot(tmp_path) == before

    # An index alone (shards deleted by hand) still counts as an existing data set.
    for name in list(before):
        if name.endswith(".tar"):
            (tmp_path / name).unlink()
    with pytest.raises(DataError):
        write_shards(synthetic_samples(2, img_size=8), tmp_path, progress=False)


def test_overwrite_replaces_everything_of_that_prefix(tmp_path):
    write_shards(synthetic_samples(6, img_size=8), tmp_path, samples_per_shard=2, progress=False)
    write_shards(synthetic_samples(3, img_size=8), tmp_path, prefix="other", progress=False)
    index = write_shards(synthetic_samples(4, img_size=8, seed=1), tmp_path, samples_per_shard=4, overwrite=True,
                         progress=False)
    assert index["shards"] == {"shard-000000.tar": 4}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "other-000000.tar", "other-index.json", "other-index.wids.json", "shard-000000.tar", "shard-index.json",
        "shard-index.wids.json"
    ]


def test_a_crash_leaves_the_old_data_and_no_temporaries(tmp_path):
    write_shards(synthetic_samples(4, img_size=8), tmp_path, samples_per_shard=2, progress=False)
    before = snapshot(tmp_path)

    def failing():
        yield from synthetic_samples(3, img_size=8, seed=1)
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError, match="source died"):
        write_shards(failing(), tmp_path, samples_per_shard=1, overwrite=True, progress=False)
    assert snapshot(tmp_path) == before

    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError):
        write_shards(failing(), fresh, samples_per_shard=1, progress=False)
    assert list(fresh.iterdir()) == []


@pytest.mark.parametrize(
    "samples, message",
    [
        ([("a", Image.new("L", (2, 2)), -1)], "label"),
        ([("a", Image.new("L", (2, 2)), 5)], "declares 3 classes"),
        ([("a", Image.new("L", (2, 2)), 0), ("b", Image.new("L", (2, 2)), None)], "labels"),
        ([("a.b", Image.new("L", (2, 2)), 0)], "key"),
        ([("a", Image.new("L", (2, 2)), 0), ("a", Image.new("L", (2, 2)), 1)], "key"),
        ([("a", "not an image", 0)], "PIL image"),
        ([], "No samples"),
    ],
)
def test_bad_samples_raise_data_error_and_write_nothing(tmp_path, samples, message):
    with pytest.raises(DataError, match=message):
        write_shards(samples, tmp_path / "out", num_classes=3, progress=False)
    assert list((tmp_path / "out").iterdir()) == []


def test_bad_limits_raise_config_error(tmp_path):
    with pytest.raises(ConfigError):
        write_shards([], tmp_path, samples_per_shard=0)
    with pytest.raises(ConfigError):
        write_shards([], tmp_path, max_shard_bytes=100)


def test_make_shards_synthetic_returns_urls(tmp_path):
    index, urls = make_shards("synthetic", tmp_path / "d", num_samples=10, num_classes=5, img_size=8,
                              samples_per_shard=4, progress=False)
    assert urls == str(tmp_path / "d" / "shard-{000000..000002}.tar")
    assert index["num_classes"] == 5 and index["class_names"] == ["disc", "square", "triangle", "ring", "cross"]
    assert os.path.getsize(tmp_path / "d" / "shard-000002.tar") > 0


def test_make_shards_tool(tmp_path, capsys):
    import runpy
    from pathlib import Path

    from mae_vit.config.cli import run_tool

    tool = runpy.run_path(str(Path(__file__).parents[1] / "tools" / "make_shards.py"))
    argv = ["source=synthetic", f"output_dir={tmp_path}", "num_samples=6", "img_size=8", "samples_per_shard=4"]
    index = run_tool(tool["main"], argv)
    assert index["shards"] == {"shard-000000.tar": 4, "shard-000001.tar": 2}
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path / "shard-{000000..000001}.tar")
    with pytest.raises(SystemExit) as exit_info:  # existing shards: a user error, exit status 2
        run_tool(tool["main"], argv)
    assert exit_info.value.code == 2 and "overwrite" in capsys.readouterr().err


KILLED_WRITER = """
import os, sys
from mae_vit.data import writer
from mae_vit.data.synthetic import synthetic_samples
out, when, overwrite = sys.argv[1], sys.argv[2], sys.argv[3] == "1"

def samples():
    for i, sample in enumerate(synthetic_samples(300, img_size=8, seed=int(overwrite))):
        if when == "writing" and i == 150:
            os._exit(9)  # killed while writing the shards: no clean-up runs
        yield sample

if when == "commit":  # killed after two of the six shards got their final names
    real, done = os.replace, []
    def replace(src, dst):
        if str(dst).endswith(".tar") and len(done) == 2:
            os._exit(9)
        done.append(dst)
        real(src, dst)
    writer.os.replace = replace
writer.write_shards(samples(), out, samples_per_shard=50, overwrite=overwrite, progress=False)
"""


def killed_write(tmp_path, out, when, overwrite):
    script = tmp_path / "killed_writer.py"
    script.write_text(KILLED_WRITER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, str(script), str(out), when, "1" if overwrite else "0"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 9, result.stderr[-2000:]


def test_a_killed_writer_leaves_no_temporary_files_after_the_next_run(tmp_path):
    out = tmp_path / "shards"
    killed_write(tmp_path, out, "writing", overwrite=False)
    assert list(out.glob(".shard-*.partial-*"))  # what the kill left
    index = write_shards(synthetic_samples(300, img_size=8), out, samples_per_shard=50, progress=False)
    assert index["num_samples"] == 300 and not list(out.glob(".*partial*"))


def test_an_overwrite_killed_midway_is_refused_by_the_reader_and_finished_by_the_next_run(tmp_path):
    out = tmp_path / "shards"
    write_shards(synthetic_samples(300, img_size=8), out, samples_per_shard=50, progress=False)
    killed_write(tmp_path, out, "commit", overwrite=True)  # two new shards in place, four old ones
    urls = shard_urls(out, "shard", 6)
    with pytest.raises(DataError, match="still changing when it was interrupted"):
        make_loader(urls, batch_size=10)
    index = write_shards(synthetic_samples(300, img_size=8, seed=1), out, samples_per_shard=50, progress=False)
    assert index["num_samples"] == 300 and not (out / "shard-INCOMPLETE").exists()
    assert sum(len(b["key"]) for b in make_loader(urls, batch_size=10, drop_last=False)) == 300


def test_the_index_records_the_statistics_the_reader_will_see_as_numpy_computes_them(tmp_path):
    rng = np.random.default_rng(0)
    rgb = [rng.integers(0, 256, (6, 5, 3), dtype=np.uint8) for _ in range(3)]
    deep = (np.linspace(0, 65535, 20).reshape(4, 5)).astype(np.uint16)  # a 16-bit grey image: scaled, not clipped
    samples = [(f"k{i}", Image.fromarray(a), None) for i, a in enumerate(rgb)]
    samples += [("k3", Image.fromarray(rgb[0]), None), ("k4", Image.fromarray(deep), None)]  # k3: a duplicate
    stats = write_shards(samples, tmp_path / "s", progress=False, unreadable=["bad.png"])["stats"]
    grey_of_deep = np.round(deep.astype(np.float64) * 255 / 65535)
    pixels = np.concatenate([a.reshape(-1, 3) for a in (*rgb, rgb[0])] + [np.repeat(grey_of_deep.reshape(-1, 1), 3, 1)])
    pixels = pixels / 255.0
    np.testing.assert_allclose(stats["rgb"]["mean"], pixels.mean(0), atol=1e-6)
    np.testing.assert_allclose(stats["rgb"]["std"], pixels.std(0), atol=1e-6)
    assert (stats["images"], stats["duplicates"], stats["unreadable"]) == (5, 1, 1)
    assert stats["sizes"] == {"5x6": 4, "5x4": 1}
    from mae_vit.data import read_index
    assert read_index(shard_urls(tmp_path / "s", "shard", 1))["stats"] == stats  # what the training tools read


def test_an_output_dir_that_cannot_be_made_is_a_data_error(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(DataError, match="cannot be made"):
        write_shards(synthetic_samples(2, img_size=8), tmp_path / "a_file" / "shards", progress=False)
