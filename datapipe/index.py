"""The shard index (``index.json`` beside the shards) and the statistics it carries.

The index is what the loader plans from (atoms per structure, per shard) and what training
needs from the data: per-element linear energy references, the force RMS, and a hash that
identifies the data (stored in every checkpoint).

Layout of ``index.json`` (all energies eV, forces eV/Å)::

    format            "symscale-shards/2"
    settings          conversion settings (shard_size, coincident distance, max Z)
    inputs            [{name, size, mtime_ns}] of the converted files (for idempotence)
    shards            [{name, source, structures, atoms, natoms: [n per structure], sha256, bytes}]
    n_structures, n_atoms
    element_counts    {Z: atoms of that element}
    element_references [E_Z for Z = 0..MAX_ATOMIC_NUMBER], 0.0 for absent elements
    reference_rmse    RMS of E - sum_i E_{Z_i} over structures (eV per structure)
    force_rms         sqrt(mean of F_ia^2) over every force component
    rejected          [{id, source, reason, detail}]; rejected_counts {reason: n}
    n_defaulted_charge_spin
    data_hash         SHA-256 over the sorted (shard name, shard sha256) pairs

Scale: the per-structure atom counts are inline JSON lists (≈4 bytes per structure). That is
fine to ~10^7 structures (tens of MB); for all of OMol25 (10^8) they would move to one
``natoms.npy`` (int16, 200 MB) or per-shard sidecars, with the same ShardIndex interface.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from datapipe import keys

INDEX_NAME = "index.json"
FORMAT = "symscale-shards/2"


@dataclass
class Stats:
    """Streaming statistics over accepted structures, constant memory in their number.

    The per-element references solve the least-squares problem
    ``min_w sum_s (E_s - sum_Z c_sZ w_Z)^2`` (``c_sZ`` = atoms of element Z in structure s)
    through its normal equations ``(C^T C) w = C^T E``, accumulated one structure at a time —
    the linear "atom reference" fit fairchem and others subtract before training.
    """

    size: int = keys.MAX_ATOMIC_NUMBER + 1
    ctc: np.ndarray = field(default=None)  # [Z, Z] float64
    cte: np.ndarray = field(default=None)  # [Z] float64
    ete: float = 0.0  # sum of E^2, eV^2
    element_counts: np.ndarray = field(default=None)  # [Z] int64
    force_sq: float = 0.0  # sum of F^2, (eV/Å)^2
    n_force: int = 0  # force components
    n_structures: int = 0

    def __post_init__(self):
        self.ctc = np.zeros((self.size, self.size)) if self.ctc is None else self.ctc
        self.cte = np.zeros(self.size) if self.cte is None else self.cte
        self.element_counts = np.zeros(self.size, np.int64) if self.element_counts is None else self.element_counts

    def add(self, numbers: np.ndarray, energy: float, forces: np.ndarray) -> None:
        """Accumulate one structure (numbers ``[n]``, energy eV, forces ``[n, 3]`` eV/Å)."""
        elements, counts = np.unique(numbers, return_counts=True)
        counts = counts.astype(np.float64)
        self.ctc[np.ix_(elements, elements)] += np.outer(counts, counts)
        self.cte[elements] += counts * energy
        self.ete += energy * energy
        self.element_counts[elements] += counts.astype(np.int64)
        self.force_sq += float(np.square(forces).sum())
        self.n_force += forces.size
        self.n_structures += 1

    def merge(self, other: Stats) -> None:
        """Add another accumulator (merge order fixed by the caller for determinism)."""
        self.ctc += other.ctc
        self.cte += other.cte
        self.ete += other.ete
        self.element_counts += other.element_counts
        self.force_sq += other.force_sq
        self.n_force += other.n_force
        self.n_structures += other.n_structures

    def element_references(self) -> tuple[list[float], float]:
        """Least-squares per-element energies ``[MAX_ATOMIC_NUMBER + 1]`` (eV; 0 where absent)
        and the RMS residual per structure (eV). Collinear compositions (e.g. only water)
        have no unique solution; the minimum-norm one is returned."""
        present = np.flatnonzero(self.element_counts)
        refs = np.zeros(self.size)
        if len(present):
            a = self.ctc[np.ix_(present, present)]
            w, *_ = np.linalg.lstsq(a, self.cte[present], rcond=None)
            refs[present] = w
        # residual sum of squares = E^T E - 2 w^T C^T E + w^T C^T C w
        rss = self.ete - 2 * refs @ self.cte + refs @ self.ctc @ refs
        rmse = float(np.sqrt(max(rss, 0.0) / self.n_structures)) if self.n_structures else 0.0
        return refs.tolist(), rmse

    def force_rms(self) -> float:
        """sqrt(mean F_ia^2) over every force component, eV/Å."""
        return float(np.sqrt(self.force_sq / self.n_force)) if self.n_force else 0.0


def data_hash(shards: list[dict]) -> str:
    """SHA-256 identifying the data: over the sorted ``name:sha256`` of every shard."""
    digest = hashlib.sha256()
    for shard in sorted(shards, key=lambda s: s["name"]):
        digest.update(f"{shard['name']}:{shard['sha256']}\n".encode())
    return digest.hexdigest()


class ShardIndex:
    """A converted shard directory, as described by its ``index.json``.

    Attributes
    ----------
    directory : Path of the shards.
    shards : list of dicts ``{name, source, structures, atoms, natoms, sha256, bytes}``.
    n_structures, n_atoms : int, accepted structures and their atoms.
    element_references : list[float] of length ``MAX_ATOMIC_NUMBER + 1``, eV per atom of element
        Z (index Z), from a least-squares fit of energy on composition.
    force_rms : float, eV/Å, RMS over all force components.
    data_hash : str, SHA-256 identifying the shards' contents.
    rejected : list of ``{id, source, reason, detail}``; rejected_counts : dict reason → n.

    Examples
    --------
    One file of the embedded sample (run from the repository root), converted and loaded:

    >>> import tempfile
    >>> from datapipe.convert import convert
    >>> tmp = tempfile.TemporaryDirectory()
    >>> _ = convert(["data/omol25_sample/val/data0001.aselmdb"], tmp.name, shard_size=500)
    >>> idx = ShardIndex.load(tmp.name)
    >>> idx.n_structures, idx.n_atoms, len(idx.shards), idx.rejected_counts
    (770, 19430, 2, {})
    >>> round(idx.force_rms, 3), idx.data_hash[:12]       # eV/Å; SHA-256 of the shards
    (1.103, '2a21362f40c5')
    >>> tmp.cleanup()
    """

    def __init__(self, directory: str | os.PathLike, raw: dict):
        self.directory = Path(directory)
        self.raw = raw
        self.shards: list[dict] = raw["shards"]
        self.n_structures: int = raw["n_structures"]
        self.n_atoms: int = raw["n_atoms"]
        self.element_references: list[float] = raw["element_references"]
        self.reference_rmse: float = raw["reference_rmse"]
        self.force_rms: float = raw["force_rms"]
        self.data_hash: str = raw["data_hash"]
        self.element_counts: dict[int, int] = {int(z): n for z, n in raw["element_counts"].items()}
        self.rejected: list[dict] = raw["rejected"]
        self.rejected_counts: dict[str, int] = raw["rejected_counts"]

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ShardIndex:
        """Read ``directory/index.json``. Raises FileNotFoundError naming the path if absent,
        ValueError if it is not a symscale shard index."""
        path = Path(directory) / INDEX_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no shard index at {path}; run `python -m datapipe.convert INPUT --out {directory}`")
        raw = json.loads(path.read_text())
        if raw.get("format") != FORMAT:
            raise ValueError(f"{path} is not a {FORMAT} index (format {raw.get('format')!r})")
        return cls(directory, raw)

    def shard_path(self, i: int) -> Path:
        return self.directory / self.shards[i]["name"]

    def natoms(self, i: int) -> np.ndarray:
        """``[structures]`` int64 atom counts of shard ``i``."""
        return np.asarray(self.shards[i]["natoms"], dtype=np.int64)

    def __repr__(self) -> str:
        return (f"ShardIndex({str(self.directory)!r}, shards={len(self.shards)}, structures={self.n_structures}, "
                f"atoms={self.n_atoms}, rejected={len(self.rejected)}, hash={self.data_hash[:12]})")
