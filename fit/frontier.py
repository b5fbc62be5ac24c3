"""Compute frontier L(C) = L∞ + F_c·C^(−γ_c) over a zoo's checkpoints.

The frontier "owners" are the checkpoints that set a new minimum loss as compute grows, taken
over all widths and all checkpoints along each run of a group (arXiv 2510.09768, the paper this
project implements, §scaling analysis: compute-optimal frontier). With L∞ = 0 (the paper's
choice) the fit is ordinary least squares of log L on log C over the owners; with L∞ free it is
nonlinear least squares of log L on log(L∞ + F_c·C^(−γ_c)). Intervals come from a bootstrap over
the owners (resampling with replacement).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import least_squares

from fit.stats import summarize
from fit.sumlaw import FitError


def frontier_owners(compute, loss) -> np.ndarray:
    """Indices of the checkpoints that set a new minimum loss as compute grows.

    Parameters
    ----------
    compute : array_like, shape [n]
        Training FLOPs C of each checkpoint.
    loss : array_like, shape [n]
        Validation loss L of each checkpoint.

    Returns
    -------
    ndarray of int, shape [m]
        Indices into the inputs, in increasing compute; each has a loss strictly below every
        checkpoint of smaller or equal compute. Ties in compute: the lowest loss wins.

    Examples
    --------
    >>> frontier_owners([1e15, 2e15, 3e15, 4e15], [5.0, 4.0, 4.5, 3.0]).tolist()   # the third is no gain
    [0, 1, 3]
    """
    c = np.asarray(compute, float)
    lo = np.asarray(loss, float)
    order = np.lexsort((lo, c))
    best = np.inf
    keep = []
    for i in order:
        if lo[i] < best:
            keep.append(i)
            best = lo[i]
    return np.array(keep, dtype=int)


@dataclass
class FrontierFit:
    """Result of :func:`fit_frontier` (see ``fit/README.md`` for the JSON form).

    ``params`` holds gamma_c, F_c, L_inf (0 when fixed); ``intervals`` their bootstrap
    summaries; ``objective`` the sum of squared log residuals; ``owners`` the indices of the
    frontier checkpoints used (after the compute window).
    """

    converged: bool
    message: str
    l_inf_free: bool
    params: dict = field(default_factory=dict)
    intervals: dict = field(default_factory=dict)
    objective: float = float("nan")
    n_points: int = 0
    n_owners_total: int = 0
    owners: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    window: tuple = (None, None)

    def predict(self, compute) -> np.ndarray:
        p = self.params
        return p["L_inf"] + p["F_c"] * np.asarray(compute, float) ** (-p["gamma_c"])


def _ols(x, y, w):
    """Weighted OLS y = c0 + c1·x, batched: x, y [n], w [B, n] -> (c0 [B], c1 [B])."""
    sw = w.sum(axis=1)
    mx = (w @ x) / sw
    my = (w @ y) / sw
    sxx = (w * (x - mx[:, None]) ** 2).sum(axis=1)
    sxy = (w * (x - mx[:, None]) * (y - my[:, None])).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        c1 = sxy / sxx
    return my - c1 * mx, c1


def fit_frontier(
    compute,
    loss,
    *,
    c_min: float | None = None,
    c_max: float | None = None,
    l_inf_free: bool = False,
    n_bootstrap: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> FrontierFit:
    """Fit the compute frontier of one group of checkpoints.

    Parameters
    ----------
    compute : array_like, shape [n]
        Training FLOPs C (> 0).
    loss : array_like, shape [n]
        Validation loss L (> 0).
    c_min, c_max : float, optional
        Compute window: owners outside [c_min, c_max] are not fitted (owners are found over
        all points first).
    l_inf_free : bool
        Fit L∞ ≥ 0 too (nonlinear least squares on log L) instead of fixing it at 0.
    n_bootstrap : int
        Bootstrap refits over the owners (0: no intervals).
    level : float
        Central probability of the percentile intervals.
    seed : int

    Returns
    -------
    FrontierFit

    Raises
    ------
    FitError
        Non-positive or non-finite inputs; fewer than 3 owners in the window (4 with L∞ free).
    """
    c = np.asarray(compute, float)
    lo = np.asarray(loss, float)
    if c.shape != lo.shape or c.ndim != 1:
        raise FitError("frontier fit: compute and loss must be 1-D arrays of equal length")
    if np.any(~np.isfinite(c) | (c <= 0)) or np.any(~np.isfinite(lo) | (lo <= 0)):
        raise FitError("frontier fit: compute and loss must be positive and finite")
    owners_all = frontier_owners(c, lo)
    sel = np.ones(owners_all.size, dtype=bool)
    if c_min is not None:
        sel &= c[owners_all] >= c_min
    if c_max is not None:
        sel &= c[owners_all] <= c_max
    owners = owners_all[sel]
    need = 4 if l_inf_free else 3
    if owners.size < need:
        raise FitError(
            f"frontier fit needs at least {need} frontier checkpoints in the compute window "
            f"[{c_min}, {c_max}]; found {owners.size} (of {owners_all.size} owners, {c.size} checkpoints)"
        )
    x = np.log(c[owners])
    y = np.log(lo[owners])
    base = dict(
        l_inf_free=l_inf_free, n_points=int(owners.size), n_owners_total=int(owners_all.size),
        owners=owners, window=(c_min, c_max),
    )
    rng = np.random.default_rng(seed)
    m = owners.size
    counts = rng.multinomial(m, np.full(m, 1.0 / m), size=n_bootstrap).astype(float) if n_bootstrap > 0 else None
    c0, c1 = _ols(x, y, np.ones((1, m)))
    gamma, log_f = float(-c1[0]), float(c0[0])
    if not l_inf_free:
        resid = y - (log_f - gamma * x)
        params = {"gamma_c": gamma, "F_c": float(np.exp(log_f)), "L_inf": 0.0}
        intervals = {}
        if counts is not None:
            b0, b1 = _ols(x, y, counts)
            intervals = {"gamma_c": summarize(-b1, level), "F_c": summarize(np.exp(b0), level)}
        msg = f"least squares of log L on log C over {m} frontier checkpoints (L_inf fixed at 0)"
        return FrontierFit(True, msg, params=params, intervals=intervals, objective=float(resid @ resid), **base)

    l_top = float(np.exp(y.min()))

    def solve(w, p0):
        sw = np.sqrt(w)

        def res(p):
            return sw * (np.log(p[0] + np.exp(p[1] - p[2] * x)) - y)

        return least_squares(res, p0, bounds=([0.0, -np.inf, 0.0], [l_top * (1 - 1e-9), np.inf, np.inf]),
                             x_scale="jac", xtol=1e-12, ftol=1e-12, gtol=1e-12, max_nfev=5000)

    best = None
    for frac in (0.0, 0.3, 0.6, 0.9):  # a few starts in L_inf between 0 and the lowest loss
        p0 = np.array([frac * l_top, log_f, max(gamma, 1e-3)])
        r = solve(np.ones(m), p0)
        if r.success and (best is None or r.cost < best.cost):
            best = r
    if best is None:
        return FrontierFit(False, "L_inf-free frontier fit did not converge from any start", **base)
    l_inf, lf, g = best.x
    params = {"gamma_c": float(g), "F_c": float(np.exp(lf)), "L_inf": float(l_inf)}
    intervals = {}
    if counts is not None:
        nb = min(n_bootstrap, 200)
        samples = []
        for w in counts[:nb]:
            r = solve(w, best.x)
            if r.success:
                samples.append(r.x)
        s = np.array(samples).reshape(-1, 3)
        intervals = {"L_inf": summarize(s[:, 0], level), "F_c": summarize(np.exp(s[:, 1]), level),
                     "gamma_c": summarize(s[:, 2], level)}
    msg = f"nonlinear least squares of log L over {m} frontier checkpoints (L_inf free)"
    if l_inf <= 1e-12 * l_top:
        msg += "; L_inf at its bound 0"
    return FrontierFit(True, msg, params=params, intervals=intervals, objective=float(2 * best.cost), **base)


def summary_dict(fit: FrontierFit) -> dict:
    """JSON-ready summary (see ``fit/README.md``)."""
    out = {
        "converged": fit.converged,
        "message": fit.message,
        "l_inf_free": fit.l_inf_free,
        "n_points": fit.n_points,
        "n_owners_total": fit.n_owners_total,
        "compute_window": list(fit.window),
        "objective": fit.objective if fit.converged else None,
    }
    if fit.converged:
        out.update(fit.params)
        out["intervals"] = {k: v.to_dict() for k, v in fit.intervals.items()}
    return out
