"""Shards, index and sidecar streamed over HTTP from a server the test starts on 127.0.0.1 (and
through ``pipe:`` commands): the same epoch as from the local folder; a connection dropped mid-
shard is retried (logged) or, when it keeps failing, a clear error naming the shard; a shard
shorter than its index is never a short epoch."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest

from datapipe import keys
from datapipe.index import NATOMS_NAME, ShardIndex
from datapipe.loader import StreamingLoader
from datapipe.remote import cache_dir
from datapipe.shards import ShardError
from http_server import serve


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SYMSCALE_CACHE", str(tmp_path / "cache"))


def _ids(location, world_size=2, num_workers=0, **kwargs):
    loaders = [StreamingLoader(location, rank=r, world_size=world_size, num_workers=num_workers,
                               atoms_per_batch=150, shuffle_buffer=40, seed=7, **kwargs) for r in range(world_size)]
    return [[list(b[keys.STRUCTURE_ID]) for b in loader] for loader in loaders]


def test_http_stream_equals_local_folder(shard_dir):
    local = _ids(shard_dir, num_workers=2)
    with serve(shard_dir) as (url, handler):
        index = ShardIndex.load(url)
        assert index.directory is None and index.data_hash == ShardIndex.load(shard_dir).data_hash
        cached = cache_dir() / f"{index.raw['natoms']['sha256']}.npy"  # fetched once, verified, mapped
        assert cached.read_bytes() == (shard_dir / NATOMS_NAME).read_bytes()
        assert _ids(url, num_workers=2) == local
        assert _ids(url, world_size=1, num_workers=0, max_structures=50)[0] == \
            _ids(shard_dir, world_size=1, num_workers=0, max_structures=50)[0]
    assert handler.requests.count(NATOMS_NAME) == 1  # the second load used the cache


def test_dropped_connection_is_retried_and_logged(shard_dir, caplog):
    index = ShardIndex.load(shard_dir)
    victim = index.shards[3]["name"]
    local = _ids(shard_dir)
    with serve(shard_dir) as (url, handler):
        handler.drops[victim] = 2
        with caplog.at_level(logging.WARNING, logger="datapipe.remote"):
            assert _ids(url, retry_delay=0.0) == local  # the same epoch, nothing lost or repeated
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 2 and all(victim in m for m in retries)
    assert handler.requests.count(victim) == 3


def test_connection_dropped_every_time_names_the_shard(shard_dir):
    victim = ShardIndex.load(shard_dir).shards[1]["name"]
    with serve(shard_dir) as (url, handler):
        handler.drops[victim] = 100
        with pytest.raises(ShardError, match=rf"{victim}.*gave up after 3 attempts"):
            _ids(url, retries=2, retry_delay=0.0)
        assert handler.requests.count(victim) == 3
        with pytest.raises(ShardError, match=victim):  # the same through DataLoader workers
            _ids(url, num_workers=2, retries=1, retry_delay=0.0)


def test_short_shard_on_the_server_is_an_error_not_a_short_epoch(shard_dir, tmp_path):
    served = tmp_path / "served"
    shutil.copytree(shard_dir, served)
    index = ShardIndex.load(served)
    victim = index.shards[4]["name"]
    data = (served / victim).read_bytes()
    (served / victim).write_bytes(data[: len(data) // 3])  # a complete HTTP answer of a short file
    with serve(served) as (url, _):
        with pytest.raises(ShardError, match=rf"{victim}.*(truncated|unreadable)"):
            _ids(url, retries=1, retry_delay=0.0)


def test_pipe_commands_and_a_tampered_sidecar(shard_dir, tmp_path):
    local = _ids(shard_dir)
    assert _ids(f"pipe:cat {shard_dir}/{{name}}") == local  # an object-store CLI writing to stdout
    with serve(shard_dir) as (url, _):
        assert _ids(f"pipe:curl -s -f -L {url}{{name}}") == local
    with pytest.raises(ValueError, match="needs {name}"):
        ShardIndex.load("pipe:cat /nowhere/index.json")
    gone = tmp_path / "gone"
    shutil.copytree(shard_dir, gone)
    victim = ShardIndex.load(gone).shards[0]["name"]
    (gone / victim).unlink()
    with pytest.raises(ShardError, match=victim):  # the command fails (exit 1): an error, not an empty shard
        _ids(f"pipe:cat {gone}/{{name}}", retries=1, retry_delay=0.0)
    counts = np.load(gone / NATOMS_NAME)
    counts[0] += 1
    np.save(gone / NATOMS_NAME, counts)
    shutil.rmtree(cache_dir())  # the good copy cached above would be used (it is named by its hash)
    with serve(gone) as (url, _):
        with pytest.raises(ValueError, match=rf"{NATOMS_NAME}: fetched .* the index records"):
            ShardIndex.load(url)
