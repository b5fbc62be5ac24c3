"""Conversion never writes over a user's files or over shards of other data (issue 15)."""

from __future__ import annotations

import pytest

from datapipe.convert import cached, convert
from datapipe.index import ShardIndex

from molecules import write_aselmdb


def test_refuses_a_folder_of_other_files(tmp_path):
    raw = tmp_path / "raw.aselmdb"
    write_aselmdb(raw, 6, seed=3)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "raw-000000.tar").write_bytes(b"the user's own shard, not ours")
    with pytest.raises(FileExistsError, match="not shards of this project"):
        convert([raw], mine, shard_size=4)
    assert (mine / "raw-000000.tar").read_bytes() == b"the user's own shard, not ours"
    assert convert([raw], mine, shard_size=4, force=True).n_structures == 6  # asked for explicitly


def test_refuses_shards_of_other_inputs_and_reuses_its_own(tmp_path):
    first, second = tmp_path / "first.aselmdb", tmp_path / "second.aselmdb"
    write_aselmdb(first, 6, seed=4)
    write_aselmdb(second, 5, seed=5)
    out = tmp_path / "shards"
    index = convert([first], out, shard_size=4)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(FileExistsError, match="holds shards of other data .*first.aselmdb"):
        convert([second], out, shard_size=4)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert cached([first], out, shard_size=4).data_hash == index.data_hash  # same inputs: reused, not redone
    assert cached([second], out, shard_size=4) is None
    assert ShardIndex.load(out).n_structures == 6
