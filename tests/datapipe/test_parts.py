"""Conversion split across machines (parts over ranges of the input files, then a merge) is
byte-identical to the one-machine conversion: every shard, the sidecar and index.json."""

from __future__ import annotations

import shutil

import pytest

from molecules import write_aselmdb
from datapipe.convert import convert
from datapipe.index import ShardIndex
from datapipe.parts import convert_part, main, merge


def _files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def three_inputs(raw_dir, tmp_path_factory):
    """raw_dir's two files and a third (stem sorted between them), one of 30 molecules."""
    directory = tmp_path_factory.mktemp("three")
    for p in raw_dir.glob("*.aselmdb"):
        shutil.copy2(p, directory / p.name)
    write_aselmdb(directory / "partAB.aselmdb", 30, seed=3)
    return directory


@pytest.mark.parametrize("n", [2, 3, 5])
def test_parts_then_merge_equal_one_machine_byte_for_byte(three_inputs, tmp_path, n):
    whole = tmp_path / "whole"
    convert([three_inputs], whole, shard_size=40, workers=1)
    split = tmp_path / "split"
    machines = [tmp_path / f"machine{i}" for i in range(n)]
    for i, folder in enumerate(machines):  # each machine its own folder (no shared filesystem) ...
        convert_part([three_inputs], folder, part=(i, n), shard_size=40)
    split.mkdir()
    for folder in machines:  # ... gathered into one (rsync), then merged
        for p in folder.iterdir():
            shutil.copy2(p, split / p.name)
    index = merge(split)
    assert _files(split) == _files(whole)  # shards, natoms.npy and index.json, byte for byte
    assert index.data_hash == ShardIndex.load(whole).data_hash and index.n_structures == 270


def test_merge_refuses_missing_or_foreign_parts(three_inputs, raw_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(three_inputs), "--out", str(out), "--part", "0/3", "--shard-size", "40"]) == 0
    assert main([str(three_inputs), "--out", str(out), "--part", "2/3", "--shard-size", "40"]) == 0
    with pytest.raises(FileNotFoundError, match="parts 1/3 are missing"):
        merge(out)
    convert_part([raw_dir], out, part=(1, 3), shard_size=40)  # a part of other inputs
    with pytest.raises(ValueError, match="another conversion"):
        merge(out)
    convert_part([three_inputs], out, part=(1, 3), shard_size=40)  # the right one replaces it
    victim = next(out.glob("partB-*.tar"))
    data = victim.read_bytes()
    victim.write_bytes(data[:-512])
    assert main(["--merge", str(out)]) == 2 and victim.name in capsys.readouterr().err
    victim.write_bytes(data)
    assert main(["--merge", str(out)]) == 0 and "270 structures" in capsys.readouterr().out
    assert not list(out.glob("*.part-*"))  # the part files are gone
    with pytest.raises(ValueError, match="0 <= i < n"):
        convert_part([three_inputs], out, part=(3, 3))
