"""Compute-optimal allocation under C = k·N·D from a fitted L(N, D) = E + A·N^(−α) + B·D^(−β).

Minimising L at fixed C = k·N·D gives (Hoffmann et al. 2022, arXiv 2203.15556, eq. 4):

    N*(C) = G·(C/k)^a,   D*(C) = G^(−1)·(C/k)^b,   G = (αA/(βB))^(1/(α+β)),
    a = β/(α+β),  b = α/(α+β),

and the loss along that path approaches E as C^(−γ_c) with γ_c = αβ/(α+β). k is 6 for dense
language models (Kaplan et al. 2020) and 3κ for this project's force fields (arXiv 2510.09768).
Intervals propagate the L(N, D) bootstrap samples through the same formulas.
"""

from __future__ import annotations

import numpy as np

from fit.stats import summarize
from fit.sumlaw import FitError, SumLawFit, derived, law_terms


def optimal_allocation(theta, compute, k: float) -> dict:
    """N*, D* and L* at budgets ``compute`` for parameter rows ``theta``.

    Parameters
    ----------
    theta : ndarray, shape [..., 5]
        Law parameters (log A, log B, log E, α, β).
    compute : array_like, shape [m]
        Budgets C in FLOPs (> 0).
    k : float
        FLOPs per parameter per data item (C = k·N·D).

    Returns
    -------
    dict with ``N_opt``, ``D_opt``, ``L_opt``: ndarrays of shape [..., m].

    Raises
    ------
    FitError
        Non-positive budgets or k.
    """
    c = np.atleast_1d(np.asarray(compute, float))
    if np.any(~(c > 0)) or not k > 0:
        raise FitError(f"allocation needs positive budgets and k; got C={c.tolist()}, k={k}")
    theta = np.asarray(theta, float)
    dv = derived(theta)
    x = c / k  # [m] = N·D
    a = dv["a"][..., None]
    n_opt = dv["G"][..., None] * x ** a
    d_opt = x / n_opt
    l_opt = law_terms(theta[..., None, :], n_opt, d_opt)  # in log space: A may overflow, N^(−α) underflow
    return {"N_opt": n_opt, "D_opt": d_opt, "L_opt": l_opt}


def allocation_table(fit: SumLawFit, budgets, k: float, level: float = 0.95) -> list[dict]:
    """Point estimates and bootstrap intervals of N*, D*, L* for each budget.

    Returns
    -------
    list of dict, one per budget: ``C``, ``k``, ``N_opt``, ``D_opt``, ``L_opt``,
    ``D_per_N`` and ``intervals`` {name: Interval.to_dict()}.

    Raises
    ------
    FitError
        If the fit did not converge.
    """
    if not fit.converged:
        raise FitError("no allocation from an L(N, D) fit that did not converge")
    budgets = np.atleast_1d(np.asarray(budgets, float))
    point = optimal_allocation(fit.theta, budgets, k)
    samples = fit.bootstrap.get("samples")
    boot = optimal_allocation(samples, budgets, k) if samples is not None and len(samples) else None
    rows = []
    for j, cj in enumerate(budgets):
        row = {"C": float(cj), "k": float(k)}
        for key in ("N_opt", "D_opt", "L_opt"):
            row[key] = float(point[key][j])
        row["D_per_N"] = row["D_opt"] / row["N_opt"]
        if boot is not None:
            row["intervals"] = {key: summarize(boot[key][:, j], level).to_dict() for key in ("N_opt", "D_opt", "L_opt")}
        rows.append(row)
    return rows


def estimate_k(n_params, n_data, compute) -> tuple[float, float]:
    """Median and relative spread (max/min) of C/(N·D) over rows: the k in C = k·N·D."""
    ratio = np.asarray(compute, float) / (np.asarray(n_params, float) * np.asarray(n_data, float))
    return float(np.median(ratio)), float(ratio.max() / ratio.min())
