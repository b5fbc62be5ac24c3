"""Benchmark: the L(N, D) fit (full default grid + 1,000 bootstrap refits) against a plain scipy loop.

Ours: ``fit.sumlaw.fit_sum_law`` on the 240 Chinchilla points of Besiroglu et al. 2024 (4,500-start
grid, vectorised objective with analytic gradients, all starts in one batched L-BFGS; bootstrap
refits start from the full-data optimum and 4 other grid optima, batched too).

Baseline, measured in the same run: ``scipy.optimize.minimize(method="L-BFGS-B")`` with numerical
(finite-difference) gradients, one start at a time, on the same summed Huber objective. It is run on a
random subset of the grid (``--baseline-starts``, default 150) and extrapolated linearly to the
4,500 grid starts plus 1,000 bootstrap refits × 5 starts; the extrapolation is printed as such.

Against an earlier version of the optimizer (``--baseline-rev``, a git revision; default the last
one before the compacted ``fit.optim``), on Chinchilla and on the cpu study's four architectures
(``docs/study/cpu/runs.csv``, 18–24 points each, where hundreds of starts run to the iteration
limit: the case of the test suite's study fits): the same fits run with each ``batched_lbfgs`` in turn,
interleaved, ``--repeats`` times, CPU seconds (``time.process_time``), medians; the fitted numbers must
be identical (every bootstrap sample too), else the run says so and exits 1.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_fit.py``
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fit.sumlaw  # noqa: E402
from fit.sumlaw import default_grid, fit_sum_law  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
#: the last revision of fit/optim.py before the compacted batched L-BFGS
BASELINE_REV = "07ae678"
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "chinchilla_svg_extracted_data.csv"


def load():
    rows = list(csv.DictReader(DATA.open()))
    n = np.array([float(r["Model Size"]) for r in rows])
    c = np.array([float(r["Training FLOP"]) for r in rows])
    lo = np.array([float(r["loss"]) for r in rows])
    keep = np.argsort(lo)[:-5]  # Besiroglu et al. drop the 5 outliers (highest loss)
    return n[keep], (c / (6 * n))[keep], lo[keep]


def baseline_objective(theta, ln, ld, ll, delta=1e-3):
    a, b, e, al, be = theta
    pred = np.logaddexp(np.logaddexp(a - al * ln, b - be * ld), e)
    r = pred - ll
    ar = np.abs(r)
    return float(np.sum(np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta))))


def optimizer_at(rev: str):
    """``batched_lbfgs`` of ``fit/optim.py`` at git revision ``rev`` (a module loaded from a temp file)."""
    text = subprocess.run(["git", "show", f"{rev}:fit/optim.py"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(text)
    spec = importlib.util.spec_from_file_location(f"optim_{rev}", f.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.batched_lbfgs


def study_groups() -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """The cpu study's L(N, D) data per architecture (docs/study/cpu/runs.csv: 18–24 points each)."""
    rows = list(csv.DictReader((REPO / "docs" / "study" / "cpu" / "runs.csv").open()))
    out = []
    for arch in dict.fromkeys(r["architecture"] for r in rows):
        mine = [r for r in rows if r["architecture"] == arch]
        out.append((f"cpu study {arch}", *(np.array([float(r[k]) for r in mine]) for k in ("N", "D", "L"))))
    return out


def versus_baseline(datasets, rev: str, repeats: int, n_boot: int) -> bool:
    """Interleaved CPU seconds of the same fits with today's optimizer and ``rev``'s; True if identical."""
    versions = {"ours": fit.sumlaw.batched_lbfgs, rev: optimizer_at(rev)}
    all_same = True
    for label, n, d, lo in datasets:
        seconds = {k: [] for k in versions}
        results = {}
        for _ in range(repeats):
            for name, optimizer in versions.items():
                fit.sumlaw.batched_lbfgs = optimizer
                start = time.process_time()
                results[name] = fit_sum_law(n, d, lo, n_bootstrap=n_boot)
                seconds[name].append(time.process_time() - start)
        fit.sumlaw.batched_lbfgs = versions["ours"]
        a, b = results["ours"], results[rev]
        same = (a.converged == b.converged and a.message == b.message and a.n_starts_converged == b.n_starts_converged
                and (not a.converged or (np.array_equal(a.theta, b.theta) and a.objective == b.objective
                                         and np.array_equal(a.bootstrap["samples"], b.bootstrap["samples"]))))
        all_same &= same
        med = {k: float(np.median(v)) for k, v in seconds.items()}
        what = (f"{n_boot} bootstrap refits" if a.converged
                else "no bootstrap: the fit is refused, " + a.message.split(":")[0])
        print(f"{label} ({n.size} points; grid {a.n_starts} starts, {a.n_starts_converged} converged, {what}): "
              f"CPU s, median of {repeats}, interleaved: ours {med['ours']:.2f}, {rev} {med[rev]:.2f}, "
              f"ratio {med[rev] / med['ours']:.2f}x; fitted numbers {'identical' if same else 'DIFFERENT'}", flush=True)
    return all_same


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--baseline-starts", type=int, default=150)
    ap.add_argument("--baseline-rev", default=BASELINE_REV,
                    help="git revision of fit/optim.py to compare with ('' to skip)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    n, d, lo = load()
    print(f"data: {n.size} points ({DATA.name}, 5 outliers dropped)")
    if args.baseline_rev:
        datasets = [("chinchilla", n, d, lo), *study_groups()]
        if not versus_baseline(datasets, args.baseline_rev, args.repeats, args.bootstrap):
            sys.exit(1)
    t0 = time.perf_counter()
    fit = fit_sum_law(n, d, lo, n_bootstrap=args.bootstrap)
    ours = time.perf_counter() - t0
    print(f"ours: grid {fit.n_starts} starts + {args.bootstrap} bootstrap refits: {ours:.1f} s "
          f"({fit.message})")
    p = fit.params
    print(f"  E={p['E']:.4f} A={p['A']:.2f} B={p['B']:.2f} alpha={p['alpha']:.4f} beta={p['beta']:.4f}")

    ln, ld, ll = np.log(n), np.log(d), np.log(lo)
    grid = default_grid()
    sub = grid[np.random.default_rng(0).choice(len(grid), args.baseline_starts, replace=False)]
    t0 = time.perf_counter()
    best = np.inf
    for x0 in sub:
        r = minimize(baseline_objective, x0, args=(ln, ld, ll), method="L-BFGS-B")
        best = min(best, r.fun)
    per_start = (time.perf_counter() - t0) / len(sub)
    total_refits = len(grid) + args.bootstrap * 5
    est = per_start * total_refits
    print(f"baseline (scipy L-BFGS-B, numerical gradients, one start at a time): {per_start * 1e3:.1f} ms/start "
          f"measured on {len(sub)} random grid starts (best objective {best:.6g} vs ours {fit.objective:.6g})")
    print(f"  extrapolated to {len(grid)} grid starts: {per_start * len(grid):.1f} s; "
          f"to grid + {args.bootstrap}×5 bootstrap starts: {est:.1f} s")
    print(f"speed-up (extrapolated baseline / ours): {est / ours:.1f}x")


if __name__ == "__main__":
    main()
