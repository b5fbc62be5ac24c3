"""The on-disk shard format: WebDataset tar files, one sample per structure.

A shard is a plain (uncompressed) tar written by :class:`webdataset.ShardWriter`, with integer
``mtime = 0`` so that the same structures always give the same bytes (and the same checksum).
Each structure is one WebDataset sample whose key is its zero-padded row number inside the shard
(``"00000042"``), with two members (few members keep tar parsing cheap)::

    00000042.json  {"id", "source", "energy" (eV), "charge" (e), "spin" (2S+1), "natoms" n,
                    "numbers" [n atomic numbers]}
    00000042.f64   raw little-endian float64 [2, n, 3]: positions (Å), then forces (eV/Å)

Positions and forces stay float64 on disk (as OMol25 stores them); the loader casts to the dtypes
of :mod:`datapipe.keys`. Energies are JSON floats (exact round trip of float64).

Reading goes through :func:`iter_shard`, which turns every failure (missing file, truncated tar,
fewer rows than the index says, a row that does not match the index) into a :class:`ShardError`
naming the shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import webdataset as wds

from datapipe import charge_spin

#: Suffixes of the members of one sample, in the order TarWriter writes them (sorted).
MEMBERS = ("f64", "json")


class ShardError(RuntimeError):
    """A shard could not be read as the index describes it (missing, truncated, altered)."""


@dataclass
class Record:
    """One structure as stored in a shard (numpy arrays, SI-free: Å, eV, eV/Å)."""

    structure_id: str
    source: str
    numbers: np.ndarray  # [n] int64
    positions: np.ndarray  # [n, 3] float64, Å
    energy: float  # eV
    forces: np.ndarray  # [n, 3] float64, eV/Å
    charge: int  # e
    spin: int  # multiplicity 2S+1

    @property
    def natoms(self) -> int:
        return len(self.numbers)


def encode(record: Record, row: int) -> dict:
    """The WebDataset sample (key → bytes) of ``record`` stored at ``row`` of its shard."""
    meta = {
        "id": record.structure_id,
        "source": record.source,
        "energy": float(record.energy),
        "charge": int(record.charge),
        "spin": int(record.spin),
        "natoms": int(record.natoms),
        "numbers": [int(z) for z in record.numbers],
    }
    arrays = np.stack([np.asarray(record.positions, "<f8"), np.asarray(record.forces, "<f8")])  # [2, n, 3]
    return {"__key__": f"{row:08d}", "json": json.dumps(meta, sort_keys=True).encode(), "f64": arrays.tobytes()}


def decode(sample: dict) -> Record:
    """Inverse of :func:`encode` (``sample`` maps member suffix → bytes).

    Raises ValueError if the array member does not hold ``2 * natoms * 3`` float64 values, or if
    charge/spin are not integers or contradict the electron count (:func:`datapipe.charge_spin.checked`)."""
    meta = json.loads(sample["json"])
    n = int(meta["natoms"])
    arrays = np.frombuffer(sample["f64"], dtype="<f8")
    if arrays.size != 6 * n or len(meta["numbers"]) != n:
        raise ValueError(f"{meta['id']}: {arrays.size} floats and {len(meta['numbers'])} numbers for {n} atoms")
    arrays = arrays.reshape(2, n, 3).astype(np.float64)  # a writable native copy
    charge, spin = charge_spin.checked(meta["numbers"], meta["charge"], meta["spin"], meta["id"])
    return Record(
        structure_id=meta["id"],
        source=meta["source"],
        numbers=np.asarray(meta["numbers"], dtype=np.int64),
        positions=arrays[0],
        energy=float(meta["energy"]),
        forces=arrays[1],
        charge=charge,
        spin=spin,
    )


def shard_writer(pattern: str, shard_size: int) -> wds.ShardWriter:
    """A reproducible :class:`webdataset.ShardWriter` (``pattern`` like ``"dir/name-%06d.tar"``)."""
    return wds.ShardWriter(pattern, maxcount=int(shard_size), maxsize=float("inf"), verbose=0, mtime=0, encoder=False)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def iter_shard(
    path: str | os.PathLike,
    natoms: Sequence[int],
    start: int = 0,
    stop: int | None = None,
    wanted: np.ndarray | None = None,
) -> Iterator[tuple[int, Record | None]]:
    """Stream rows ``start..stop-1`` of one shard, checking them against the index.

    Parameters
    ----------
    path : the shard's tar file, or its URL / ``pipe:`` command (:mod:`datapipe.remote`).
    natoms : ``[rows]`` atom counts of every row of the shard, from the index.
    start, stop : row range to yield (``stop`` defaults to all rows). Reading stops after ``stop``.
    wanted : optional ``[stop - start]`` bool mask; rows with ``False`` are yielded as
        ``(row, None)`` without decoding their arrays.

    Yields
    ------
    (row, record) in row order.

    Raises
    ------
    ShardError
        naming the shard, if it is missing, unreadable or truncated (fewer rows than the index
        records), or a row's key or atom count differs from the index.
    """
    from datapipe import remote

    location = os.fspath(path)
    far = remote.is_remote(location)
    name = location if far else os.path.basename(location)
    stop = len(natoms) if stop is None else stop
    if stop <= start:
        return
    try:
        handle = remote.open_stream(location) if far else open(location, "rb")  # noqa: SIM115 - closed below
    except OSError as error:
        raise ShardError(f"shard {name}: cannot open {location!r} ({error}); was it deleted?") from error
    row, ended = -1, False
    sample: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=handle, mode="r|") as stream:
            for info in stream:
                key, _, suffix = info.name.partition(".")
                member_row = int(key)
                if member_row != row:
                    if sample:
                        yield _finish(name, row, sample, natoms, start, wanted)
                        if row + 1 >= stop:
                            return
                    row, sample = member_row, {}
                    if row >= stop:
                        return
                if row < start or (wanted is not None and not wanted[row - start]):
                    sample[suffix] = b""  # mark present, not read
                    continue
                sample[suffix] = stream.extractfile(info).read()
                stream.members = []
            if sample:
                yield _finish(name, row, sample, natoms, start, wanted)
        while far and handle.read(1 << 16):
            pass  # the tar's padding: read to the end, so that the exit status is that of a full read
        ended = True
        handle.close()  # a failed download or command reports here (its exit status)
    except ShardError:
        raise
    except (tarfile.TarError, OSError, EOFError, ValueError, KeyError) as error:
        raise ShardError(f"shard {name}: unreadable near row {row} ({type(error).__name__}: {error}); "
                         "the file is corrupt or truncated, or its download failed") from error
    finally:
        if not ended:  # stopped early (enough rows, an error, or the consumer went away)
            remote.close_early(handle) if far else handle.close()
    if row + 1 < stop:
        raise ShardError(f"shard {name}: truncated, index records {len(natoms)} rows but the file ends "
                         f"after {row + 1}")


def _finish(name, row, sample, natoms, start, wanted):
    if row >= len(natoms):
        raise ShardError(f"shard {name}: row {row} beyond the {len(natoms)} rows the index records")
    if set(sample) != set(MEMBERS):
        raise ShardError(f"shard {name}: row {row} has members {sorted(sample)}, expected {list(MEMBERS)} "
                         "(truncated or altered)")
    if row < start or (wanted is not None and not wanted[row - start]):
        return row, None
    try:
        record = decode(sample)
    except ValueError as error:
        raise ShardError(f"shard {name}: row {row}: {error}") from error
    if record.natoms != natoms[row]:
        raise ShardError(f"shard {name}: row {row} ({record.structure_id}) has {record.natoms} atoms, "
                         f"index records {natoms[row]}; the shard does not match its index")
    return row, record


def iter_shard_retrying(location, natoms, start: int, stop: int, wanted: np.ndarray | None = None,
                        retries: int = 3, delay: float = 1.0) -> Iterator:
    """:func:`datapipe.shards.iter_shard` over rows ``start..stop-1`` of one shard; for a remote
    shard, a failed read is retried from the first row not yet yielded, at most ``retries`` times
    with ``delay * attempt`` seconds between, each retry logged as a warning. Local files are
    not retried (a damaged file stays damaged).

    Raises
    ------
    ShardError naming the shard and the number of attempts when every attempt failed.
    """
    from datapipe import remote as urls

    remote = urls.is_remote(os.fspath(location))
    attempt, first = 0, start
    while True:
        mask = None if wanted is None else wanted[first - start:]
        try:
            for row, record in iter_shard(location, natoms, first, stop, mask):
                first = row + 1
                yield row, record
            return
        except ShardError as error:
            attempt += 1
            if not remote or attempt > retries:
                if remote:
                    raise ShardError(f"{error} (gave up after {attempt} attempts)") from error
                raise
            urls.log.warning("%s; retrying from row %d (attempt %d of %d)", error, first, attempt + 1, retries + 1)
            time.sleep(delay * attempt)
