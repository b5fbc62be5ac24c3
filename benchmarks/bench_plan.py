"""Planner against measured peak memory: one process, two training steps (forward, loss, backward,
schedule-free AdamW step; the second is the steady state the planner describes), fp32 on the CPU,
each width in a fresh process.

Measured: peak resident memory (``ru_maxrss``) minus the resident memory before the model is built,
with glibc told to mmap every block over 64 KiB (``MALLOC_MMAP_THRESHOLD_``), so that freed tensors
leave the resident set and the peak is that of live memory (not of a fragmented heap).
Planned: :func:`zoo.plan.memory.plan_one` for one rank without ZeRO (weights 4N, gradients 4N,
optimizer 8N, activations measured on the meta device × atoms), without the fixed runtime share.

    OMP_NUM_THREADS=1 python benchmarks/bench_plan.py --model esen --widths 128 256 384 --structures 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def one(model_name: str, width: int, structures: int, conservative: bool) -> dict:
    import resource

    import psutil
    import torch

    from datapipe.graph import batch_from_atoms
    from launcher.loss import loss_terms
    from launcher.optim import build_optimizer
    from zoo.flops.report import reference_structures
    from zoo.plan.activations import activations_per_atom
    from zoo.plan.memory import plan_one
    from zoo.registry import build

    atoms_list = reference_structures()[0][:structures]
    batch = batch_from_atoms(atoms_list, cutoff=6.0)
    act = activations_per_atom(model_name, width, not conservative, atoms_list)
    base = psutil.Process().memory_info().rss
    torch.manual_seed(0)
    model = build(model_name, width=width, direct_forces=not conservative)
    batch = batch_from_atoms(atoms_list, cutoff=model.data_cutoff)
    model.set_normalization(None, 1.0)
    opt = build_optimizer(model, 1e-3)
    n = sum(p.numel() for p in model.parameters())
    for _ in range(2):  # the second step is the steady state: optimizer state exists during forward/backward
        opt.zero_grad(set_to_none=True)
        terms = loss_terms(model(batch), batch, 1.0)
        (terms.energy_sum / terms.structures + terms.force_sum / terms.atoms).backward()
        opt.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    atoms = int(batch.num_nodes)
    plan = plan_one("deepspeed", 0, n, 0, 1, "fp32", act["per_atom"], atoms, False, "", float("inf"))
    planned = plan.weights + plan.gradients + plan.optimizer + plan.activations
    return {"model": model_name, "width": width, "N": n, "atoms": atoms, "measured_GiB": peak / 2**30,
            "planned_GiB": planned / 2**30, "planned_over_measured": planned / peak}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="esen")
    p.add_argument("--widths", type=int, nargs="+", default=[128, 256, 384])
    p.add_argument("--structures", type=int, default=8)
    p.add_argument("--conservative", action="store_true")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.model, a.widths[0], a.structures, a.conservative)))
        return
    for width in a.widths:
        cmd = [sys.executable, __file__, "--one", "--model", a.model, "--widths", str(width),
               "--structures", str(a.structures)] + (["--conservative"] if a.conservative else [])
        # large blocks mmap-ed and returned on free: resident memory follows live tensors, not glibc's heap
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        print(f"{r['model']} width {r['width']:5d} N {r['N']:>12,} atoms {r['atoms']:4d}: measured "
              f"{r['measured_GiB']:.3f} GiB, planned {r['planned_GiB']:.3f} GiB, planned/measured "
              f"{r['planned_over_measured']:.3f}", flush=True)


if __name__ == "__main__":
    main()
