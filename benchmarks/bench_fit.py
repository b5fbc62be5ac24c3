"""Benchmark: the L(N, D) fit (full default grid + 1,000 bootstrap refits) against a plain scipy loop.

Ours: ``fit.sumlaw.fit_sum_law`` on the 240 Chinchilla points of Besiroglu et al. 2024 (4,500-start
grid, vectorised objective with analytic gradients, all starts in one batched L-BFGS; bootstrap
refits start from the full-data optimum and 4 other grid optima, batched too).

Baseline, measured in the same run: ``scipy.optimize.minimize(method="L-BFGS-B")`` with numerical
(finite-difference) gradients, one start at a time, on the same summed Huber objective. It is run on a
random subset of the grid (``--baseline-starts``, default 150) and extrapolated linearly to the
4,500 grid starts plus 1,000 bootstrap refits × 5 starts; the extrapolation is printed as such.

Run: ``.venv/bin/python benchmarks/bench_fit.py``
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fit.sumlaw import default_grid, fit_sum_law  # noqa: E402

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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--baseline-starts", type=int, default=150)
    args = ap.parse_args()
    n, d, lo = load()
    print(f"data: {n.size} points ({DATA.name}, 5 outliers dropped)")
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
