"""Training from shards served over http (a real `http.server` on 127.0.0.1) and through `pipe:` commands: the
index is read beside them (or from `data.index`), dropped connections are retried without losing or doubling a
sample, a shard that stays unreadable is skipped and counted, and the epoch plan is the local one."""

import json
import logging
import socket
import threading
from collections import Counter
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mae_vit.config import PretrainConfig, parse_config
from mae_vit.data import make_loader, make_shards, rank_batch_counts, read_index, remote
from mae_vit.data.urls import expand_urls, use_index
from mae_vit.errors import ConfigError, DataError
from mae_vit.train.rundir import RunDir, read_state

# a very small MAE (as in test_pretrain.py): 16 px, patches of 4, 2 blocks of 48, a 1-block decoder
TINY = ["model.img_size=16", "model.embed_dim=48", "model.depth=2", "model.num_heads=3", "model.decoder_embed_dim=32",
        "model.decoder_depth=1", "model.decoder_num_heads=2", "data.batch_size=8", "data.num_workers=0",
        "optim.warmup_epochs=0", "train.log_every=2", "train.vis_every=1000", "knn.vs_random=false"]
SHARDS, PER_SHARD = 6, 8  # 48 samples: 6 steps of 8 per epoch


class _Handler(SimpleHTTPRequestHandler):
    """Serves the server's folder; every `drop_every`-th shard request (and every request of a `broken` shard)
    sends the full Content-Length but only half of the bytes, then closes the connection."""

    def copyfile(self, source, outputfile):
        state = self.server.state
        name = self.path.rsplit("/", 1)[-1]
        if name.endswith(".tar"):
            with state["lock"]:
                state["requests"][name] += 1
                state["count"] += 1
                drop = name in state["broken"] or (state["drop_every"] and state["count"] % state["drop_every"] == 0)
                state["dropped"] += drop
            if drop:
                data = source.read()
                outputfile.write(data[: len(data) // 2])
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
        super().copyfile(source, outputfile)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """(base URL, state) of an http server on 127.0.0.1 serving tmp_path/www; state: drop_every, broken."""
    root = tmp_path / "www"
    root.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(root)))
    httpd.daemon_threads = True
    httpd.handle_error = lambda *args: None  # a dropped connection is the point, not a traceback
    httpd.state = {"lock": threading.Lock(), "requests": Counter(), "count": 0, "drop_every": 0, "broken": set(),
                   "dropped": 0}
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd.state, root
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(remote, "RETRY_DELAYS", (0.01, 0.02, 0.04))


def _write(folder: Path) -> str:
    """SHARDS x PER_SHARD labelled synthetic samples of 16 px in `folder`; returns the local brace spec."""
    _, spec = make_shards("synthetic", folder, num_samples=SHARDS * PER_SHARD, img_size=16, num_classes=4,
                          samples_per_shard=PER_SHARD, progress=False)
    return spec


def _http_spec(base: str) -> str:
    return f"{base}/data/shard-{{000000..{SHARDS - 1:06d}}}.tar"


def _keys(urls: str, num_workers: int = 2, labels: bool = False) -> Counter:
    """How often each sample key comes in one epoch of a loader (file order, every sample kept)."""
    loader = make_loader(urls, batch_size=4, num_workers=num_workers, shuffle=False, drop_last=False,
                         with_labels=labels)
    seen = Counter()
    for batch in loader:
        seen.update(batch.get("key", []))
    return seen


def test_the_index_of_http_shards_is_read_beside_them(server):
    base, _, root = server
    local = _write(root / "data")
    index = read_index(_http_spec(base))
    assert index is not None, "no index for http shards"
    assert index["num_samples"] == SHARDS * PER_SHARD and list(index["shards"].values()) == [PER_SHARD] * SHARDS
    assert index["num_classes"] == 4 and index["stats"] == read_index(local)["stats"]


def test_http_shards_without_an_index_are_a_data_error_that_says_what_to_pass(server):
    base, _, root = server
    _write(root / "data")
    (root / "data" / "shard-index.json").unlink()
    (root / "data" / "shard-index.wids.json").unlink(missing_ok=True)
    with pytest.raises(DataError, match=f"looked for {base}/data/shard-index.json.*data.index"):
        rank_batch_counts(_http_spec(base), world_size=1, num_workers=2, batch_size=4)


def test_dropped_connections_are_retried_and_no_sample_is_lost_or_doubled(server, caplog):
    base, state, root = server
    local = _write(root / "data")
    state["drop_every"] = 3
    seen = _keys(_http_spec(base))  # 2 workers
    assert state["dropped"] == 2
    assert seen == _keys(local) and set(seen.values()) == {1} and len(seen) == SHARDS * PER_SHARD
    with caplog.at_level(logging.WARNING):  # in this process, where caplog sees the log
        assert _keys(_http_spec(base), num_workers=0) == seen
    assert state["dropped"] == 5
    assert caplog.text.count("retrying") == 3 and f"reading shard {base}/data/shard-" in caplog.text
    assert "curl exited with status 18 (the connection closed before the whole file came)" in caplog.text


def test_a_shard_that_stays_unreadable_is_skipped_counted_and_logged_with_its_url(server, caplog):
    base, state, root = server
    _write(root / "data")
    state["broken"] = {"shard-000002.tar"}
    loader = make_loader(_http_spec(base), batch_size=4, num_workers=0, shuffle=False, drop_last=False,
                         with_labels=False)
    with caplog.at_level(logging.WARNING):
        batches = list(loader)
    keys = [k for b in batches for k in b.get("key", [])]
    assert len(keys) == len(set(keys)) and len(keys) >= (SHARDS - 1) * PER_SHARD
    assert sum(b["skipped_shards"] for b in batches) == 1
    assert len(keys) + sum(b["skipped"] for b in batches) == SHARDS * PER_SHARD  # the lost samples are counted
    assert state["requests"]["shard-000002.tar"] == 1 + len(remote.RETRY_DELAYS)
    assert f"{base}/data/shard-000002.tar" in caplog.text


def test_a_pipe_spec_reads_its_index_from_data_index(tmp_path):
    local = _write(tmp_path / "data")
    spec = f"pipe:cat {tmp_path}/data/shard-{{000000..{SHARDS - 1:06d}}}.tar"
    with pytest.raises(DataError, match="pass data.index="):
        rank_batch_counts(spec, world_size=1, num_workers=2, batch_size=4)
    with pytest.raises(DataError, match="pass data.index="):  # the training tool: before anything is written
        _pretrain(tmp_path / "run", spec, "--allow-shell")
    assert not (tmp_path / "run" / "config.yaml").exists()
    with pytest.raises(DataError, match="cannot be read as a shard index"):
        use_index(spec, str(tmp_path / "missing.json"))
    (tmp_path / "other.json").write_text(json.dumps({"shards": {"other-000000.tar": 3}}))
    with pytest.raises(DataError, match="shard-000000.tar is not in the index .*other.json.*lists other-000000.tar"):
        use_index(spec, str(tmp_path / "other.json"))
    use_index(spec, f"pipe:cat {tmp_path}/data/shard-index.json")
    assert read_index(spec)["num_samples"] == SHARDS * PER_SHARD
    assert rank_batch_counts(spec, world_size=1, num_workers=2, batch_size=4) == \
        rank_batch_counts(local, world_size=1, num_workers=2, batch_size=4)
    assert _keys(spec) == _keys(local)


def test_data_index_is_a_url_key_of_the_trust_rule(tmp_path):
    with pytest.raises(ConfigError, match="'data.index' is 'pipe:cat x'.*--allow-shell"):
        parse_config(PretrainConfig, ["data.index=pipe:cat x"])
    cfg = parse_config(PretrainConfig, ["data.index=pipe:cat x", "--allow-shell"])
    assert cfg.data.index == "pipe:cat x"


def test_make_shards_writes_a_wids_index_and_a_folder_with_only_that_index_is_read(tmp_path):
    _write(tmp_path / "data")
    wids_index = json.loads((tmp_path / "data" / "shard-index.wids.json").read_text())
    assert wids_index["__kind__"] == "wids-shard-index-v1" and wids_index["wids_version"] == 1
    assert [(s["url"], s["nsamples"]) for s in wids_index["shardlist"]] == [
        (f"shard-{i:06d}.tar", PER_SHARD) for i in range(SHARDS)]
    assert all(s["filesize"] == (tmp_path / "data" / s["url"]).stat().st_size for s in wids_index["shardlist"])
    (tmp_path / "data" / "shard-index.json").unlink()
    index = read_index(str(tmp_path / "data"))
    assert index["num_samples"] == SHARDS * PER_SHARD and index["stats"] is None and not index["labels_known"]
    assert sum(_keys(str(tmp_path / "data"), labels=True).values()) == SHARDS * PER_SHARD  # labels: not refused


def test_a_wids_index_as_widsindex_writes_it_is_read_too(server):
    base, _, root = server
    _write(root / "data")
    listed = json.loads((root / "data" / "shard-index.wids.json").read_text())["shardlist"]
    for entry in listed:  # `widsindex create` keeps the URLs it was given and adds checksums
        entry.update(url=f"{base}/data/{entry['url']}", md5sum="0" * 32)
    for name in ("shard-index.json", "shard-index.wids.json"):
        (root / "data" / name).unlink()
    (root / "data" / "shardindex.json").write_text(json.dumps({"__kind__": "wids-shard-index-v1", "wids_version": 1,
                                                              "shardlist": listed}))
    assert list(read_index(_http_spec(base))["shards"].values()) == [PER_SHARD] * SHARDS


def test_webdatasets_wids_reads_the_shards_make_shards_wrote(tmp_path):
    wids = pytest.importorskip("wids", reason="wids (webdataset's indexed reader) is a package of its own")
    _write(tmp_path / "data")
    dataset = wids.ShardListDataset(str(tmp_path / "data" / "shard-index.wids.json"),
                                    cache_dir=str(tmp_path / "cache"))
    assert len(dataset) == SHARDS * PER_SHARD
    assert sorted(dataset[i]["__key__"] for i in range(len(dataset))) == sorted(_keys(str(tmp_path / "data")))


def _pretrain(out: Path, data: str, *extra: str) -> dict:
    from mae_vit.tasks.pretrain import pretrain

    return pretrain(parse_config(PretrainConfig, ["--output-dir", str(out), "--data", data, *TINY, *extra]))


@pytest.mark.slow  # four whole training runs
def test_a_run_over_http_matches_the_local_run_and_resumes_mid_epoch(server, tmp_path):
    base, state, root = server
    local = _write(root / "data")
    common = ["optim.epochs=2", "train.save_every=2", "optim.base_lr=1e-3"]
    over_local = _pretrain(tmp_path / "local", local, *common)
    state["drop_every"] = 5
    over_http = _pretrain(tmp_path / "http", _http_spec(base), *common)
    stopped = _pretrain(tmp_path / "resumed", _http_spec(base), *common, "train.max_steps=3")  # mid-epoch 1
    assert stopped["step"] == 3
    resumed = _pretrain(tmp_path / "resumed", _http_spec(base), *common)
    assert state["dropped"] >= 4
    steps = 2 * SHARDS * PER_SHARD // 8
    assert over_local["step"] == over_http["step"] == resumed["step"] == steps
    # the same samples in the same order (and the same normalisation, from the index): the same losses
    assert (over_http["first_loss"], over_http["last_loss"]) == (over_local["first_loss"], over_local["last_loss"])
    assert resumed["last_loss"] == pytest.approx(over_local["last_loss"], rel=0.05)  # crops are drawn anew
    states = [read_state(RunDir(tmp_path / name).latest()) for name in ("local", "http", "resumed")]
    assert {(s.samples_per_epoch, s.samples_seen, s.skipped_samples) for s in states} == {
        (SHARDS * PER_SHARD, steps * 8, 0)}


@pytest.mark.slow  # a whole training run
def test_a_run_with_a_shard_that_stays_unreadable_takes_the_planned_steps_and_counts_the_loss(server, tmp_path):
    base, state, root = server
    _write(root / "data")
    state["broken"] = {"shard-000004.tar"}
    summary = _pretrain(tmp_path / "run", _http_spec(base), "optim.epochs=1")
    assert summary["step"] == SHARDS * PER_SHARD // 8  # the plan's steps: the share is read again to fill them
    done = read_state(RunDir(tmp_path / "run").latest())
    assert done.samples_per_epoch == SHARDS * PER_SHARD and 0 < done.skipped_samples <= PER_SHARD


def test_expanded_http_urls_are_kept_as_they_are():
    assert expand_urls("http://h/s-{0..1}.tar") == ["http://h/s-0.tar", "http://h/s-1.tar"]
