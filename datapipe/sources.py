"""Reading raw structures (OMol25 ``.aselmdb``, ASE databases, anything ``ase.io`` reads) and
checking them before they enter a shard.

``.aselmdb`` (and ASE ``.db``) rows are read the way fairchem's ``AseDBDataset`` reads OMol25:
``row.toatoms()`` gives positions, numbers and a ``SinglePointCalculator`` with energy (eV) and
forces (eV/Å), and ``row.data`` (where OMol25 keeps ``charge`` and ``spin``) is merged into
``atoms.info``. Other formats are streamed with ``ase.io.iread``; their ``charge``/``spin`` come
from ``atoms.info`` (extended XYZ frame keys). Where a structure carries neither, charge 0 and
spin 1 are used, as :func:`datapipe.graph.batch_from_atoms` does, and the conversion counts it.

Every structure is read one at a time (constant memory). Its stable id is
``"{file stem}:{row}"`` with ``row`` its 0-based position in the file.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import ase.db
import ase.io
import numpy as np
from scipy.spatial import cKDTree

from datapipe import charge_spin, keys
from datapipe.shards import Record

#: Extensions picked up when a directory is given as input.
KNOWN_SUFFIXES = (".aselmdb", ".extxyz", ".xyz", ".traj", ".db")
#: Two atoms closer than this (Å) make a structure invalid (coincident atoms).
COINCIDENT_DISTANCE = 0.1
#: Reject reasons, in the order they are checked (a structure gets the first that applies).
REASONS = (
    "empty structure",
    "unknown element",
    "non-finite positions",
    "coincident atoms",
    "missing energy",
    "non-finite energy",
    "missing forces",
    "forces shape",
    "non-finite forces",
    "invalid charge or spin",
)


def expand_inputs(inputs) -> list[Path]:
    """Files named by ``inputs``: files, directories (searched recursively for
    :data:`KNOWN_SUFFIXES`, whatever their case: ``.aselmdb`` and ``.ASELMDB`` alike) or glob
    patterns (``"omol/train/*.aselmdb"``), sorted by stem.

    Raises ValueError on a missing path, a pattern that matches nothing, an empty result, or two
    files with the same stem (their ids would collide)."""
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in KNOWN_SUFFIXES))
        elif path.is_file():
            files.append(path)
        elif glob.has_magic(os.fspath(item)):
            matches = sorted(Path(m) for m in glob.glob(os.fspath(item), recursive=True))
            if not matches:
                raise ValueError(f"input pattern {os.fspath(item)!r} matches no file")
            files.extend(m for m in matches if m.is_file())
        else:
            raise ValueError(f"input {os.fspath(path)!r} does not exist")
    if not files:
        raise ValueError(f"no input files found in {[os.fspath(i) for i in items]}")
    stems: dict[str, Path] = {}
    for path in files:
        if path.stem in stems and stems[path.stem].resolve() != path.resolve():
            raise ValueError(f"inputs {stems[path.stem]} and {path} share the stem {path.stem!r}; "
                             "structure ids ('stem:row') would collide — convert them separately or rename")
        stems[path.stem] = path
    return sorted(stems.values(), key=lambda p: p.stem)


def open_database(path: Path):
    """An ASE database over ``path`` opened read-only through its backend, chosen explicitly.

    ``.aselmdb`` (any case) is opened as type ``"aselmdb"`` (the LMDB backend of the
    ``ase-db-backends`` package, which OMol25 uses) rather than left to ASE's guess from the file
    name, which fails on ``.ASELMDB`` or a renamed file; ``.db`` as ASE's SQLite.

    Raises
    ------
    ImportError
        naming the package to install when the LMDB backend is missing.
    """
    if path.suffix.lower() == ".aselmdb":
        missing = [name for name in ("ase_db_backends", "lmdb") if importlib.util.find_spec(name) is None]
        if missing:
            raise ImportError(f"{path}: reading .aselmdb needs the LMDB backend of ASE databases; install it with "
                              "`pip install ase-db-backends` (it brings `lmdb`)")
        return ase.db.connect(os.fspath(path), type="aselmdb", readonly=True)
    return ase.db.connect(os.fspath(path), type="db")


def iter_atoms(path: Path) -> Iterator:
    """Stream ``ase.Atoms`` from one file, ``row.data`` merged into ``atoms.info`` for databases."""
    if path.suffix.lower() in (".aselmdb", ".db"):
        db = open_database(path)
        try:
            for row in db.select():
                atoms = row.toatoms()
                data = row.get("data")
                if isinstance(data, dict):
                    atoms.info.update(data)
                yield atoms
        finally:
            close = getattr(db, "close", None)
            if close is not None:
                close()
    else:
        yield from ase.io.iread(os.fspath(path), index=":")


def _labels(atoms):
    results = getattr(atoms.calc, "results", None) or {}
    energy = results.get("energy")
    forces = results.get("forces")
    return energy, forces


def check(atoms, structure_id: str, source: str) -> tuple[Record | None, str | None, str, bool]:
    """Validate one structure.

    Returns
    -------
    (record, reason, detail, defaulted): ``record`` is None and ``reason`` one of
    :data:`REASONS` when the structure is rejected; ``defaulted`` is True when charge/spin were
    absent and set to 0/1.
    """
    numbers = np.asarray(atoms.get_atomic_numbers(), dtype=np.int64)
    positions = np.asarray(atoms.get_positions(), dtype=np.float64)
    n = len(numbers)
    if n == 0:
        return None, REASONS[0], "no atoms", False
    bad = numbers[(numbers <= 0) | (numbers > keys.MAX_ATOMIC_NUMBER)]
    if len(bad):
        return None, REASONS[1], f"atomic numbers {sorted(set(bad.tolist()))} outside 1..{keys.MAX_ATOMIC_NUMBER}", False
    if not np.isfinite(positions).all():
        return None, REASONS[2], "NaN or inf in positions", False
    if n > 1:
        distance, _ = cKDTree(positions).query(positions, k=2)
        closest = float(distance[:, 1].min())
        if closest < COINCIDENT_DISTANCE:
            return None, REASONS[3], f"two atoms {closest:.3g} Å apart (< {COINCIDENT_DISTANCE} Å)", False
    energy, forces = _labels(atoms)
    if energy is None:
        return None, REASONS[4], "no energy label", False
    energy = float(np.asarray(energy).reshape(-1)[0]) if np.size(energy) == 1 else float("nan")
    if not np.isfinite(energy):
        return None, REASONS[5], f"energy {energy}", False
    if forces is None:
        return None, REASONS[6], "no forces label", False
    forces = np.asarray(forces, dtype=np.float64)
    if forces.shape != (n, 3):
        return None, REASONS[7], f"forces shape {list(forces.shape)} != [{n}, 3]", False
    if not np.isfinite(forces).all():
        return None, REASONS[8], "NaN or inf in forces", False
    info = atoms.info
    defaulted = "charge" not in info or "spin" not in info
    try:
        charge_value, spin_value = charge_spin.checked(numbers, info.get("charge", 0), info.get("spin", 1),
                                                       structure_id)
    except ValueError as error:
        return None, REASONS[9], str(error).removeprefix(f"structure {structure_id!r}: "), False
    record = Record(structure_id, source, numbers, positions, energy, forces, charge_value, spin_value)
    return record, None, "", defaulted
