"""Shards, index and sidecar read from URLs, as WebDataset opens them, so that nodes need no
shared filesystem for data.

A *location* of converted shards is one of

- a local directory: ``data/shards/train``;
- an ``http://`` or ``https://`` base URL: file ``name`` is ``<base>/<name>``, fetched by
  :func:`webdataset.gopen.gopen` (a ``curl -f -s -L`` subprocess; curl itself retries failed
  connections, timeouts and 5xx answers);
- a ``pipe:`` command template holding ``{name}``, for object stores, e.g.
  ``pipe:aws s3 cp s3://bucket/omol25/train/{name} -`` or ``pipe:gsutil cat gs://b/train/{name}``
  (the command writes the file to stdout; opened by webdataset's ``pipe:`` handler; a
  non-zero exit status is an error).

``index.json`` and the ``natoms.npy`` sidecar are read from the same location; the sidecar is
downloaded once into ``$SYMSCALE_CACHE/sidecars/<sha256>.npy`` (default ``~/.cache/symscale``),
checked against the SHA-256 the index records, and memory-mapped from there (ranks of a node
share it). Nothing else is cached: shards stream.

A shard read that fails part way (connection dropped, command failed, file shorter than the
index says) is retried from the first row not yet delivered, at most ``retries`` times, each
retry logged on the ``datapipe.remote`` logger; then :class:`datapipe.shards.ShardError` names the
shard and the attempts. Rows are checked against the index as they stream (row numbers, atom
counts, the row count), so a short read can never pass as a short epoch.

>>> join("https://host/omol25/train/", "a-000000.tar")
'https://host/omol25/train/a-000000.tar'
>>> join("pipe:aws s3 cp s3://bucket/train/{name} -", "a-000000.tar")
'pipe:aws s3 cp s3://bucket/train/a-000000.tar -'
>>> is_remote("data/shards/train"), is_remote("http://127.0.0.1:8000/train")
(False, True)
"""

from __future__ import annotations

import hashlib
import logging
import os
import shlex
import urllib.parse
from pathlib import Path

log = logging.getLogger(__name__)

SCHEMES = ("http://", "https://", "pipe:")


def is_remote(location: str | os.PathLike) -> bool:
    """True for ``http(s)://`` URLs and ``pipe:`` templates, False for local paths."""
    return isinstance(location, str) and location.startswith(SCHEMES)


def join(location: str | os.PathLike, name: str) -> str:
    """Where file ``name`` of ``location`` is read from (path, URL or ``pipe:`` command).

    Raises ValueError for a ``pipe:`` location without the ``{name}`` placeholder."""
    if not is_remote(location):
        return os.path.join(os.fspath(location), name)
    if location.startswith("pipe:"):
        if "{name}" not in location:
            raise ValueError(f"{location!r}: a pipe: location needs {{name}} where the file name goes")
        return location.replace("{name}", shlex.quote(name))
    return location.rstrip("/") + "/" + urllib.parse.quote(name)


def open_stream(url: str):
    """A binary file-like object streaming ``url`` (webdataset's gopen: curl or the pipe).

    Closing it early (before the end) is not an error; an exit status of the subprocess that
    is not 0 (or curl's 23, 'reader went away') raises OSError on read or close."""
    from webdataset.gopen import gopen

    return gopen(url, "rb")


def close_early(stream) -> None:
    """Close a stream that was not read to its end: the writer's broken-pipe exit is expected."""
    from webdataset.gopen import set_options

    set_options(stream, ignore_errors=True)
    stream.close()


def read_bytes(url: str) -> bytes:
    """All bytes of ``url``. Raises OSError naming the URL when it cannot be fetched."""
    try:
        stream = open_stream(url)
        try:
            return stream.read()
        finally:
            stream.close()
    except OSError as error:
        raise OSError(f"cannot fetch {url}: {error}") from error


def cache_dir() -> Path:
    """``$SYMSCALE_CACHE/sidecars``, else ``~/.cache/symscale/sidecars``."""
    root = os.environ.get("SYMSCALE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "symscale")
    return Path(root) / "sidecars"


def fetch_cached(url: str, sha256: str, size: int) -> Path:
    """A verified local copy of ``url`` (``size`` bytes, hex ``sha256``), downloaded once.

    Raises ValueError naming the URL when the bytes fetched are not those the index records,
    OSError when they cannot be fetched."""
    path = cache_dir() / f"{sha256}.npy"
    if path.is_file() and path.stat().st_size == size:
        return path  # named by its hash; the caller checks the hash again
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    digest, written = hashlib.sha256(), 0
    try:
        stream = open_stream(url)
        with open(tmp, "wb") as out:
            try:
                while block := stream.read(1 << 20):
                    digest.update(block)
                    out.write(block)
                    written += len(block)
            finally:
                stream.close()
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise OSError(f"cannot fetch {url}: {error}") from error
    if written != size or digest.hexdigest() != sha256:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"{url}: fetched {written} bytes with sha256 {digest.hexdigest()[:12]}…, the index records "
                         f"{size} bytes with sha256 {sha256[:12]}…")
    os.replace(tmp, path)
    return path
