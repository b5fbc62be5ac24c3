"""The shard index (``index.json`` beside the shards) and the statistics it carries.

The index is what the loader plans from (atoms per structure, per shard) and what training
needs from the data: per-element linear energy references, the force RMS, and a hash that
identifies the data (stored in every checkpoint).

Layout of ``index.json`` (all energies eV, forces eV/Å)::

    format            "symscale-shards/3"
    settings          conversion settings (shard_size, coincident distance, max Z)
    inputs            [{name, size, mtime_ns}] of the converted files (for idempotence)
    shards            [{name, source, structures, atoms, sha256, bytes}]
    natoms            {file, dtype, length, sha256, bytes}: the sidecar of per-structure counts
    n_structures, n_atoms
    element_counts    {Z: atoms of that element}
    element_references [E_Z for Z = 0..MAX_ATOMIC_NUMBER], 0.0 for absent elements
    reference_rmse    RMS of E - sum_i E_{Z_i} over structures (eV per structure)
    force_rms         sqrt(mean of F_ia^2) over every force component
    rejected          [{id, source, reason, detail}]; rejected_counts {reason: n}
    n_defaulted_charge_spin
    data_hash         SHA-256 over the sorted (shard name, shard sha256) pairs

Scale: the per-structure atom counts live in one sidecar, ``natoms.npy`` (a ``.npy`` array
``[n_structures]``, the counts of shard 0's rows, then shard 1's, …; ``uint16`` when every count
fits, 2 bytes per structure, 200 MB for 10^8 structures), memory-mapped on load after its size
and SHA-256 are checked against the index. The JSON keeps one entry per shard. Indexes of the
previous format (``symscale-shards/2``, counts inline per shard) are still read (their counts
are held in memory); converting again writes the new format.

The index and the sidecar may also be read from a URL (see :mod:`datapipe.remote`); the sidecar
is then fetched once into a local cache, verified, and memory-mapped from there.
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
FORMAT = "symscale-shards/3"
#: formats :meth:`ShardIndex.load` reads (the older keeps its per-structure counts inline)
READABLE = (FORMAT, "symscale-shards/2")
NATOMS_NAME = "natoms.npy"


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
    """A converted shard directory (or URL), as described by its ``index.json``.

    Attributes
    ----------
    location : str, the directory, ``http(s)://`` base URL or ``pipe:`` template of the shards.
    directory : Path of the shards, or None when they are remote.
    shards : list of dicts ``{name, source, structures, atoms, sha256, bytes}``.
    shard_structures, shard_atoms : ``[shards]`` int64 structures and atoms per shard.
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
    >>> idx.natoms(1).shape, idx.raw["natoms"]["dtype"]   # shard 1's counts, from the sidecar
    ((270,), '<u2')
    >>> tmp.cleanup()
    """

    def __init__(self, location: str | os.PathLike, raw: dict, natoms: np.ndarray | None = None):
        from datapipe import remote

        self.location = os.fspath(location)
        self.directory = None if remote.is_remote(self.location) else Path(self.location)
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
        self.shard_structures = np.asarray([s["structures"] for s in self.shards], np.int64)  # [shards]
        self.shard_atoms = np.asarray([s["atoms"] for s in self.shards], np.int64)  # [shards]
        self._offsets = np.concatenate([[0], np.cumsum(self.shard_structures)]).astype(np.int64)  # [shards + 1]
        if natoms is None:  # the old inline format
            natoms = np.concatenate([np.asarray(s["natoms"], np.int32) for s in self.shards] or [np.zeros(0, np.int32)])
        self._natoms = natoms  # [n_structures], usually a read-only memory map

    @classmethod
    def load(cls, location: str | os.PathLike) -> ShardIndex:
        """Read ``location/index.json`` and its sidecar (``location`` a directory, an
        ``http(s)://`` URL or a ``pipe:`` template, see :mod:`datapipe.remote`).

        Raises
        ------
        FileNotFoundError naming the path if the index or its sidecar is absent; ValueError if
        it is not a symscale shard index, or the sidecar does not match it (size, SHA-256,
        dtype or length), naming the file; OSError if a remote index cannot be fetched.
        """
        from datapipe import remote

        location = os.fspath(location)
        where = remote.join(location, INDEX_NAME)
        if remote.is_remote(location):
            raw = json.loads(remote.read_bytes(where))
        else:
            if not Path(where).is_file():
                raise FileNotFoundError(f"no shard index at {where}; run `python -m datapipe.convert INPUT --out {location}`")
            raw = json.loads(Path(where).read_text())
        if raw.get("format") not in READABLE:
            raise ValueError(f"{where} is not a {FORMAT} index (format {raw.get('format')!r})")
        natoms = None if raw["format"] != FORMAT else _open_sidecar(location, raw, where)
        return cls(location, raw, natoms)

    def shard_path(self, i: int) -> Path | str:
        """Where shard ``i`` is read from: a Path, or a URL / ``pipe:`` command."""
        from datapipe import remote

        if self.directory is not None:
            return self.directory / self.shards[i]["name"]
        return remote.join(self.location, self.shards[i]["name"])

    def natoms(self, i: int) -> np.ndarray:
        """``[structures]`` int64 atom counts of shard ``i``."""
        return np.asarray(self._natoms[self._offsets[i]:self._offsets[i + 1]], dtype=np.int64)

    def __repr__(self) -> str:
        return (f"ShardIndex({self.location!r}, shards={len(self.shards)}, structures={self.n_structures}, "
                f"atoms={self.n_atoms}, rejected={len(self.rejected)}, hash={self.data_hash[:12]})")


def natoms_dtype(maximum: int) -> np.dtype:
    """The sidecar dtype for counts up to ``maximum``: ``<u2`` below 65536 atoms, else ``<i4``."""
    return np.dtype("<u2") if maximum < 1 << 16 else np.dtype("<i4")


def write_sidecar(path: str | os.PathLike, natoms: np.ndarray) -> dict:
    """Write ``[n]`` counts to ``path`` as ``.npy`` and return the index entry describing it
    (``{file, dtype, length, sha256, bytes}``); the bytes depend only on the counts."""
    from datapipe.shards import file_sha256

    natoms = np.asarray(natoms)
    array = natoms.astype(natoms_dtype(int(natoms.max()) if len(natoms) else 0))
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
    os.replace(tmp, path)
    return {"file": path.name, "dtype": array.dtype.str, "length": int(len(array)),
            "sha256": file_sha256(path), "bytes": path.stat().st_size}


def _open_sidecar(location: str, raw: dict, where: str) -> np.ndarray:
    """Memory-map the sidecar ``raw["natoms"]`` names, after checking it against the index."""
    from datapipe import remote
    from datapipe.shards import file_sha256

    entry = raw["natoms"]
    path = Path(remote.fetch_cached(remote.join(location, entry["file"]), entry["sha256"], entry["bytes"])
                if remote.is_remote(location) else Path(location) / entry["file"])
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the per-structure atom counts {where} names are missing")
    size = path.stat().st_size
    if size != entry["bytes"] or file_sha256(path) != entry["sha256"]:
        raise ValueError(f"{path}: {size} bytes whose SHA-256 does not match {where} ({entry['bytes']} bytes, "
                         f"sha256 {entry['sha256'][:12]}…); the sidecar is altered or from another conversion")
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    expected = int(sum(s["structures"] for s in raw["shards"]))
    if array.dtype.str != entry["dtype"] or array.shape != (entry["length"],) or entry["length"] != expected:
        raise ValueError(f"{path}: holds {array.dtype.str} {array.shape}, {where} records {entry['dtype']} "
                         f"({entry['length']},) and its shards {expected} structures")
    return array
