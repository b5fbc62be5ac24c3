"""Inputs as users pass them (any suffix case, folders, globs), the LMDB backend chosen explicitly,
and charge/spin checked where records come back from shards."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest

from datapipe import sources
from datapipe.convert import convert
from datapipe.shards import Record, ShardError, encode, iter_shard, shard_writer


def test_aselmdb_any_suffix_case_file_folder_or_glob(raw_dir, tmp_path):
    reference = convert([raw_dir], tmp_path / "reference")
    upper = tmp_path / "upper"
    upper.mkdir()
    shutil.copy(raw_dir / "partA.aselmdb", upper / "partA.ASELMDB")
    shutil.copy(raw_dir / "partB.aselmdb", upper / "partB.AseLmdb")
    (upper / "partA.ASELMDB-lock").write_bytes(b"")  # LMDB's lock file beside a database is not an input
    files = sorted(p for p in upper.iterdir() if not p.name.endswith("-lock"))
    for name, inputs in {"folder": [upper], "files": files,
                         "glob": [os.fspath(raw_dir / "part*.aselmdb")],
                         "glob-upper": [os.fspath(upper / "*.[Aa][Ss][Ee][Ll][Mm][Dd][Bb]")]}.items():
        index = convert(inputs, tmp_path / name)
        assert index.n_structures == reference.n_structures == 240, name
        assert index.n_atoms == reference.n_atoms, name
        assert index.force_rms == reference.force_rms, name
    same_names = convert([os.fspath(raw_dir / "part*.aselmdb")], tmp_path / "glob")
    assert same_names.data_hash == reference.data_hash  # the same bytes as the folder given plainly


def test_a_glob_that_matches_nothing_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"pattern .*\*\.aselmdb' matches no file"):
        convert([os.fspath(tmp_path / "*.aselmdb")], tmp_path / "out")


def test_missing_lmdb_backend_names_the_package(raw_dir, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ase_db_backends" else real(name, *a))
    with pytest.raises(ImportError, match="pip install ase-db-backends"):
        next(sources.iter_atoms(raw_dir / "partA.aselmdb"))
    with pytest.raises(RuntimeError, match="partA.aselmdb.*pip install ase-db-backends"):
        convert([raw_dir / "partA.aselmdb"], tmp_path / "out")


@pytest.mark.parametrize(("charge", "spin", "message"), [
    (0, 2, "spin multiplicity 2 does not match 10 electrons"),
    (0.5, 1, "charge 0.5 is not an integer"),
])
def test_loader_refuses_a_record_whose_charge_or_spin_is_invalid(tmp_path, charge, spin, message):
    """A shard written by another tool (or an older converter) is checked as it is read back."""
    water = np.array([[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]], dtype=float)
    good = Record("ok-water", "x", np.array([8, 1, 1]), water, -10.0, np.zeros((3, 3)), 0, 1)
    bad = encode(Record("bad-water", "x", np.array([8, 1, 1]), water, -10.0, np.zeros((3, 3)), 0, 1), 1)
    meta = json.loads(bad["json"])
    meta.update(charge=charge, spin=spin)  # as another writer might have stored them
    bad["json"] = json.dumps(meta).encode()
    writer = shard_writer(os.fspath(tmp_path / "s-%06d.tar"), 10)
    writer.write(encode(good, 0))
    writer.write(bad)
    writer.close()
    rows = iter_shard(tmp_path / "s-000000.tar", [3, 3])
    assert next(rows)[1].structure_id == "ok-water"
    with pytest.raises(ShardError, match=f"shard s-000000.tar: row 1: structure 'bad-water': {message}"):
        next(rows)
