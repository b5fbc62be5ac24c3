"""The shard index and the epoch plan at OMol25 scale: a synthetic index of up to 10^8 structures.

For each size the script writes a synthetic shard index (``index.json`` + ``natoms.npy``, no
shards: planning reads only the index) with per-structure atom counts drawn like OMol25's —
log-normal, median 22 atoms, clipped to 2..350 (mean ≈ 27: the paper's neutral subset has
9.2e8 atoms in 34M structures) — in shards of 1000 structures (the converter's default). Then,
each in a fresh process (peak resident memory is per process), rank 0 of ``world_size`` ranks
with 2 loader workers each:

- loads the index (JSON, sidecar size + SHA-256 check, memory map) and
- builds its plan (``build_plan(..., rank=0)``: the global plan, its own streams in full),

and prints load and plan seconds (wall; and CPU, load + plan, robust on a shared machine), the
peak resident set of the process (``VmHWM``, reset after the imports: the interpreter with numpy,
torch and webdataset is part of it), what load + plan added to it, and the file-backed resident
part at the end (the sidecar's pages: shared by the ranks of a node through the page cache). The baseline is the plan as it was built before (per-structure
Python loops, every rank's streams; ``tests/datapipe/plan_reference.py``), run on the same index
in the same way, interleaved with the new one, at the sizes it can reach (``--baseline-max``).

    OMP_NUM_THREADS=1 python benchmarks/bench_index.py --sizes 1e6 1e7 1e8 --world-sizes 8 64
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARD_SIZE = 1000


def write_synthetic(directory: Path, n: int, seed: int = 0, chunk: int = 10_000_000) -> None:
    """Write ``index.json`` + ``natoms.npy`` of ``n`` structures (OMol25-like counts) into ``directory``."""
    import numpy as np

    from datapipe.index import FORMAT, NATOMS_NAME
    from datapipe.shards import file_sha256

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    path = directory / NATOMS_NAME
    counts = np.lib.format.open_memmap(path, mode="w+", dtype="<u2", shape=(n,))
    shard_atoms = np.zeros(-(-n // SHARD_SIZE), np.int64)
    for lo in range(0, n, chunk):  # chunks are whole shards
        hi = min(n, lo + chunk)
        block = np.clip(np.rint(rng.lognormal(np.log(22.0), 0.6, hi - lo)), 2, 350).astype("<u2")
        counts[lo:hi] = block
        starts = np.arange(0, hi - lo, SHARD_SIZE)
        shard_atoms[lo // SHARD_SIZE:lo // SHARD_SIZE + len(starts)] = np.add.reduceat(block, starts, dtype=np.int64)
    counts.flush()
    del counts
    sizes = [min(SHARD_SIZE, n - k * SHARD_SIZE) for k in range(len(shard_atoms))]
    shards = [{"name": f"synthetic-{k:06d}.tar", "source": "synthetic", "structures": s, "atoms": int(a),
               "sha256": hashlib.sha256(str(k).encode()).hexdigest(), "bytes": 0}
              for k, (s, a) in enumerate(zip(sizes, shard_atoms))]
    raw = {"format": FORMAT, "settings": {}, "inputs": [], "n_structures": n, "n_atoms": int(shard_atoms.sum()),
           "n_shards": len(shards), "element_counts": {}, "element_references": [], "reference_rmse": 0.0,
           "force_rms": 1.0, "n_rejected": 0, "rejected_counts": {}, "rejected": [], "n_defaulted_charge_spin": 0,
           "data_hash": hashlib.sha256(f"synthetic {n} {seed}".encode()).hexdigest(),
           "natoms": {"file": NATOMS_NAME, "dtype": "<u2", "length": n, "sha256": file_sha256(path),
                      "bytes": path.stat().st_size},
           "shards": shards}
    (directory / "index.json").write_text(json.dumps(raw, indent=1) + "\n")


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def one(directory: str, world_size: int, workers: int, baseline: bool) -> dict:
    """Load and plan in this process; returns the measurements."""
    import gc

    import numpy as np

    import datapipe.remote  # noqa: F401 - imports (webdataset, torch) are not what is measured
    import datapipe.shards  # noqa: F401
    from datapipe.index import ShardIndex
    from datapipe.plan import build_plan

    np.union1d([0], [1])  # numpy's lazily imported set routines
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the present resident set
    base = _status_kb("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    index = ShardIndex.load(directory)
    t1 = time.perf_counter()
    kwargs = {"world_size": world_size, "num_workers": workers, "atoms_per_batch": 1024, "shuffle_buffer": 1000,
              "seed": 0}
    if baseline:
        sys.path.insert(0, str(REPO / "tests" / "datapipe"))
        import plan_reference

        streams, steps, *_ = plan_reference.build_plan(index, **kwargs)
    else:
        plan = build_plan(index, rank=0, **kwargs)
        steps = plan.steps
    t2, c2 = time.perf_counter(), time.process_time()
    peak = _status_kb("VmHWM")
    return {"load_s": t1 - t0, "plan_s": t2 - t1, "cpu_s": c2 - c0, "peak_MiB": peak / 1024,
            "added_MiB": (peak - base) / 1024, "file_MiB": _status_kb("RssFile") / 1024, "steps": steps}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7, 1e8])
    p.add_argument("--world-sizes", type=int, nargs="+", default=[8, 64])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="runs of each measurement (median printed)")
    p.add_argument("--baseline-max", type=float, default=1e6, help="largest size the old plan is run at")
    p.add_argument("--dir", default=None, help="where the synthetic indexes go (default: a temporary folder)")
    p.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        directory, world_size, workers, baseline = a.one
        print(json.dumps(one(directory, int(world_size), int(workers), baseline == "1")))
        return
    import statistics

    root = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="bench_index_"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    print(f"{'structures':>11} {'sidecar MiB':>11} {'json MiB':>8} {'ranks':>5} {'plan':>5} {'load s':>7} "
          f"{'plan s':>7} {'cpu s':>7} {'peak MiB':>9} {'added':>7} {'file':>6} {'steps':>8}")
    for size in a.sizes:
        n = int(size)
        directory = root / f"n{n}"
        t = time.perf_counter()
        write_synthetic(directory, n)
        made = time.perf_counter() - t
        sidecar = (directory / "natoms.npy").stat().st_size / 2**20
        js = (directory / "index.json").stat().st_size / 2**20
        for world_size in a.world_sizes:
            kinds = ["new"] + (["old"] if n <= a.baseline_max else [])
            runs = {k: [] for k in kinds}
            for _ in range(a.repeats):
                for kind in kinds:  # interleaved
                    cmd = [sys.executable, __file__, "--one", str(directory), str(world_size), str(a.workers),
                           "1" if kind == "old" else "0"]
                    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
                    runs[kind].append(json.loads(out.strip().splitlines()[-1]))
            for kind in kinds:
                med = {k: statistics.median(r[k] for r in runs[kind]) for k in runs[kind][0]}
                print(f"{n:>11.0e} {sidecar:>11.1f} {js:>8.1f} {world_size:>5} {kind:>5} {med['load_s']:>7.2f} "
                      f"{med['plan_s']:>7.2f} {med['cpu_s']:>7.2f} {med['peak_MiB']:>9.0f} {med['added_MiB']:>7.0f} "
                      f"{med['file_MiB']:>6.0f} {int(med['steps']):>8}", flush=True)
            if "old" in runs:
                new, old = (statistics.median(r["cpu_s"] for r in runs[k]) for k in ("new", "old"))
                print(f"{'':>11} load + plan CPU time old/new = {old / new:.1f}x", flush=True)
        print(f"{'':>11} (writing the synthetic index took {made:.1f} s)", flush=True)
        if not a.dir:
            for f in directory.iterdir():
                f.unlink()
            directory.rmdir()


if __name__ == "__main__":
    main()
