"""Convert raw structures (OMol25 ``.aselmdb``, ASE db, extxyz, traj, …) into WebDataset shards
with an ``index.json`` (see :mod:`datapipe.index` for its fields, :mod:`datapipe.shards` for the
sample layout).

Usage::

    python -m datapipe.convert data/omol25_sample/train --out data/shards/train --shard-size 1000 --workers 2

    from datapipe.convert import convert
    index = convert(["data/omol25_sample/train"], "data/shards/train", shard_size=1000, workers=2)

Properties
----------
- Streaming: each input file is read one structure at a time and written straight into shards;
  memory is constant in the data size but for the per-structure atom counts (4 B each), which
  go to the ``natoms.npy`` sidecar beside ``index.json``.
- Parallel over input files (a process pool). Shards never span input files: file ``stem`` gives
  ``stem-000000.tar``, ``stem-000001.tar``, … each of ``shard_size`` accepted structures (the
  last one fewer). Statistics are merged in sorted-stem order, so the output — shards, index and
  hash — is byte-identical whatever ``workers`` is and whatever order the inputs are given in.
- Idempotent: shard bytes are reproducible (tar mtime 0), so a re-run gives the same shards and
  hash; when ``index.json`` already records the same inputs (name, size, mtime) and settings and
  every shard is present with its recorded size, nothing is redone.
- Never clobbers other data: ``out_dir`` must be empty, new, or hold a conversion of the same
  input files (by name); a directory of other files or of shards converted from other inputs is
  refused unless ``force`` (``--force``).
- Bad structures (NaN/inf values, coincident atoms < 0.1 Å, unknown elements, forces of the
  wrong shape, missing labels, invalid charge/spin) are not written; each is listed in the index
  by id with its reason, and counted per reason (see :data:`datapipe.sources.REASONS`).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from datapipe import keys
from datapipe.index import FORMAT, INDEX_NAME, NATOMS_NAME, ShardIndex, Stats, data_hash, write_sidecar
from datapipe.shards import encode, file_sha256, shard_writer
from datapipe.sources import (
    COINCIDENT_DISTANCE,
    REASONS,
    check,
    expand_inputs,
    iter_atoms,
)


def _fingerprint(path: Path) -> dict:
    stat = path.stat()
    return {"name": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _convert_file(job: tuple[str, str, int]) -> dict:
    """Convert one input file into ``out/stem-%06d.tar`` shards; returns its shards and stats."""
    path_str, out_str, shard_size = job
    path, out = Path(path_str), Path(out_str)
    stem = path.stem
    staging = out / f".partial-{stem}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    stats = Stats()
    rejected, shard_natoms, n_defaulted = [], [], 0
    writer = None
    try:
        for row, atoms in enumerate(iter_atoms(path)):
            structure_id = f"{stem}:{row}"
            record, reason, detail, defaulted = check(atoms, structure_id, path.name)
            if record is None:
                rejected.append({"id": structure_id, "source": path.name, "reason": reason, "detail": detail})
                continue
            if writer is None:
                writer = shard_writer(os.fspath(staging / f"{stem}-%06d.tar"), shard_size)
            if not shard_natoms or len(shard_natoms[-1]) >= shard_size:
                shard_natoms.append([])
            writer.write(encode(record, len(shard_natoms[-1])))
            shard_natoms[-1].append(record.natoms)
            stats.add(record.numbers, record.energy, record.forces)
            n_defaulted += defaulted
    except Exception as error:  # a reader failing mid-file: name the file and row
        raise RuntimeError(f"converting {path}: {type(error).__name__}: {error}") from error
    finally:
        if writer is not None:
            writer.close()
    shards = []
    for k, natoms in enumerate(shard_natoms):
        name = f"{stem}-{k:06d}.tar"
        final = out / name
        os.replace(staging / name, final)
        shards.append({"name": name, "source": path.name, "structures": len(natoms), "atoms": int(sum(natoms)),
                       "sha256": file_sha256(final), "bytes": final.stat().st_size})
    shutil.rmtree(staging, ignore_errors=True)
    natoms = np.asarray([n for shard in shard_natoms for n in shard], np.int32)  # [structures of this file]
    return {"shards": shards, "natoms": natoms, "stats": stats, "rejected": rejected, "n_defaulted": n_defaulted}


def _settings(shard_size: int) -> dict:
    return {"shard_size": int(shard_size), "coincident_distance": COINCIDENT_DISTANCE,
            "max_atomic_number": keys.MAX_ATOMIC_NUMBER, "format": FORMAT}


def cached(inputs, out_dir, shard_size: int = 1000) -> ShardIndex | None:
    """The index of ``out_dir`` if it already holds an up-to-date conversion of ``inputs``, else None.

    Raises ValueError as :func:`datapipe.sources.expand_inputs` does for missing inputs.
    """
    files = expand_inputs(inputs)
    return _up_to_date(Path(out_dir), _settings(shard_size), [_fingerprint(p) for p in files])


#: written into the output directory while a conversion runs (the input names), removed at its end:
#: an interrupted conversion of the same inputs may be redone over its own leftovers
MARKER = ".converting.json"


def _refuse_clobber(out: Path, inputs: list[dict]) -> None:
    """Raise FileExistsError if ``out`` holds files that are not a conversion of the same input files."""
    present = [p for p in out.iterdir() if not p.name.startswith(".partial-")] if out.is_dir() else []
    if not present:
        return
    try:
        previous = json.loads((out / INDEX_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        previous = None
    if previous is None:  # an interrupted conversion of ours leaves its marker
        try:
            previous = json.loads((out / MARKER).read_text())
        except (OSError, json.JSONDecodeError):
            previous = None
    if previous is None:
        raise FileExistsError(
            f"{out} holds {len(present)} file(s) that are not shards of this project (no readable "
            f"{INDEX_NAME}); refusing to write shards over them: choose an empty or new directory "
            "(or force=True / --force)") from None
    old = sorted(item.get("name", "?") for item in previous.get("inputs", []))
    new = sorted(item["name"] for item in inputs)
    if old != new:
        raise FileExistsError(
            f"{out} holds shards of other data (converted from {', '.join(old[:3])}"
            f"{' …' if len(old) > 3 else ''}; now {', '.join(new[:3])}{' …' if len(new) > 3 else ''}); "
            "refusing to overwrite them: choose another directory (or force=True / --force)")


def _up_to_date(out: Path, settings: dict, inputs: list[dict]) -> ShardIndex | None:
    try:
        index = ShardIndex.load(out)
    except (FileNotFoundError, ValueError, json.JSONDecodeError):
        return None
    if index.raw.get("settings") != settings or index.raw.get("inputs") != inputs:
        return None
    for shard in index.shards:
        path = out / shard["name"]
        if not path.is_file() or path.stat().st_size != shard["bytes"]:
            return None
    return index


def convert(inputs, out_dir, shard_size: int = 1000, workers: int = 1, force: bool = False,
            progress=None) -> ShardIndex:
    """Convert structure files into WebDataset shards plus ``index.json``.

    Parameters
    ----------
    inputs : a path or list of paths — files (``.aselmdb``, ``.db``, ``.extxyz``, ``.traj``, or
        anything ``ase.io.read`` reads) or directories (searched for those suffixes).
    out_dir : directory for the shards and ``index.json`` (created).
    shard_size : accepted structures per shard.
    workers : processes converting input files in parallel (output does not depend on it).
    force : convert even if ``out_dir`` already holds an up-to-date conversion, and even over a
        directory holding other files or shards of other inputs.
    progress : optional ``progress(path, structures)`` called as each input file is done
        (in completion order), e.g. to advance a progress bar by the file's size.

    Returns
    -------
    ShardIndex of ``out_dir``.

    Raises
    ------
    ValueError for missing inputs, stems that collide, or a non-positive shard size;
    FileExistsError when ``out_dir`` holds other files or shards of other inputs (unless ``force``);
    RuntimeError naming the file when an input cannot be read.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    files = expand_inputs(inputs)
    out = Path(out_dir)
    settings = _settings(shard_size)
    fingerprints = [_fingerprint(p) for p in files]
    if not force and (index := _up_to_date(out, settings, fingerprints)) is not None:
        return index
    if not force:
        _refuse_clobber(out, fingerprints)
    out.mkdir(parents=True, exist_ok=True)
    previous = []
    if (out / INDEX_NAME).is_file():
        try:
            previous = [s["name"] for s in json.loads((out / INDEX_NAME).read_text()).get("shards", [])]
        except (json.JSONDecodeError, AttributeError):
            previous = []
        (out / INDEX_NAME).unlink()  # never leave an index describing half-rewritten shards
    (out / MARKER).write_text(json.dumps({"inputs": fingerprints}))
    results = convert_files(files, out, shard_size, workers, progress)
    raw = assemble(out, settings, fingerprints, results)
    current = {s["name"] for s in raw["shards"]}
    for name in previous:
        if name not in current and (out / name).is_file():
            (out / name).unlink()
    (out / MARKER).unlink(missing_ok=True)
    return ShardIndex(out, raw, np.load(out / NATOMS_NAME, mmap_mode="r"))


def convert_files(files: list[Path], out: Path, shard_size: int, workers: int = 1, progress=None) -> list[dict]:
    """Convert each file into ``out`` (a process pool of ``workers``); per file, in the order
    given: ``{shards, natoms [structures] int32, stats, rejected, n_defaulted}``."""
    jobs = [(os.fspath(p), os.fspath(out), int(shard_size)) for p in files]

    def done(job, result):
        if progress is not None:
            progress(Path(job[0]), sum(s["structures"] for s in result["shards"]))
        return result

    if workers > 1 and len(jobs) > 1:
        with multiprocessing.get_context("fork").Pool(min(workers, len(jobs))) as pool:
            pending = [pool.apply_async(_convert_file, (job,)) for job in jobs]
            return [done(job, item.get()) for job, item in zip(jobs, pending)]
    return [done(job, _convert_file(job)) for job in jobs]


def assemble(out: Path, settings: dict, fingerprints: list[dict], results: list[dict]) -> dict:
    """Write ``out/natoms.npy`` and ``out/index.json`` from per-file ``results`` (in sorted-stem
    order: the sums, and so the bytes, depend on it) and return the index dict."""
    stats, shards, rejected, n_defaulted = Stats(), [], [], 0
    for result in results:  # sorted-stem order: deterministic sums
        stats.merge(result["stats"])
        shards.extend(result["shards"])
        rejected.extend(result["rejected"])
        n_defaulted += result["n_defaulted"]
    references, rmse = stats.element_references()
    counts = {reason: 0 for reason in REASONS}
    for item in rejected:
        counts[item["reason"]] += 1
    raw = {
        "format": FORMAT,
        "settings": settings,
        "inputs": fingerprints,
        "n_structures": int(sum(s["structures"] for s in shards)),
        "n_atoms": int(sum(s["atoms"] for s in shards)),
        "n_shards": len(shards),
        "element_counts": {str(z): int(n) for z, n in enumerate(stats.element_counts) if n},
        "element_references": references,
        "reference_rmse": rmse,
        "force_rms": stats.force_rms(),
        "n_rejected": len(rejected),
        "rejected_counts": {reason: n for reason, n in counts.items() if n},
        "rejected": rejected,
        "n_defaulted_charge_spin": n_defaulted,
        "data_hash": data_hash(shards),
        "natoms": write_sidecar(out / NATOMS_NAME, np.concatenate([r["natoms"] for r in results])),
        "shards": shards,
    }
    tmp = out / (INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps(raw, indent=1) + "\n")
    os.replace(tmp, out / INDEX_NAME)
    return raw


def main(argv=None) -> int:
    """Command line: ``python -m datapipe.convert INPUT... --out DIR [--shard-size N] [--workers W]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m datapipe.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="files or directories of structures")
    parser.add_argument("--out", required=True, help="output directory for shards and index.json")
    parser.add_argument("--shard-size", type=int, default=1000, help="structures per shard (default 1000)")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes over input files")
    parser.add_argument("--force", action="store_true",
                        help="convert even if up to date, and over a folder holding other files or other data")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    if args.shard_size < 1 or args.workers < 1:
        parser.error("--shard-size and --workers must be >= 1")
    done = []

    def progress(path: Path, structures: int) -> None:
        done.append(path)
        print(f"  {path.name}: {structures} structures ({len(done)} file(s) done)", flush=True)

    try:
        index = convert(args.inputs, args.out, shard_size=args.shard_size, workers=args.workers, force=args.force,
                        progress=progress)
    except (ValueError, FileExistsError, RuntimeError) as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{index.directory}: {len(index.shards)} shards, {index.n_structures} structures, {index.n_atoms} atoms, "
          f"force RMS {index.force_rms:.4f} eV/Å, reference RMSE {index.reference_rmse:.4f} eV, "
          f"data hash {index.data_hash[:16]}")
    if index.rejected:
        print(f"rejected {len(index.rejected)}: " + ", ".join(f"{r}: {n}" for r, n in index.rejected_counts.items()))
        for item in index.rejected[:20]:
            print(f"  {item['id']}: {item['reason']} ({item['detail']})")
        if len(index.rejected) > 20:
            print(f"  … {len(index.rejected) - 20} more in {index.directory / INDEX_NAME}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
