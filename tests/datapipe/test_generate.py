"""The embedded OMol25-format sample (data/omol25_sample) and the generator that made it.

Tests on the committed files need only ase + ase-db-backends; tests that re-run the generator need
the optional extra (rdkit, tblite) and skip with a reason without it.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ase_db = pytest.importorskip("ase.db")

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "omol25_sample"
ALLOWED_Z = {1, 6, 7, 8, 9, 15, 16, 17, 35}
HAVE_GENERATE_DEPS = all(importlib.util.find_spec(m) is not None for m in ("rdkit", "tblite"))
needs_generate = pytest.mark.skipif(
    not HAVE_GENERATE_DEPS, reason="rdkit/tblite not installed (pip install 'symscale[generate]')"
)


def _summary() -> dict:
    return json.loads((SAMPLE / "generation.json").read_text())


def _read_split(split: str) -> list:
    """Every row of a split as fairchem's AseDBDataset reads it: toatoms() + info.update(data)."""
    out = []
    for path in sorted((SAMPLE / split).glob("*.aselmdb")):
        db = ase_db.connect(str(path), readonly=True)
        try:
            for row in db.select():
                atoms = row.toatoms()
                atoms.info.update(row.data)
                out.append((path.name, atoms))
        finally:
            db.close()
    return out


@pytest.fixture(scope="module")
def committed():
    if not (SAMPLE / "generation.json").exists():
        pytest.fail(f"embedded sample missing: {SAMPLE}/generation.json")
    return {split: _read_split(split) for split in ("train", "val")}


@pytest.mark.slow  # reads all 17,000 structures of the sample
def test_counts_match_summary_and_issue(committed):
    summary = _summary()
    n_mol = n_struct = 0
    for split, rows in committed.items():
        s = summary["splits"][split]
        assert len(rows) == s["structures"]
        assert sum(len(a) for _, a in rows) == s["atoms"]
        assert len({a.info["nci_index"] for _, a in rows}) == s["molecules"]
        for f in s["files"]:
            assert sum(1 for name, _ in rows if name == f["name"]) == f["rows"]
        n_mol += s["molecules"]
        n_struct += len(rows)
    assert n_mol >= 1500 and n_struct >= 15000
    assert len(summary["splits"]["train"]["files"]) > 1, "OMol25 ships several files per split"


def test_files_under_20_mb():
    files = sorted(SAMPLE.glob("*/*.aselmdb"))
    assert files
    for path in files:
        assert path.stat().st_size < 20e6, f"{path} is {path.stat().st_size / 1e6:.1f} MB"


@pytest.mark.slow  # reads all 17,000 structures of the sample
def test_split_by_molecule(committed):
    ids = {s: {a.info["nci_index"] for _, a in rows} for s, rows in committed.items()}
    smiles = {s: {a.info["smiles"] for _, a in rows} for s, rows in committed.items()}
    assert ids["train"] and ids["val"]
    assert not ids["train"] & ids["val"]
    assert not smiles["train"] & smiles["val"]


@pytest.mark.slow  # reads all 17,000 structures of the sample
def test_omol25_layout_and_labels(committed):
    for split, rows in committed.items():
        for name, atoms in rows:
            where = f"{split}/{name} {atoms.info.get('data_id')}"
            info = atoms.info
            assert isinstance(info["charge"], int) and isinstance(info["spin"], int), where
            assert info["spin"] in (1, 2), where
            n_electrons = int(atoms.numbers.sum()) - info["charge"]
            assert info["spin"] == 1 + n_electrons % 2, where
            assert info["source"] and isinstance(info["nci_index"], int), where
            assert set(atoms.numbers.tolist()) <= ALLOWED_Z, where
            assert 3 <= len(atoms) <= 40, where
            assert not atoms.pbc.any(), where
            energy, forces = atoms.get_potential_energy(), atoms.get_forces()
            assert np.isfinite(energy) and energy < 0, where
            assert forces.shape == (len(atoms), 3) and np.isfinite(forces).all(), where
            d = np.linalg.norm(atoms.positions[:, None] - atoms.positions[None], axis=-1)
            assert d[np.triu_indices(len(atoms), 1)].min() > 0.5, where


@pytest.mark.slow  # reads all 17,000 structures of the sample
def test_structures_are_off_equilibrium(committed):
    forces = np.concatenate([a.get_forces().ravel() for _, a in committed["train"]])
    rms = float(np.sqrt(np.mean(forces**2)))
    assert 0.2 < rms < 3.0, f"force RMS {rms:.2f} eV/Å"
    assert rms == pytest.approx(_summary()["splits"]["train"]["force_rms_ev_per_a"], rel=1e-6)


@pytest.mark.slow
@needs_generate
def test_rerun_reproduces_committed_labels(committed):
    from datapipe.generate.molecules import Candidate, GenerateConfig, generate_molecule

    cfg = GenerateConfig(**_summary()["config"])
    rows = committed["train"] + committed["val"]
    # one train molecule, one validation molecule, and the last molecule written
    picks = [rows[0][1].info["nci_index"], committed["val"][0][1].info["nci_index"]]
    picks.append(rows[-1][1].info["nci_index"])
    for nci_index in picks:
        mine = [a for _, a in rows if a.info["nci_index"] == nci_index]
        info = mine[0].info
        res = generate_molecule(Candidate(nci_index, info["nci_id"], info["smiles"], 1), cfg)
        assert len(res.structures) == len(mine)
        for s, a in zip(res.structures, mine):
            assert s.charge == a.info["charge"] and s.spin == a.info["spin"]
            np.testing.assert_array_equal(s.numbers, a.numbers)
            np.testing.assert_allclose(s.positions, a.positions, atol=1e-10)
            assert abs(s.energy - a.get_potential_energy()) < 1e-8
            np.testing.assert_allclose(s.forces, a.get_forces(), atol=1e-8)


@needs_generate
def test_selection_is_the_seeded_order():
    from datapipe.generate.molecules import load_candidates, select_order

    s = _summary()
    candidates, rejected = load_candidates(s["config"]["max_atoms"])
    assert len(candidates) == s["nci_eligible"] and dict(rejected) == s["nci_rejected"]
    tried = [c.nci_index for c in select_order(candidates, s["config"]["seed"])[: s["molecules_tried"]]]
    committed = set(s["splits"]["train"]["nci_indices"]) | set(s["splits"]["val"]["nci_indices"])
    assert committed <= set(tried)
    assert len(tried) - len(committed) == sum(s["molecules_failed"].values())


@pytest.mark.slow  # labels molecules with GFN2-xTB twice
@needs_generate
def test_worker_count_does_not_change_result():
    from datapipe.generate.molecules import GenerateConfig, generate, load_candidates, select_order

    cfg = GenerateConfig(seed=3, structures_per_molecule=3, n_conformers=2)
    cands = select_order(load_candidates()[0], 3)[:3]
    one, _ = generate(cands, 3, cfg, workers=1, log=lambda m: None)
    two, _ = generate(cands, 3, cfg, workers=2, log=lambda m: None)
    for a, b in zip(one, two):
        assert a.candidate.nci_index == b.candidate.nci_index
        assert [s.energy for s in a.structures] == [s.energy for s in b.structures]


@needs_generate
def test_cli_writes_readable_aselmdb(tmp_path):
    from datapipe.generate.writer import main

    summary = main(["--out", str(tmp_path), "--molecules", "2", "--seed", "1", "--workers", "1",
                    "--structures-per-molecule", "2", "--val-fraction", "0.5"])
    n = sum(s["structures"] for s in summary["splits"].values())
    read = [a for split in ("train", "val") for path in sorted((tmp_path / split).glob("*.aselmdb"))
            for a in _read_path(path)]
    assert len(read) == n == 4
    assert all({"charge", "spin", "source"} <= set(a.info) for a in read)
    with pytest.raises(SystemExit, match="--overwrite"):
        main(["--out", str(tmp_path), "--molecules", "1"])


def _read_path(path: Path) -> list:
    db = ase_db.connect(str(path), readonly=True)
    try:
        return [_with_data(row) for row in db.select()]
    finally:
        db.close()


def _with_data(row):
    atoms = row.toatoms()
    atoms.info.update(row.data)
    return atoms


def test_missing_optional_deps_give_clear_error(monkeypatch):
    from datapipe.generate import molecules as generate

    monkeypatch.setitem(sys.modules, "tblite.interface", None)
    with pytest.raises(ImportError, match=r"symscale\[generate\]"):
        generate._require("tblite.interface")
