"""Cost of per-step FLOP counting as a share of training time, and the error of its shortcut.

For each architecture: a short training run (forward with forces, the paper's loss — per-atom
energy MAE + per-atom force L2 norm — backward, AdamW step) on real batches of the embedded
validation sample (``data/omol25_sample/val``, packed to an atom budget in shuffled order so
that batch shapes vary), calling :class:`zoo.flops.counter.StepFlopCounter` on every step. Printed, all
measured in the same run:

- the training step time (the baseline) and the time of one exact (traced) count;
- the counting overhead: counter time / training time, over the whole run and after warm-up
  (the first ``min_exact`` exact counts, a fixed cost of a run);
- the shortcut's error: the counter's answer vs an exact count on batches it did not trace.

Run time: the default (all four architectures, 150 steps each) took about 18 minutes on 2 busy
CPU cores (issue 15); it says so when it starts and prints a line as each architecture starts.
``--models mpnn --steps 40`` is a quick look.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_flops.py                      # all four, 150 steps (~18 min)
    OMP_NUM_THREADS=1 python benchmarks/bench_flops.py --models mpnn --steps 400 --conservative
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datapipe import keys  # noqa: E402
from datapipe.graph import batch_from_atoms  # noqa: E402
from datapipe.sources import iter_atoms  # noqa: E402
from zoo.flops.counter import StepFlopCounter  # noqa: E402
from zoo.flops.trace import count_step  # noqa: E402
from zoo.registry import MODELS, build  # noqa: E402


def packed_batches(structures, atoms_per_batch: int, cutoff: float, seed: int, limit: int) -> list:
    order = np.random.default_rng(seed).permutation(len(structures))
    batches, group, atoms = [], [], 0
    for i in order:
        n = len(structures[i])
        if group and atoms + n > atoms_per_batch:
            batches.append(batch_from_atoms(group, cutoff=cutoff))
            group, atoms = [], 0
            if len(batches) == limit:
                break
        group.append(structures[i])
        atoms += n
    return batches


def train_step(model, optimizer, batch) -> None:
    optimizer.zero_grad(set_to_none=True)
    out = model(batch)
    natoms = batch[keys.NATOMS].to(out[keys.ENERGY].dtype)
    energy_error = ((out[keys.ENERGY] - batch[keys.ENERGY]) / natoms).abs().mean()
    force_error = (out[keys.FORCES] - batch[keys.FORCES].to(out[keys.FORCES].dtype)).norm(dim=-1).mean()
    (energy_error.float() + force_error).backward()
    optimizer.step()


def bench(name: str, width: int, direct: bool, structures, args) -> dict:
    torch.manual_seed(0)
    model = build(name, width=width, direct_forces=direct)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = packed_batches(structures, args.atoms_per_batch, model.data_cutoff, seed=0, limit=args.steps)
    counter = StepFlopCounter(model, budget=args.budget)
    answers, step_seconds = [], []
    start = time.perf_counter()
    warm_end = None
    for batch in batches:
        answers.append(counter.step_flops(batch))
        if warm_end is None and counter.exact_counts >= counter.min_exact:
            warm_end = (time.perf_counter(), counter.seconds)
        t = time.perf_counter()
        train_step(model, optimizer, batch)
        step_seconds.append(time.perf_counter() - t)
    wall = time.perf_counter() - start
    exact_time = counter.seconds / max(counter.exact_counts, 1)
    steady = float("nan")
    if warm_end is not None and wall > warm_end[0] - start:
        steady = (counter.seconds - warm_end[1]) / (start + wall - warm_end[0])
    # the shortcut's error on batches answered by the fit (not traced by the counter)
    traced = {tuple(x) for x in map(lambda v: v.tolist(), counter._x)}
    from zoo.flops.counter import batch_features

    errors = []
    for batch, answer in zip(batches, answers):
        if tuple(batch_features(batch, counter.cutoffs).tolist()) in traced:
            continue
        exact = count_step(model, batch).total
        errors.append(abs(answer - exact) / exact)
        if len(errors) == args.check:
            break
    return {
        "model": name, "width": width, "direct": direct, "steps": len(batches),
        "atoms/batch": float(np.mean([b.num_nodes for b in batches])),
        "step_s": float(np.mean(step_seconds)), "exact_count_s": exact_time, "exact_counts": counter.exact_counts,
        "overhead_total": counter.seconds / wall, "overhead_steady": steady,
        "fit_err_max": max(errors) if errors else float("nan"),
        "fit_err_mean": float(np.mean(errors)) if errors else float("nan"), "checked": len(errors),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=sorted(MODELS))
    parser.add_argument("--width", type=int, default=None, help="default: each spec's smallest width")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--atoms-per-batch", type=int, default=400)
    parser.add_argument("--budget", type=float, default=0.005)
    parser.add_argument("--check", type=int, default=10, help="fit-answered batches checked against exact counts")
    parser.add_argument("--conservative", action="store_true")
    parser.add_argument("--data", default=str(ROOT / "data" / "omol25_sample" / "val"))
    args = parser.parse_args()
    files = sorted(Path(args.data).glob("*.aselmdb"))
    if not files:
        sys.exit(f"no .aselmdb files under {args.data}")
    default_run = sorted(args.models) == sorted(MODELS) and args.steps == 150 and args.width is None
    print(("this takes about 18 minutes on 2 CPU cores (all four architectures, 150 steps each); "
           if default_run else f"{len(args.models)} architecture(s) x {args.steps} steps (the default, all four x "
           "150, takes about 18 minutes on 2 CPU cores); ")
          + "shorten with e.g. --models mpnn --steps 40", flush=True)
    structures = [a for f in files for a in iter_atoms(f)]
    print(f"data: {len(structures)} structures from {args.data}; {torch.get_num_threads()} threads; "
          f"budget {args.budget:.1%}")
    print(f"{'model':10} {'width':>5} {'forces':>6} {'steps':>5} {'atoms/b':>7} {'step s':>7} {'count s':>7} "
          f"{'exact':>5} {'overhead':>8} {'steady':>7} {'fit err max':>11} {'mean':>8}")
    started = time.perf_counter()
    for name in args.models:
        width = args.width or MODELS[name].widths[0]
        print(f"  … {name} width {width} ({time.perf_counter() - started:.0f} s so far)", flush=True)
        r = bench(name, width, not args.conservative, structures, args)
        print(f"{r['model']:10} {r['width']:5d} {'direct' if r['direct'] else 'cons.':>6} {r['steps']:5d} "
              f"{r['atoms/batch']:7.0f} {r['step_s']:7.3f} {r['exact_count_s']:7.3f} {r['exact_counts']:5d} "
              f"{r['overhead_total']:8.2%} {r['overhead_steady']:7.2%} {r['fit_err_max']:11.2e} "
              f"{r['fit_err_mean']:8.2e}  ({r['checked']} checked)", flush=True)


if __name__ == "__main__":
    main()
