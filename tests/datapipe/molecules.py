"""Small real inputs in OMol25's layout for the datapipe tests: random molecules with EMT labels,
charge and spin in ``row.data``. A module of its own (not ``conftest``), so that
``from molecules import write_aselmdb`` finds it whichever rooms pytest collects together."""

from __future__ import annotations

import os

import ase.db
import numpy as np
from ase import Atoms
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

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
