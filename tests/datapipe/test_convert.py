"""Conversion of OMol25-layout `.aselmdb` and ASE-readable files into shards + index."""

from __future__ import annotations

import json

import ase.db
import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from datapipe import keys
from datapipe.convert import convert, main
from datapipe.index import ShardIndex
from datapipe.shards import iter_shard
from datapipe.sources import check


def _read_all(index: ShardIndex) -> dict:
    records = {}
    for i, shard in enumerate(index.shards):
        for _, record in iter_shard(index.shard_path(i), index.natoms(i)):
            records[record.structure_id] = record
    return records


def test_aselmdb_in_omol25_layout_round_trips(raw_dir, shard_dir):
    index = ShardIndex.load(shard_dir)
    records = _read_all(index)
    assert index.n_structures == len(records) == 240
    assert [s["name"] for s in index.shards] == [f"part{p}-{k:06d}.tar" for p in "AB" for k in range(3)]
    numbers, energies, force_sq, n_force = [], [], 0.0, 0
    for part in "AB":
        db = ase.db.connect(str(raw_dir / f"part{part}.aselmdb"), readonly=True)
        try:
            for row_index, row in enumerate(db.select()):
                record = records[f"part{part}:{row_index}"]
                assert record.source == f"part{part}.aselmdb"
                np.testing.assert_array_equal(record.numbers, row.numbers)
                np.testing.assert_array_equal(record.positions, row.positions)
                np.testing.assert_array_equal(record.forces, row.forces)
                assert record.energy == row.energy
                assert (record.charge, record.spin) == (row.data["charge"], row.data["spin"])
                numbers.append(np.bincount(row.numbers, minlength=keys.MAX_ATOMIC_NUMBER + 1))
                energies.append(row.energy)
                force_sq += float(np.square(row.forces).sum())
                n_force += row.forces.size
        finally:
            db.close()
    composition = np.array(numbers, dtype=float)
    assert index.n_atoms == composition.sum() == sum(s["atoms"] for s in index.shards)
    assert index.element_counts == {z: int(n) for z, n in enumerate(composition.sum(0)) if n}
    assert index.force_rms == pytest.approx(np.sqrt(force_sq / n_force), rel=1e-12)
    present = composition.sum(0) > 0
    expected, *_ = np.linalg.lstsq(composition[:, present], np.array(energies), rcond=None)
    np.testing.assert_allclose(np.array(index.element_references)[present], expected, rtol=1e-6, atol=1e-6)
    assert not np.any(np.array(index.element_references)[~present])
    residual = np.array(energies) - composition[:, present] @ expected
    assert index.reference_rmse == pytest.approx(np.sqrt(np.mean(residual**2)), rel=1e-6)
    assert index.rejected == [] and index.raw["n_defaulted_charge_spin"] == 0


def test_shared_cases_rejected_by_id_with_reason(cases_dir, tmp_path, capsys):
    assert main([str(cases_dir), "--out", str(tmp_path), "--shard-size", "2"]) == 0
    index = ShardIndex.load(tmp_path)
    by_id = {item["id"]: item for item in index.rejected}
    assert set(by_id) == {"C03-coincident-atoms:0", "C05-dummy-atom-Z0:0"}
    assert by_id["C03-coincident-atoms:0"]["reason"] == "coincident atoms"
    assert by_id["C05-dummy-atom-Z0:0"]["reason"] == "unknown element"
    assert "[0]" in by_id["C05-dummy-atom-Z0:0"]["detail"]
    assert index.rejected_counts == {"coincident atoms": 1, "unknown element": 1}
    assert index.n_structures == 3 + 1 + 2  # C01, C02, C04 (C03, C05 rejected)
    out = capsys.readouterr().out
    assert "C03-coincident-atoms:0: coincident atoms" in out and "rejected 2" in out


def _labelled(numbers, positions, energy=-1.0, forces=None, **info):
    atoms = Atoms(numbers=numbers, positions=positions)
    forces = np.zeros((len(numbers), 3)) if forces is None else forces
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
    atoms.info.update(info)
    return atoms


def test_every_reject_reason_counted(tmp_path):
    water = [[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]
    frames = [
        _labelled([8, 1, 1], water, charge=0, spin=1),  # good
        _labelled([8, 1, 1], water, energy=float("nan"), charge=0, spin=1),
        _labelled([8, 1, 1], water, forces=np.array([[0, 0, np.inf]] * 3), charge=0, spin=1),
        _labelled([8, 1, 1], [[0, 0, 0], [0.05, 0, 0], [-0.24, 0.93, 0]], charge=0, spin=1),
        _labelled([8, 1, 101], water, charge=0, spin=1),
        _labelled([8, 1, 1], water),  # no charge/spin: defaulted to 0/1, counted
        _labelled([8, 1, 1], water, charge=0.5, spin=1),  # never rounded
        _labelled([8, 1, 1], water, charge=0, spin=2),  # 10 electrons need an odd multiplicity
        _labelled([8, 1, 1], water, charge=1, spin=2),  # the cation: 9 electrons, a doublet: good
    ]
    ase.io.write(tmp_path / "mixed.extxyz", frames)
    index = convert([tmp_path / "mixed.extxyz"], tmp_path / "out")
    assert [(r["id"], r["reason"]) for r in index.rejected] == [
        ("mixed:1", "non-finite energy"), ("mixed:2", "non-finite forces"),
        ("mixed:3", "coincident atoms"), ("mixed:4", "unknown element"),
        ("mixed:6", "invalid charge or spin"), ("mixed:7", "invalid charge or spin")]
    assert "charge 0.5 is not an integer" in index.rejected[4]["detail"]
    assert "multiplicity 2 does not match 10 electrons" in index.rejected[5]["detail"]
    assert index.n_structures == 3 and index.raw["n_defaulted_charge_spin"] == 1
    # a force array of the wrong shape (cannot be written to extxyz): checked on the Atoms
    bad = _labelled([8, 1, 1], water, charge=0, spin=1)
    bad.calc.results["forces"] = np.zeros((2, 3))
    record, reason, detail, _ = check(bad, "x:0", "x")
    assert record is None and reason == "forces shape" and "[2, 3]" in detail


def test_convert_is_deterministic_and_idempotent(raw_dir, shard_dir, tmp_path):
    files = sorted(raw_dir.glob("*.aselmdb"))
    other = convert(files[::-1], tmp_path, shard_size=40, workers=2)  # other order, 2 processes
    first = ShardIndex.load(shard_dir)
    assert other.data_hash == first.data_hash
    for shard in first.shards:
        assert (tmp_path / shard["name"]).read_bytes() == (shard_dir / shard["name"]).read_bytes()
    assert json.loads((tmp_path / "index.json").read_text())["shards"] == first.raw["shards"]
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    again = convert(files, tmp_path, shard_size=40, workers=2)  # up to date: nothing rewritten
    assert again.data_hash == first.data_hash
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamps
    changed = convert(files, tmp_path, shard_size=100)  # other settings: reconverted, stale shards gone
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == [f"part{p}-{k:06d}.tar" for p in "AB" for k in range(2)]
    assert changed.data_hash != first.data_hash and changed.n_structures == first.n_structures


def test_embedded_sample_file_converts_and_streams(tmp_path):
    """A file of the embedded OMol25-format sample (GFN2-xTB labels) through convert and loader."""
    from pathlib import Path

    from datapipe.loader import StreamingLoader

    sample = Path(__file__).resolve().parents[2] / "data" / "omol25_sample" / "val"
    files = sorted(sample.glob("*.aselmdb"))
    if not files:
        pytest.skip(f"embedded sample not found in {sample}")
    source = files[-1]
    index = convert([source], tmp_path, shard_size=300)
    db = ase.db.connect(str(source), readonly=True)
    try:
        rows = list(db.select())
    finally:
        db.close()
    assert index.n_structures + len(index.rejected) == len(rows)
    records = _read_all(index)
    for k in range(0, len(rows), max(1, len(rows) // 50)):
        row, record = rows[k], records.get(f"{source.stem}:{k}")
        if record is None:  # rejected (listed in the index)
            continue
        assert (record.charge, record.spin) == (row.data["charge"], row.data["spin"])
        np.testing.assert_array_equal(record.forces, row.forces)
    loaders = [StreamingLoader(tmp_path, rank=r, world_size=2, num_workers=0, atoms_per_batch=512) for r in range(2)]
    ids = [i for loader in loaders for batch in loader for i in batch[keys.STRUCTURE_ID]]
    assert len(ids) == len(set(ids)) == index.n_structures and loaders[0].steps == loaders[1].steps


def test_traj_and_ase_db_inputs(tmp_path):
    """ASE trajectory and ASE SQLite db (charge/spin in row.data, as OMol25's aselmdb) convert alike."""
    water = [[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]
    frames = [_labelled([8, 1, 1], np.array(water) * (1 + 0.01 * k), energy=-10.0 - k,
                        forces=np.full((3, 3), 0.1 * k)) for k in range(3)]
    ase.io.write(tmp_path / "w.traj", frames)
    db = ase.db.connect(str(tmp_path / "v.db"))
    for k, atoms in enumerate(frames):
        db.write(atoms, data={"charge": -1, "spin": (2, 4, 2)[k]})  # 11 electrons: even multiplicities
    index = convert([tmp_path / "w.traj", tmp_path / "v.db"], tmp_path / "out")
    records = _read_all(index)
    assert sorted(records) == ["v:0", "v:1", "v:2", "w:0", "w:1", "w:2"]
    for k in range(3):
        for name in ("v", "w"):
            np.testing.assert_array_equal(records[f"{name}:{k}"].positions, frames[k].positions)
            assert records[f"{name}:{k}"].energy == -10.0 - k
    assert [(records[f"v:{k}"].charge, records[f"v:{k}"].spin) for k in range(3)] == [(-1, 2), (-1, 4), (-1, 2)]
    assert index.raw["n_defaulted_charge_spin"] == 3  # the trajectory carries no charge/spin
