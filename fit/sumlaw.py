"""Sum power law L(N, D) = E + A·N^(−α) + B·D^(−β), fitted as Chinchilla approach 3.

Estimator (Hoffmann et al. 2022, arXiv 2203.15556, §3.3 and eq. 2; Besiroglu et al. 2024,
arXiv 2404.10102, §2): with a = log A, b = log B, e = log E,

    log L̂(N, D) = LSE(a − α log N,  b − β log D,  e)

and the parameters minimise the Huber loss (threshold δ, default 1e-3) of the log residuals
log L̂ − log L, *summed* over points (averaging shrinks the objective so that L-BFGS stops early:
Besiroglu et al. 2024, §3). L-BFGS starts from a grid (default α, β ∈ {0, 0.5, …, 2},
e ∈ {−1, −0.5, …, 1}, a, b ∈ {0, 5, …, 25}: 4,500 starts); the best converged start is polished
with scipy's L-BFGS-B and kept. Uncertainty comes from a bootstrap over points (resampling with
replacement, 1,000 refits by default): each refit starts from the full-data optimum and from the
few other distinct local optima the grid found, and keeps its best converged start.

Speed: the objective and its analytic gradient are vectorised over points *and* over starts /
bootstrap samples; all starts advance together in :func:`fit.optim.batched_lbfgs`. Internally the
log-size terms are centred (a_c = a − α·mean log N, likewise b) to make the problem better
conditioned; results are mapped back to (a, b, e, α, β).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import product

import numpy as np
from scipy.optimize import minimize

from fit.optim import STATUS_TEXT, batched_lbfgs
from fit.stats import Interval, summarize

PARAM_NAMES = ("a", "b", "e", "alpha", "beta")  # internal parameter vector order


class FitError(ValueError):
    """A fit could not be made (bad input) or did not converge."""


def default_grid() -> np.ndarray:
    """The Besiroglu et al. 2024 start grid as rows (a, b, e, α, β).

    Returns
    -------
    ndarray, shape [4500, 5]
        a, b ∈ {0, 5, …, 25}; e ∈ {−1, −0.5, …, 1}; α, β ∈ {0, 0.5, …, 2}.
    """
    ab = np.arange(0.0, 25.0 + 1e-9, 5.0)
    e = np.arange(-1.0, 1.0 + 1e-9, 0.5)
    ex = np.arange(0.0, 2.0 + 1e-9, 0.5)
    return np.array(list(product(ab, ab, e, ex, ex)), dtype=float)


class _Objective:
    """Summed Huber loss of log residuals and its analytic gradient, batched over starts."""

    def __init__(self, log_n, log_d, log_l, delta, weights=None):
        self.mn = float(np.mean(log_n))
        self.md = float(np.mean(log_d))
        self.xn = log_n - self.mn  # [n]
        self.xd = log_d - self.md  # [n]
        self.yl = log_l  # [n]
        self.delta = delta
        self.weights = weights  # None or [S, n]

    def to_internal(self, theta: np.ndarray) -> np.ndarray:
        u = np.array(theta, dtype=float, copy=True)
        u[..., 0] = theta[..., 0] - theta[..., 3] * self.mn
        u[..., 1] = theta[..., 1] - theta[..., 4] * self.md
        return u

    def to_external(self, u: np.ndarray) -> np.ndarray:
        t = np.array(u, dtype=float, copy=True)
        t[..., 0] = u[..., 0] + u[..., 3] * self.mn
        t[..., 1] = u[..., 1] + u[..., 4] * self.md
        return t

    def __call__(self, u: np.ndarray, rows: np.ndarray):
        """Objective [k] and gradient [k, 5] at internal points ``u`` [k, 5] of problems ``rows``."""
        t1 = np.multiply(u[:, 3:4], -self.xn)  # [k, n]  a_c − α·(log N − mean)
        t1 += u[:, 0:1]
        t2 = np.multiply(u[:, 4:5], -self.xd)  # [k, n]  b_c − β·(log D − mean)
        t2 += u[:, 1:2]
        m = np.maximum(t1, t2)  # [k, n] stabiliser of the log-sum-exp
        np.maximum(m, u[:, 2:3], out=m)
        t1 -= m
        e1 = np.exp(t1, out=t1)  # [k, n]
        t2 -= m
        e2 = np.exp(t2, out=t2)  # [k, n]
        e3 = np.subtract(u[:, 2:3], m)
        np.exp(e3, out=e3)  # [k, n]
        s = e1 + e2
        s += e3
        r = np.log(s)
        r += m
        r -= self.yl  # [k, n] log residuals log L̂ − log L
        ar = np.abs(r)
        c = np.minimum(ar, self.delta)
        # Huber: ½·min(|r|, δ)² + δ·(|r| − min(|r|, δ))
        h = np.subtract(ar, c, out=ar)
        h *= self.delta
        h += 0.5 * c * c
        psi = np.copysign(c, r, out=c)  # Huber derivative, clip(r, −δ, δ)
        if self.weights is not None:
            w = self.weights[rows]  # [k, n]
            h *= w
            psi *= w
        f = h.sum(axis=1)
        psi /= s
        g1 = np.multiply(psi, e1, out=e1)
        g2 = np.multiply(psi, e2, out=e2)
        g3 = np.multiply(psi, e3, out=e3)
        grad = np.empty_like(u)
        grad[:, 0] = g1.sum(axis=1)
        grad[:, 1] = g2.sum(axis=1)
        grad[:, 2] = g3.sum(axis=1)
        grad[:, 3] = -(g1 @ self.xn)
        grad[:, 4] = -(g2 @ self.xd)
        return f, grad


def _check_inputs(n_params, n_tokens, loss):
    arrays = [np.asarray(v, dtype=float) for v in (n_params, n_tokens, loss)]
    names = ("N (parameters)", "D (data, tokens or atoms)", "L (loss)")
    size = arrays[0].shape
    for name, arr in zip(names, arrays):
        if arr.ndim != 1 or arr.shape != size:
            raise FitError(f"L(N, D) fit: {name} must be a 1-D array of the same length as N")
        bad = ~np.isfinite(arr) | (arr <= 0)
        if np.any(bad):
            i = int(np.flatnonzero(bad)[0])
            raise FitError(
                f"L(N, D) fit: {name} has {int(bad.sum())} non-positive or non-finite value(s), "
                f"first at point {i}: {arr[i]!r}; the law is defined for positive values only"
            )
    n = size[0]
    n_distinct_n = np.unique(arrays[0]).size
    n_distinct_d = np.unique(arrays[1]).size
    if n < 8 or n_distinct_n < 3 or n_distinct_d < 3:
        raise FitError(
            f"L(N, D) fit needs at least 8 points with 3 distinct N and 3 distinct D "
            f"(5 parameters); got {n} points, {n_distinct_n} distinct N, {n_distinct_d} distinct D"
        )
    return arrays


@dataclass
class SumLawFit:
    """Result of :func:`fit_sum_law`.

    Attributes
    ----------
    converged : bool
        True when the best start converged and the scipy L-BFGS-B polish agreed. When False,
        ``params`` is empty and ``message`` says why: no number of a failed fit is reported.
    params : dict
        Point estimates: E, A, B, alpha, beta (law), a = β/(α+β), b = α/(α+β),
        gamma_c = αβ/(α+β) (compute-frontier exponent implied by the law), G (N* prefactor,
        see ``fit.allocation``), log-parameters log_A, log_B, log_E.
    intervals : dict[str, Interval]
        Bootstrap standard error and percentile interval for every entry of ``params``.
    objective : float
        Summed Huber loss at the optimum.
    n_points : int
    n_starts, n_starts_converged : int
        Size of the start grid and how many of its starts converged.
    bootstrap : dict
        ``n`` requested refits, ``n_ok`` converged ones (intervals use those), ``level``,
        ``samples`` (array [n_ok, 5] of a, b, e, α, β) for derived quantities.
    """

    converged: bool
    message: str
    params: dict = field(default_factory=dict)
    intervals: dict = field(default_factory=dict)
    objective: float = float("nan")
    n_points: int = 0
    n_starts: int = 0
    n_starts_converged: int = 0
    delta: float = 1e-3
    bootstrap: dict = field(default_factory=dict)
    theta: np.ndarray | None = None  # [5] a, b, e, alpha, beta

    def predict(self, n_params, n_tokens) -> np.ndarray:
        """Law prediction L(N, D) with the point estimate (same shape as broadcast N, D)."""
        if not self.converged:
            raise FitError("L(N, D) fit did not converge; no prediction")
        return law_terms(self.theta, n_params, n_tokens)


def law_terms(theta, n_params, n_tokens) -> np.ndarray:
    """L(N, D) = E + A·N^(−α) + B·D^(−β) from log-parameters, each term formed in log space.

    A fit with a large α (say 70) has log A in the thousands: ``exp(log A)`` overflows and
    ``N**(-α)`` underflows, and their product would be ``inf · 0 = NaN``. Here each power term is
    ``exp(log A − α·log N)``, finite whenever the term itself is.

    Parameters
    ----------
    theta : ndarray, shape [..., 5]
        (log A, log B, log E, α, β).
    n_params, n_tokens : array_like
        N and D, broadcast against ``theta[..., 0]``; positive.

    Returns
    -------
    ndarray, the broadcast shape: the law's loss.

    Examples
    --------
    >>> theta = np.array([1000.0, 1.0, np.log(0.5), 70.0, 0.3])  # A = e^1000 overflows float64
    >>> float(law_terms(theta, 1e8, 1e6)) > 0.5
    True
    """
    theta = np.asarray(theta, float)
    la, lb, le, al, be = (theta[..., i] for i in range(5))
    log_n = np.log(np.asarray(n_params, float))
    log_d = np.log(np.asarray(n_tokens, float))
    return np.exp(le) + np.exp(la - al * log_n) + np.exp(lb - be * log_d)


def derived(theta: np.ndarray) -> dict:
    """Law constants and allocation exponents from parameter rows (a, b, e, α, β).

    Parameters
    ----------
    theta : ndarray, shape [..., 5]

    Returns
    -------
    dict of ndarray, each shape [...]
        E, A, B, alpha, beta, a = β/(α+β), b = α/(α+β), gamma_c = αβ/(α+β) and
        G = (αA/(βB))^(1/(α+β)) (Hoffmann et al. 2022, eq. 4).
    """
    la, lb, le, al, be = (theta[..., i] for i in range(5))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        tot = al + be
        log_g = (np.log(al) + la - np.log(be) - lb) / tot
        return {
            "E": np.exp(le),
            "A": np.exp(la),
            "B": np.exp(lb),
            "alpha": al,
            "beta": be,
            "a": be / tot,
            "b": al / tot,
            "gamma_c": al * be / tot,
            "G": np.exp(log_g),
            "log_A": la,
            "log_B": lb,
            "log_E": le,
        }


def _polish(obj: _Objective, u0: np.ndarray):
    res = minimize(
        lambda u: tuple(v[0] for v in obj(u[None, :], np.zeros(1, dtype=int))),
        u0,
        jac=True,
        method="L-BFGS-B",
        options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 20000, "maxcor": 20},
    )
    return res


def fit_sum_law(
    n_params,
    n_tokens,
    loss,
    *,
    delta: float = 1e-3,
    grid: np.ndarray | None = None,
    n_bootstrap: int = 1000,
    level: float = 0.95,
    n_extra_starts: int = 4,
    seed: int = 0,
) -> SumLawFit:
    """Fit L(N, D) = E + A·N^(−α) + B·D^(−β) by Huber-robust LSE regression with bootstrap.

    Parameters
    ----------
    n_params : array_like, shape [n]
        Parameter counts N (> 0).
    n_tokens : array_like, shape [n]
        Data seen D (> 0): tokens for language models, atoms for force fields.
    loss : array_like, shape [n]
        Losses L (> 0), any unit (the fit is in log space).
    delta : float
        Huber threshold on log residuals (Hoffmann et al. 2022 use 1e-3).
    grid : ndarray, shape [S, 5], optional
        Start points (a, b, e, α, β); default :func:`default_grid`.
    n_bootstrap : int
        Bootstrap refits (0 to skip intervals).
    level : float
        Central probability of the percentile intervals.
    n_extra_starts : int
        Besides the full-data optimum, how many other distinct converged grid optima (best
        first) each bootstrap refit starts from.
    seed : int
        Seed of the bootstrap resampling.

    Returns
    -------
    SumLawFit

    Raises
    ------
    FitError
        Non-positive or non-finite inputs, fewer than 8 points or fewer than 3 distinct N or D.
        A fit that does not converge is *returned* with ``converged=False`` and no numbers.
    """
    n_arr, d_arr, l_arr = _check_inputs(n_params, n_tokens, loss)
    obj = _Objective(np.log(n_arr), np.log(d_arr), np.log(l_arr), delta)
    starts = default_grid() if grid is None else np.asarray(grid, dtype=float)
    res = batched_lbfgs(obj, obj.to_internal(starts))
    conv = res.converged & np.isfinite(res.f)
    n_conv = int(conv.sum())
    base = dict(n_points=n_arr.size, n_starts=len(starts), n_starts_converged=n_conv, delta=delta)
    if n_conv == 0:
        codes = np.unique(res.status)
        why = ", ".join(STATUS_TEXT[int(c)] for c in codes)
        return SumLawFit(False, f"no start of the L(N, D) fit converged ({why})", **base)
    order = np.flatnonzero(conv)[np.argsort(res.f[conv])]
    pol = _polish(obj, res.x[order[0]])
    u_best = pol.x if pol.fun <= res.f[order[0]] else res.x[order[0]]
    f_best = float(min(pol.fun, res.f[order[0]]))
    grad_ok = np.max(np.abs(obj(u_best[None, :], np.zeros(1, dtype=int))[1])) <= 1e-6 * (1 + f_best)
    if not (pol.success or grad_ok):
        return SumLawFit(False, f"L-BFGS-B polish of the best start failed: {pol.message}", **base)
    theta = obj.to_external(u_best)
    if theta[3] <= 0 or theta[4] <= 0:
        return SumLawFit(
            False,
            f"best fit has a non-positive exponent (alpha={theta[3]:.3g}, beta={theta[4]:.3g}): "
            "the data do not determine a decreasing law in both N and D",
            **base,
        )
    point = {k: float(v) for k, v in derived(theta).items()}
    # Distinct local optima of the grid, best first, as extra bootstrap starts.
    extra = []
    for i in order[1:]:
        cand = res.x[i]
        if all(np.max(np.abs(cand - o)) > 1e-3 for o in [u_best, *extra]):
            extra.append(cand)
        if len(extra) >= n_extra_starts:
            break
    boot = _bootstrap(obj, np.array([u_best, *extra]), n_bootstrap, seed)
    intervals = {}
    boot_info = {"n": n_bootstrap, "n_ok": 0, "level": level, "samples": np.zeros((0, 5))}
    if boot is not None:
        samples = obj.to_external(boot)
        dv = derived(samples)
        intervals = {k: summarize(dv[k], level) for k in point}
        boot_info.update(n_ok=len(samples), samples=samples)
    scipy_says = (pol.message if isinstance(pol.message, str) else pol.message.decode()).strip(" :") or "no message"
    if pol.success:
        how = f"best start polished by L-BFGS-B ({scipy_says})"
    else:  # e.g. scipy's bare "ABNORMAL": its line search found no further decrease
        how = (f"best start polished by L-BFGS-B until its line search found no further decrease (scipy: "
               f"{scipy_says}); the gradient there is within tolerance, so the optimum stands")
    return SumLawFit(
        True,
        f"converged: {n_conv}/{len(starts)} starts converged; {how}",
        params=point,
        intervals=intervals,
        objective=f_best,
        theta=theta,
        bootstrap=boot_info,
        **base,
    )


def _bootstrap(obj: _Objective, starts: np.ndarray, n_boot: int, seed: int, chunk: int = 2000):
    """Refit on resampled points; returns internal parameters [n_ok, 5] or None if n_boot == 0."""
    if n_boot <= 0:
        return None
    rng = np.random.default_rng(seed)
    n = obj.xn.size
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(float)  # [B, n]
    k = len(starts)
    best = np.full((n_boot, 5), np.nan)
    best_f = np.full(n_boot, np.inf)
    per_chunk = max(1, chunk // k)
    for lo in range(0, n_boot, per_chunk):
        hi = min(n_boot, lo + per_chunk)
        w = np.repeat(counts[lo:hi], k, axis=0)  # [(hi-lo)*k, n]
        x0 = np.tile(starts, (hi - lo, 1))
        bobj = _Objective.__new__(_Objective)
        bobj.__dict__.update(obj.__dict__)
        bobj.weights = w
        r = batched_lbfgs(bobj, x0)
        f = np.where(r.converged, r.f, np.inf).reshape(hi - lo, k)
        j = np.argmin(f, axis=1)
        fb = f[np.arange(hi - lo), j]
        xb = r.x.reshape(hi - lo, k, 5)[np.arange(hi - lo), j]
        best[lo:hi] = np.where(np.isfinite(fb)[:, None], xb, np.nan)
        best_f[lo:hi] = fb
    ok = np.isfinite(best_f)
    return best[ok]


def summary_dict(fit: SumLawFit) -> dict:
    """JSON-ready summary (see ``fit/README.md`` for the schema)."""
    out = {
        "converged": fit.converged,
        "message": fit.message,
        "n_points": fit.n_points,
        "objective": fit.objective if fit.converged else None,
        "huber_delta": fit.delta,
        "n_starts": fit.n_starts,
        "n_starts_converged": fit.n_starts_converged,
    }
    if fit.converged:
        out.update(fit.params)
        out["intervals"] = {k: iv.to_dict() for k, iv in fit.intervals.items()}
        out["bootstrap"] = {k: v for k, v in fit.bootstrap.items() if k != "samples"}
    return out


__all__ = ["FitError", "SumLawFit", "fit_sum_law", "default_grid", "derived", "summary_dict", "Interval"]
