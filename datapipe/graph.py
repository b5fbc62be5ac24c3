"""Radius graphs and graph batching.

Neighbour lists come from vesin (a maintained cell-list library); batching from
torch-geometric's :class:`~torch_geometric.data.Batch`, which offsets ``edge_index`` and builds
the ``batch`` vector. Every field is named in :mod:`datapipe.keys`.

The neighbour list is never capped: every pair closer than the cutoff is an edge.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import vesin
from torch_geometric.data import Batch, Data

from datapipe import charge_spin, keys


def radius_graph(positions: np.ndarray, cutoff: float) -> np.ndarray:
    """Full, uncapped, non-periodic neighbour list of one structure.

    Parameters
    ----------
    positions : ``[n, 3]`` array, Å.
    cutoff : float, Å. Pairs with distance strictly below ``cutoff`` are edges.

    Returns
    -------
    edge_index : ``[2, E]`` int64 array, rows (source j, target i); both directions of every
        pair, no self edges, sorted by target then source.

    Raises
    ------
    ValueError
        if positions are not ``[n, 3]`` or not finite, or cutoff is not positive.
    """
    positions = np.asarray(positions, dtype=np.float64)
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise ValueError(f"positions must have shape [n, 3], got {list(positions.shape)}")
    if not np.isfinite(positions).all():
        raise ValueError("positions contain NaN or inf")
    if not cutoff > 0:
        raise ValueError(f"cutoff must be positive, got {cutoff}")
    if len(positions) < 2:
        return np.zeros((2, 0), dtype=np.int64)
    calculator = vesin.NeighborList(cutoff=float(cutoff), full_list=True)
    i, j, d = calculator.compute(points=positions, box=np.zeros((3, 3)), periodic=False, quantities="ijd")
    keep = (i != j) & (d < cutoff)
    target, source = i[keep].astype(np.int64), j[keep].astype(np.int64)
    order = np.lexsort((source, target))
    return np.stack([source[order], target[order]])


def structure_to_data(
    atomic_numbers: np.ndarray,
    positions: np.ndarray,
    *,
    cutoff: float = keys.DEFAULT_CUTOFF,
    energy: float = float("nan"),
    forces: np.ndarray | None = None,
    charge: int = 0,
    spin: int = 1,
    structure_id: str = "",
    source: str = "",
    dtype: torch.dtype = torch.float32,
) -> Data:
    """One structure as a torch-geometric ``Data`` with its radius graph.

    Parameters
    ----------
    atomic_numbers : ``[n]`` ints. positions : ``[n, 3]`` Å. energy : eV (NaN if unknown).
    forces : ``[n, 3]`` eV/Å or None (then zeros). charge : e. spin : multiplicity 2S+1.
    cutoff : Å, for the radius graph.

    Returns
    -------
    Data with the fields of :mod:`datapipe.keys` (per-structure fields as length-1 tensors).
    """
    atomic_numbers = np.asarray(atomic_numbers, dtype=np.int64)
    positions = np.asarray(positions, dtype=np.float64)
    n = len(atomic_numbers)
    if positions.shape != (n, 3):
        raise ValueError(f"structure {structure_id!r}: positions shape {list(positions.shape)} != [{n}, 3]")
    if forces is None:
        forces = np.zeros((n, 3))
    forces = np.asarray(forces, dtype=np.float64)
    if forces.shape != (n, 3):
        raise ValueError(f"structure {structure_id!r}: forces shape {list(forces.shape)} != [{n}, 3]")
    edge_index = radius_graph(positions, cutoff)
    return Data(
        **{
            keys.ATOMIC_NUMBERS: torch.from_numpy(atomic_numbers),
            keys.POSITIONS: torch.from_numpy(positions).to(dtype),
            keys.FORCES: torch.from_numpy(forces).to(dtype),
            keys.ENERGY: torch.tensor([energy], dtype=torch.float64),
            keys.CHARGE: torch.tensor([int(charge)], dtype=torch.int64),
            keys.SPIN: torch.tensor([int(spin)], dtype=torch.int64),
            keys.NATOMS: torch.tensor([n], dtype=torch.int64),
            keys.EDGE_INDEX: torch.from_numpy(edge_index),
            keys.STRUCTURE_ID: structure_id,
            keys.SOURCE: source,
        },
        num_nodes=n,
    )


def collate(structures: Sequence[Data]) -> Batch:
    """Batch structures: concatenates atoms, offsets ``edge_index``, adds ``batch`` ``[N]``."""
    if len(structures) == 0:
        raise ValueError("cannot collate an empty list of structures")
    return Batch.from_data_list(list(structures))


def batch_from_atoms(
    atoms_list: Sequence, cutoff: float = keys.DEFAULT_CUTOFF, dtype: torch.dtype = torch.float32
) -> Batch:
    """Batch a list of ``ase.Atoms`` (labels read from ``get_potential_energy``/``get_forces``
    when a calculator holds them; charge and spin from ``atoms.info``, defaults 0 and 1).

    Raises
    ------
    ValueError
        naming the structure (``atoms.info["structure_id"]`` or ``atoms:<index>``) if its charge or
        multiplicity is not an integer or contradicts its electron count
        (:func:`datapipe.charge_spin.checked`; never rounded).
    """
    data = []
    for index, atoms in enumerate(atoms_list):
        name = str(atoms.info.get("structure_id", f"atoms:{index}"))
        try:
            charge, spin = charge_spin.checked(atoms.get_atomic_numbers(), atoms.info.get("charge", 0),
                                               atoms.info.get("spin", 1), name)
        except ValueError as error:
            unset = [key for key in ("charge", "spin") if key not in atoms.info]
            if not unset:
                raise
            raise ValueError(f"{error} (atoms.info has no {' or '.join(repr(k) for k in unset)}: the defaults are "
                             "charge 0 and spin 1, a singlet; set atoms.info['charge'] and atoms.info['spin'])") from None
        energy, forces = float("nan"), None
        if atoms.calc is not None:
            try:
                energy = float(atoms.get_potential_energy())
                forces = atoms.get_forces()
            except Exception:  # noqa: BLE001 - a calculator without stored results
                pass
        data.append(
            structure_to_data(
                atoms.get_atomic_numbers(),
                atoms.get_positions(),
                cutoff=cutoff,
                energy=energy,
                forces=forces,
                charge=charge,
                spin=spin,
                structure_id=name,
                source=str(atoms.info.get("source", "")),
                dtype=dtype,
            )
        )
    return collate(data)
