"""Shared fixtures: small real inputs in OMol25's layout (molecules with EMT labels, charge and
spin in ``row.data``), converted once per session."""

from __future__ import annotations

import os
from pathlib import Path

import ase.db
import numpy as np
import pytest
from ase import Atoms
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from datapipe.convert import convert

#: Elements EMT labels (ASE's effective-medium potential knows H, C, N, O among others).
ELEMENTS = (1, 6, 7, 8)


def random_molecule(rng: np.random.Generator, n_atoms: int) -> Atoms:
    """A random compact cluster of H/C/N/O atoms, no two closer than 0.9 Å, with EMT labels."""
    positions = [np.zeros(3)]
    while len(positions) < n_atoms:
        anchor = positions[rng.integers(len(positions))]
        direction = rng.normal(size=3)
        candidate = anchor + direction / np.linalg.norm(direction) * rng.uniform(1.0, 1.6)
        if min(np.linalg.norm(candidate - p) for p in positions) > 0.9:
            positions.append(candidate)
    atoms = Atoms(numbers=rng.choice(ELEMENTS, size=n_atoms), positions=np.array(positions))
    atoms.calc = EMT()
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
    return atoms


def write_aselmdb(path: str | os.PathLike, n_structures: int, seed: int, sizes=(3, 30)) -> list[Atoms]:
    """Write ``n_structures`` molecules to an ``.aselmdb`` with OMol25's layout (charge and spin
    in ``row.data``); returns them."""
    rng = np.random.default_rng(seed)
    written = []
    db = ase.db.connect(os.fspath(path), type="aselmdb")
    try:
        for _ in range(n_structures):
            atoms = random_molecule(rng, int(rng.integers(sizes[0], sizes[1] + 1)))
            charge, high = int(rng.integers(-1, 2)), int(rng.integers(0, 2))
            electrons = int(atoms.numbers.sum()) - charge
            spin = 1 + electrons % 2 + 2 * high  # a multiplicity that fits the electron count
            db.write(atoms, data={"charge": charge, "spin": spin, "source": "emt-test"})
            atoms.info.update(charge=charge, spin=spin)
            written.append(atoms)
    finally:
        db.close()
    return written


#: The repository's shared inputs, found beside the checkout (CI layout: <repo>/../shared).
SHARED = Path(__file__).resolve().parents[2].parent / "shared"


@pytest.fixture(scope="session")
def raw_dir(tmp_path_factory) -> Path:
    """Two `.aselmdb` files of 120 molecules (3-30 atoms), charge/spin in row.data."""
    directory = tmp_path_factory.mktemp("raw")
    write_aselmdb(directory / "partA.aselmdb", 120, seed=1)
    write_aselmdb(directory / "partB.aselmdb", 120, seed=2)
    return directory


@pytest.fixture(scope="session")
def shard_dir(raw_dir, tmp_path_factory) -> Path:
    """`raw_dir` converted into shards of 40 structures (6 shards)."""
    out = tmp_path_factory.mktemp("shards")
    convert([raw_dir], out, shard_size=40, workers=1)
    return out


@pytest.fixture(scope="session")
def cases_dir() -> Path:
    if not (SHARED / "cases").is_dir():
        pytest.skip(f"shared cases not found at {SHARED / 'cases'}")
    return SHARED / "cases"
