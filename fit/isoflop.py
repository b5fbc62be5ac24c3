"""IsoFLOP profiles (Hoffmann et al. 2022, arXiv 2203.15556, §3.2, approach 2).

At each fixed compute C, loss against log N is fitted with a parabola; its vertex is the
compute-optimal size N_opt(C). A power law N_opt ∝ C^a (least squares of log N_opt on log C)
gives the exponent; under C = k·N·D, D_opt ∝ C^b with b = 1 − a.

Profiles come from the data in one of two ways:
- ``cluster``: points whose compute agrees within ``tol_dex`` (log10 units) form one level
  (runs trained to a set of FLOP budgets, as in Chinchilla);
- ``interpolate``: each model size is a run with several checkpoints; its log L is interpolated
  linearly in log C at common levels (training curves read at matched compute).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from fit.sumlaw import FitError


@dataclass
class IsoFlopFit:
    """Result of :func:`fit_isoflop` (JSON form in ``fit/README.md``)."""

    converged: bool
    message: str
    mode: str = ""
    params: dict = field(default_factory=dict)
    intervals: dict = field(default_factory=dict)
    levels: list = field(default_factory=list)  # per level: C, N_opt, logN [m], L [m], coef [3]
    objective: float = float("nan")
    n_points: int = 0


def _profiles(n, c, lo, mode, tol_dex, n_levels):
    lc = np.log10(c)
    if mode == "auto":
        _, counts = np.unique(n, return_counts=True)
        mode = "interpolate" if np.all(counts >= 2) and len(counts) >= 3 else "cluster"
    levels = []
    if mode == "cluster":
        order = np.argsort(lc)
        cuts = np.flatnonzero(np.diff(lc[order]) > tol_dex) + 1
        for idx in np.split(order, cuts):
            if np.unique(n[idx]).size >= 3:
                levels.append((10 ** np.median(lc[idx]), n[idx], lo[idx]))
    elif mode == "interpolate":
        sizes = np.unique(n)
        spans = [(lc[n == s].min(), lc[n == s].max()) for s in sizes]
        grid = np.linspace(lc.min(), lc.max(), n_levels)
        for g in grid:
            ns, ls = [], []
            for s, (a, b) in zip(sizes, spans):
                if a <= g <= b and a < b:
                    m = n == s
                    o = np.argsort(lc[m])
                    ls.append(10 ** np.interp(g, lc[m][o], np.log10(lo[m][o])))
                    ns.append(s)
            if len(ns) >= 3:
                levels.append((10**g, np.array(ns), np.array(ls)))
    else:
        raise FitError(f"isoFLOP mode must be auto, cluster or interpolate, got {mode!r}")
    return mode, levels


def fit_isoflop(n_params, compute, loss, *, mode="auto", tol_dex=0.05, n_levels=12, level=0.95) -> IsoFlopFit:
    """Approach-2 fit of N_opt(C) ∝ C^a from isoFLOP profiles.

    Parameters
    ----------
    n_params, compute, loss : array_like, shape [n]
        N, C (FLOPs), L of each checkpoint (> 0).
    mode : {"auto", "cluster", "interpolate"}
        How profiles are formed (module docstring); ``auto`` interpolates when every model size
        has at least two checkpoints, else clusters.
    tol_dex : float
        Largest gap in log10 C inside one cluster.
    n_levels : int
        Number of log-spaced compute levels in interpolate mode.
    level : float
        Confidence of the t-interval on the exponent.

    Returns
    -------
    IsoFlopFit
        ``converged`` False (with the reason) when fewer than 3 levels have a parabola with
        positive curvature and its vertex inside the sizes of that level.

    Raises
    ------
    FitError
        Non-positive inputs or an unknown mode.
    """
    n, c, lo = (np.asarray(v, float) for v in (n_params, compute, loss))
    if any(np.any(~np.isfinite(v) | (v <= 0)) for v in (n, c, lo)):
        raise FitError("isoFLOP fit: N, C and L must be positive and finite")
    mode, profiles = _profiles(n, c, lo, mode, tol_dex, n_levels)
    levels = []
    for cl, ns, ls in profiles:
        x = np.log10(ns)
        coef = np.polyfit(x, ls, 2)  # L ≈ c2·x² + c1·x + c0
        if coef[0] <= 0:
            continue
        xv = -coef[1] / (2 * coef[0])
        if not x.min() < xv < x.max():
            continue
        levels.append({"C": float(cl), "N_opt": float(10**xv), "log10_N": x.tolist(), "L": ls.tolist(),
                       "coef": coef.tolist()})
    base = dict(mode=mode, levels=levels, n_points=len(n))
    if len(levels) < 3:
        return IsoFlopFit(False, f"isoFLOP: only {len(levels)} of {len(profiles)} compute levels ({mode} mode) have an "
                          "interior loss minimum over model size; need 3", **base)
    xc = np.log10([lv["C"] for lv in levels])
    yn = np.log10([lv["N_opt"] for lv in levels])
    reg = stats.linregress(xc, yn)
    t = stats.t.ppf(0.5 + level / 2, len(levels) - 2) if len(levels) > 2 else np.nan
    se = float(reg.stderr)
    params = {"a": float(reg.slope), "b": float(1 - reg.slope), "log10_N_coef": float(reg.intercept)}
    iv = {"se": se, "lo": float(reg.slope - t * se), "hi": float(reg.slope + t * se), "level": level, "n": len(levels)}
    intervals = {"a": iv, "b": {**iv, "lo": 1 - iv["hi"], "hi": 1 - iv["lo"]}}
    resid = yn - (reg.intercept + reg.slope * xc)
    return IsoFlopFit(True, f"{len(levels)} isoFLOP levels ({mode} mode); N_opt ∝ C^a by least squares",
                      params=params, intervals=intervals, objective=float(resid @ resid), **base)


def summary_dict(fit: IsoFlopFit) -> dict:
    out = {"converged": fit.converged, "message": fit.message, "mode": fit.mode, "n_points": fit.n_points,
           "n_levels": len(fit.levels), "objective": fit.objective if fit.converged else None}
    if fit.converged:
        out.update(fit.params)
        out["intervals"] = fit.intervals
        out["levels"] = [{"C": lv["C"], "N_opt": lv["N_opt"]} for lv in fit.levels]
    return out
