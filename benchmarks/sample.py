"""The benchmarks' molecules: the first structures of a split of the embedded sample."""

from __future__ import annotations

from pathlib import Path


def molecules(split: Path, atoms: int) -> list:
    """The first structures of ``split`` in file and row order, as many as fit in ``atoms`` atoms
    (a list of ``ase.Atoms``). Imports lazily: a benchmark's baseline worker imports its own tree."""
    from datapipe.sources import expand_inputs, iter_atoms

    chosen, total = [], 0
    for path in expand_inputs(split):
        for mol in iter_atoms(path):
            if total + len(mol) > atoms:
                return chosen
            chosen.append(mol)
            total += len(mol)
    return chosen
