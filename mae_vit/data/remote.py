"""Reading shards and their index through webdataset's opener (`gopen`: files, http(s) via curl, `pipe:` commands,
gs://, ...), with retries for remote reads.

A remote read that fails -- a connection dropped mid-shard, an HTTP error, a pipe command that exits with an error,
or a shard that ends before the samples its index lists -- is tried again after each of `RETRY_DELAYS` seconds.
A retried shard is read again from its start, and the samples already yielded are passed over, so that a shard gives
each sample once however often it is retried. Local files are read once: their errors do not go away.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import PurePosixPath
from typing import Generator
from urllib.parse import urlparse

from webdataset.gopen import gopen
from webdataset.handlers import reraise_exception
from webdataset.tariterators import group_by_keys, tar_file_expander

log = logging.getLogger(__name__)

RETRY_DELAYS = (1.0, 2.0, 4.0)  # seconds before each new try of a remote read that failed
# what curl's exit status means, for the errors gopen raises when curl (http, https, ...) exits with one
_CURL_EXITS = {6: "the host name could not be resolved", 7: "the server could not be reached",
               18: "the connection closed before the whole file came", 22: "the server answered with an HTTP error",
               28: "the transfer timed out", 52: "the server sent nothing", 56: "the connection was broken"}
_EXIT_RE = re.compile(r"exit (\d+) \(read\)")
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+:")
_TAR_IN_COMMAND = re.compile(r"[^\s'\"/=]+\.tar\b")


def is_remote(url: str) -> bool:
    """True for `pipe:`/`http(s)://`/other schemes; False for plain paths and `file:` URLs."""
    return bool(_SCHEME_RE.match(url)) and not url.startswith("file:")


def remote_shard_name(url: str) -> str | None:
    """The file name of a remote shard: the last part of a URL's path; for a `pipe:` command the last `*.tar` name in
    it (`pipe:aws s3 cp s3://bucket/train/shard-000001.tar -` -> `shard-000001.tar`); None when there is none."""
    if url.startswith("pipe:"):
        names = _TAR_IN_COMMAND.findall(url[len("pipe:"):])
        return names[-1] if names else None
    return PurePosixPath(urlparse(url).path).name or None


def tar_samples(url: str) -> Generator[dict, None, Exception | None]:
    """Samples of one shard via webdataset's tar iteration; returns the error that stopped it, if any."""
    stream = None
    try:
        stream = gopen(url)
        files = tar_file_expander([{"url": url, "stream": stream}], handler=reraise_exception)
        yield from group_by_keys(files, handler=reraise_exception)
        return None
    except Exception as exc:  # missing file, not a tar, truncated, pipe failure: reported by the caller
        return exc
    finally:
        if stream is not None:
            try:
                stream.close()
            except Exception:  # a failed pipe: already reported by the read
                pass


def shard_samples(url: str, expected: int | None = None) -> Generator[dict, None, tuple[int, object]]:
    """Samples of one shard, a remote one retried (see module doc); returns (samples read, the error that stopped
    the last try or None). Fewer samples than `expected` (its index's count) is an error too."""
    done, tries = 0, 1 + (len(RETRY_DELAYS) if is_remote(url) else 0)
    error: object = None
    for attempt in range(tries):
        if attempt:
            log.warning("reading shard %s failed after %d samples (%s); retrying in %g s (try %d of %d), passing over "
                        "the samples already read", url, done, error, RETRY_DELAYS[attempt - 1], attempt + 1, tries)
            time.sleep(RETRY_DELAYS[attempt - 1])
        reader, read = tar_samples(url), 0
        try:
            while True:
                try:
                    sample = next(reader)
                except StopIteration as stop:
                    error = stop.value
                    break
                read += 1
                if read > done:  # not yielded by an earlier try
                    done = read
                    yield sample
        finally:
            reader.close()
        if error is None and expected is not None and done < expected:
            error = f"it ended after {done} of the {expected} samples its index lists"
        if error is None:
            return done, None
        error = describe(error)
    return done, error


def describe(error: object) -> str:
    """A read error in a line: gopen's failed pipe (its whole command line and objects) becomes the exit status of
    the command and, for curl, what it means."""
    text = str(error)
    match = _EXIT_RE.search(text)
    if match is None:
        return text
    status = int(match[1])
    command = "curl" if "'curl'" in text else "the pipe: command"
    return f"{command} exited with status {status}" + (f" ({_CURL_EXITS[status]})" if command == "curl" and
                                                         status in _CURL_EXITS else "")


def fetch_first(urls: list[str]) -> tuple[str, bytes] | None:
    """(url, content) of the first of `urls` that can be read whole, trying them all again after each of
    RETRY_DELAYS; None when none could be read."""
    failures: dict[str, str] = {}
    for attempt in range(1 + (len(RETRY_DELAYS) if any(is_remote(url) for url in urls) else 0)):
        if attempt:
            time.sleep(RETRY_DELAYS[attempt - 1])
        for url in urls:
            try:
                stream = gopen(url)
                try:
                    data = stream.read()
                finally:
                    stream.close()  # a pipe's exit status (curl: the HTTP status) is checked here
                return url, data
            except Exception as exc:
                failures[url] = describe(exc) or type(exc).__name__
    log.info("could not read %s: %s", " nor ".join(urls), "; ".join(failures.values()))
    return None
