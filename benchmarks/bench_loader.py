"""Throughput of the streaming loader (structures/s, atoms/s) with 0, 1 and 2 workers.

Baselines measured in the same run: the raw shard read (tar + decode, no graph, no batching) and
the loader with 1 worker. Every configuration streams one full epoch of the same shards.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_loader.py                     # embedded sample
    OMP_NUM_THREADS=1 python benchmarks/bench_loader.py --input DIR_OR_FILES --shards OUT

``--input`` is converted first (skipped when already up to date); default
``data/omol25_sample/train`` into ``data/shards/train`` (git-ignored).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datapipe import keys
from datapipe.convert import convert
from datapipe.graph import collate, structure_to_data
from datapipe.loader import StreamingLoader
from datapipe.packing import batch_from_records
from datapipe.shards import iter_shard


def raw_read(index) -> tuple[float, int, int]:
    start, structures, atoms = time.perf_counter(), 0, 0
    for i, shard in enumerate(index.shards):
        for _, record in iter_shard(index.shard_path(i), shard["natoms"]):
            structures += 1
            atoms += record.natoms
    return time.perf_counter() - start, structures, atoms


def batch_building(index, n_structures: int, cutoff: float) -> tuple[float, float, int]:
    """Seconds to build batches of 32 from the same decoded records: datapipe.graph's
    per-structure Data + collate, then datapipe.packing.batch_from_records."""
    records = []
    for i, shard in enumerate(index.shards):
        records += [r for _, r in iter_shard(index.shard_path(i), shard["natoms"])]
        if len(records) >= n_structures:
            break
    records = records[:n_structures]
    groups = [records[k:k + 32] for k in range(0, len(records), 32)]
    start = time.perf_counter()
    for group in groups:
        collate([structure_to_data(r.numbers, r.positions, cutoff=cutoff, energy=r.energy, forces=r.forces,
                                   charge=r.charge, spin=r.spin, structure_id=r.structure_id, source=r.source)
                 for r in group])
    slow = time.perf_counter() - start
    start = time.perf_counter()
    for group in groups:
        batch_from_records(group, cutoff)
    return slow, time.perf_counter() - start, len(records)


def loader_epoch(shards, workers: int, args) -> tuple[float, int, int, int]:
    loader = StreamingLoader(shards, num_workers=workers, atoms_per_batch=args.atoms_per_batch, cutoff=args.cutoff,
                             shuffle_buffer=args.shuffle_buffer, seed=0)
    cpu0 = _cpu()
    start, structures, atoms, edges = time.perf_counter(), 0, 0, 0
    for batch in loader:
        structures += len(batch[keys.NATOMS])
        atoms += int(batch[keys.NATOMS].sum())
        edges += batch[keys.EDGE_INDEX].shape[1]
    seconds = time.perf_counter() - start
    assert (structures, atoms) == (loader.total_structures, loader.total_atoms)
    return seconds, structures, atoms, edges, _cpu() - cpu0


def _cpu() -> float:
    """CPU seconds of this process plus its finished children (DataLoader workers are joined at
    the end of an epoch): robust to other load on the machine, unlike wall time."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", default=[str(ROOT / "data/omol25_sample/train")])
    parser.add_argument("--shards", default=str(ROOT / "data/shards/train"))
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--atoms-per-batch", type=int, default=1024)
    parser.add_argument("--cutoff", type=float, default=keys.DEFAULT_CUTOFF)
    parser.add_argument("--shuffle-buffer", type=int, default=1000)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()

    start = time.perf_counter()
    index = convert(args.input, args.shards, shard_size=args.shard_size, workers=2)
    print(f"data: {index!r} (convert/check {time.perf_counter() - start:.1f} s)")
    print(f"atoms_per_batch={args.atoms_per_batch} cutoff={args.cutoff} Å shuffle_buffer={args.shuffle_buffer}")

    slow, fast, n = batch_building(index, 2000, args.cutoff)
    print(f"batch building, {n} structures in batches of 32: graph.structure_to_data + collate "
          f"{n / slow:.0f} structures/s, packing.batch_from_records {n / fast:.0f} structures/s "
          f"(ratio {slow / fast:.2f}x)")
    seconds, structures, atoms = raw_read(index)
    base = structures / seconds
    head = f"{'configuration':<31}{'structures/s':>13}{'atoms/s':>10}{'edges/s':>10}{'vs raw':>8}{'vs 1 wkr':>9}"
    print(head + f"{'CPU ms/1k atoms':>16}")
    print(f"{'raw tar read + decode':<31}{base:>13.0f}{atoms / seconds:>10.0f}{'-':>10}{1.0:>8.2f}{'':>9}{'':>16}")
    rows = {workers: loader_epoch(args.shards, workers, args) for workers in args.workers}
    one = rows[1][1] / rows[1][0] if 1 in rows else None
    for workers, (seconds, structures, atoms, edges, cpu) in rows.items():
        rate = structures / seconds
        versus_one = f"{rate / one:9.2f}" if one else f"{'-':>9}"
        label = f"loader, {workers} worker{'s' if workers != 1 else ''}" + (" (in-process)" if workers == 0 else "")
        print(f"{label:<31}{rate:>13.0f}{atoms / seconds:>10.0f}{edges / seconds:>10.0f}{rate / base:>8.2f}{versus_one}"
              f"{1e6 * cpu / atoms:>16.1f}")
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
