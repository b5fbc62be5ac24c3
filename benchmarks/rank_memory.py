"""Peak resident memory of every rank of a launched training job (CPU runs), against the planner.

Runs the command after ``--``, and every ``--every`` seconds reads each rank's ``VmHWM`` (the
kernel's high-water mark of resident memory, so a late look still sees an early peak) and
``VmRSS`` from ``/proc``. A rank is a process running ``launcher/train.py`` whose parent is not
itself a rank (loader workers are forks of a rank). Writes ``OUT`` (JSON: peak per rank) and
``OUT.timeline`` (unix time, then ``pid:RSS GiB`` per rank), and prints the peaks.

    OMP_NUM_THREADS=1 python benchmarks/rank_memory.py --out peaks.json -- \\
        deepspeed --num_gpus 2 launcher/train.py --model esen --width 512 --zero-stage 3 \\
        --activation-checkpointing --atoms-per-batch 64 --max-atoms 512 --run-dir runs/w512

The planner's estimate for the same run is in the run's ``metrics.jsonl`` (``start`` record,
``memory_plan.estimate_bytes``) and in ``zoo plan``. Linux only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import psutil


#: command-line marks of the launchers (they name launcher/train.py too, but are not ranks)
LAUNCHERS = ("launcher.launch", "torch.distributed.run", "torchrun", "bin/deepspeed")


def is_rank(process: psutil.Process) -> bool:
    """A process running ``launcher/train.py`` that is neither a launcher nor a fork of a rank
    (a loader worker keeps its parent's command line)."""
    command = process.cmdline()
    text = " ".join(command)
    if "launcher/train.py" not in text or any(mark in text for mark in LAUNCHERS):
        return False
    return process.parent().cmdline() != command


def high_water(pid: int) -> int:
    """``VmHWM`` of ``pid`` in bytes."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--every", type=float, default=2.0)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    job = subprocess.Popen(command)
    root, peaks = psutil.Process(job.pid), {}
    with open(args.out + ".timeline", "w") as timeline:
        while job.poll() is None:
            row = []
            for process in root.children(recursive=True):
                try:
                    if not is_rank(process):
                        continue
                    peak, rss = high_water(process.pid), process.memory_info().rss
                except (psutil.Error, OSError, StopIteration):
                    continue
                peaks[process.pid] = max(peaks.get(process.pid, 0), peak)
                row.append(f"{process.pid}:{rss / 2**30:.3f}")
            timeline.write(f"{time.time():.0f} {' '.join(row)}\n")
            timeline.flush()
            with open(args.out, "w") as out:
                json.dump({str(pid): {"peak_bytes": b, "peak_GiB": b / 2**30} for pid, b in peaks.items()}, out)
            time.sleep(args.every)
    for pid, peak in peaks.items():
        print(f"rank process {pid}: peak RSS {peak / 2**30:.3f} GiB")
    return job.returncode


if __name__ == "__main__":
    sys.exit(main())
