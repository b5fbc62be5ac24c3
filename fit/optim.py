"""Batched L-BFGS: many independent smooth minimisations advanced together in numpy.

The sum-law fit (``fit.sumlaw``) starts L-BFGS from a grid of ~4,500 points and refits ~1,000
bootstrap resamples. Running those one by one through ``scipy.optimize.minimize`` costs a Python
round trip per iteration per problem; here every problem keeps its own L-BFGS history, step and
stopping state, and one call of the user's objective evaluates all active problems at once.

The algorithm is the standard limited-memory BFGS two-loop recursion with a backtracking Armijo
line search (Nocedal & Wright, *Numerical Optimization*, 2nd ed., Algorithms 7.4 and 3.1), applied
row-wise. Problems do not interact: row ``s`` of the result is what a sequential L-BFGS with the
same settings would give from row ``s`` of ``x0`` (bit for bit where the objective's row ``s`` does
not depend on the other rows it is evaluated with).

Speed: the problems still running are kept compacted (finished ones are written back and dropped),
and each one's history is stored newest first, so an iteration reads contiguous [k, P] blocks rather
than gathering every history slot of every running problem. Typically hundreds of the 4,500
sum-law starts run to the iteration limit, so the late iterations, over few problems, dominate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

ObjectiveGrad = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]

# Termination codes stored in BatchResult.status.
CONVERGED_GRAD = 0  # max |gradient| below gtol * (1 + |f|)
CONVERGED_F = 1  # relative decrease of f below ftol for `patience` consecutive iterations
MAX_ITER = 2  # iteration limit reached: not converged
LINE_SEARCH_FAILED = 3  # no Armijo step found along a descent direction: not converged
NON_FINITE = 4  # objective or gradient became NaN/inf: not converged

STATUS_TEXT = {
    CONVERGED_GRAD: "converged (gradient)",
    CONVERGED_F: "converged (objective change)",
    MAX_ITER: "iteration limit reached",
    LINE_SEARCH_FAILED: "line search failed",
    NON_FINITE: "non-finite objective or gradient",
}


@dataclass
class BatchResult:
    """Outcome of :func:`batched_lbfgs`.

    Attributes
    ----------
    x : ndarray, shape [S, P]
        Final points.
    f : ndarray, shape [S]
        Objective at ``x``.
    grad : ndarray, shape [S, P]
        Gradient at ``x``.
    status : ndarray of int, shape [S]
        One of the module's termination codes.
    n_iter : ndarray of int, shape [S]
        Iterations used by each problem.
    """

    x: np.ndarray
    f: np.ndarray
    grad: np.ndarray
    status: np.ndarray
    n_iter: np.ndarray

    @property
    def converged(self) -> np.ndarray:
        """Boolean mask [S]: the problem stopped on a convergence criterion."""
        return self.status <= CONVERGED_F


def batched_lbfgs(
    fun: ObjectiveGrad,
    x0: np.ndarray,
    *,
    memory: int = 10,
    max_iter: int = 1000,
    gtol: float = 1e-9,
    ftol: float = 1e-11,
    patience: int = 3,
    max_backtracks: int = 40,
    c1: float = 1e-4,
) -> BatchResult:
    """Minimise S independent functions of P variables with L-BFGS, vectorised over problems.

    Parameters
    ----------
    fun : callable
        ``fun(x, rows) -> (f, g)`` with ``x`` of shape [k, P] holding the current points of the
        problems whose indices are ``rows`` (shape [k], into the S problems); returns the
        objective values [k] and gradients [k, P]. The row indices let a problem-specific
        objective (e.g. bootstrap weights) select its own data.
    x0 : ndarray, shape [S, P]
        Starting points.
    memory : int
        Number of (s, y) pairs kept per problem.
    max_iter : int
        Iteration limit per problem.
    gtol : float
        Stop when ``max|g| <= gtol * (1 + |f|)``.
    ftol : float
        Stop when ``(f_k - f_{k+1}) <= ftol * |f_k|`` for ``patience`` consecutive iterations
        (relative to ``|f|`` itself, not to ``max(|f|, 1)`` as scipy does: small summed robust
        losses would otherwise stop early, the failure Besiroglu et al. 2024 diagnose in
        Hoffmann et al. 2022).
    patience : int
        See ``ftol``.
    max_backtracks : int
        Step halvings tried in the Armijo line search before declaring failure.
    c1 : float
        Armijo sufficient-decrease constant.

    Returns
    -------
    BatchResult

    Raises
    ------
    ValueError
        If ``x0`` is not a finite 2-D array.
    """
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return _run(fun, x0, memory, max_iter, gtol, ftol, patience, max_backtracks, c1)


class _Active:
    """The state of the problems still running, compacted: row i of every array is problem ``rows[i]``.

    The L-BFGS history is stored newest first (``s[0]`` is the latest pair) rather than in a ring
    indexed per problem, so that the two-loop recursion reads contiguous [k, P] blocks instead of
    gathering them; retiring finished problems copies the arrays once, when some finish.
    """

    def __init__(self, rows, x, f, g, memory):
        k, n_par = len(rows), x.shape[1]
        self.rows = rows  # [k] indices into the S problems
        self.x, self.f, self.g = x, f, g  # [k, P], [k], [k, P]
        self.s = np.zeros((memory, k, n_par))  # [m, k, P] steps, newest first
        self.y = np.zeros((memory, k, n_par))  # [m, k, P] gradient changes, newest first
        self.rho = np.zeros((memory, k))  # [m, k] 1 / (s·y)
        self.n_pairs = np.zeros(k, dtype=int)  # pairs stored since the last restart
        self.small_steps = np.zeros(k, dtype=int)

    def keep(self, mask):
        """Drop the rows where ``mask`` is False."""
        for name in ("rows", "x", "f", "g", "n_pairs", "small_steps"):
            setattr(self, name, getattr(self, name)[mask])
        for name in ("s", "y", "rho"):
            setattr(self, name, getattr(self, name)[:, mask])

    def push(self, rows, s_new, y_new, rho_new):
        """Store one new pair for the problems ``rows`` (compact indices); the oldest falls out."""
        # Shift every problem's history (one contiguous copy), then put back the few that store
        # nothing this iteration: cheaper than gathering the many that do.
        unchanged = np.ones(self.rows.size, dtype=bool)
        unchanged[rows] = False
        for hist, new in ((self.s, s_new), (self.y, y_new), (self.rho, rho_new)):
            before = hist[:, unchanged]
            hist[1:] = hist[:-1]
            hist[0, rows] = new
            hist[:, unchanged] = before
        self.n_pairs[rows] += 1


def _run(fun, x0, memory, max_iter, gtol, ftol, patience, max_backtracks, c1) -> BatchResult:
    x = np.array(x0, dtype=float, copy=True)
    if x.ndim != 2 or not np.all(np.isfinite(x)):
        raise ValueError(f"x0 must be a finite [S, P] array, got shape {x.shape}")
    n_prob, n_par = x.shape
    f, g = fun(x, np.arange(n_prob))
    f = np.array(f, dtype=float)
    g = np.array(g, dtype=float)
    status = np.full(n_prob, -1, dtype=int)
    status[~(np.isfinite(f) & np.all(np.isfinite(g), axis=1))] = NON_FINITE
    n_iter = np.zeros(n_prob, dtype=int)
    live = np.flatnonzero(status < 0)
    a = _Active(live, x[live], f[live], g[live], memory)

    def retire(mask, code, iterations):
        """Write the problems of compact rows ``mask`` back with their status; drop them."""
        rows = a.rows[mask]
        x[rows], f[rows], g[rows] = a.x[mask], a.f[mask], a.g[mask]
        status[rows], n_iter[rows] = code, iterations
        a.keep(~mask)

    for it in range(max_iter):
        done_g = np.max(np.abs(a.g), axis=1) <= gtol * (1.0 + np.abs(a.f))
        if np.any(done_g):
            retire(done_g, CONVERGED_GRAD, it)
        k = a.rows.size
        if k == 0:
            break
        ga = a.g  # [k, P]
        # Two-loop recursion, newest pair first; pairs j >= n_pairs are weighted 0.
        r_w = [a.rho[j] * (j < a.n_pairs) for j in range(memory)]  # m × [k]
        q = ga.copy()
        alphas = np.zeros((memory, k))
        for j in range(memory):
            a_j = r_w[j] * np.einsum("kp,kp->k", a.s[j], q)
            q -= a_j[:, None] * a.y[j]
            alphas[j] = a_j
        has = a.n_pairs > 0
        yy = np.einsum("kp,kp->k", a.y[0], a.y[0])
        sy = np.einsum("kp,kp->k", a.s[0], a.y[0])
        gamma = np.where(has & (yy > 0), sy / np.where(yy > 0, yy, 1.0), 0.0)
        first = ~has | (gamma <= 0)
        gnorm = np.linalg.norm(ga, axis=1)
        gamma = np.where(first, 1.0 / np.maximum(gnorm, 1e-300), gamma)
        r = gamma[:, None] * q
        for j in reversed(range(memory)):
            b_j = r_w[j] * np.einsum("kp,kp->k", a.y[j], r)
            r += (alphas[j] - b_j)[:, None] * a.s[j]
        d = -r  # [k, P]
        slope = np.einsum("kp,kp->k", ga, d)
        bad = ~(slope < 0) | ~np.all(np.isfinite(d), axis=1)
        if np.any(bad):  # lost descent: restart from steepest descent with a fresh memory
            d[bad] = -ga[bad] / np.maximum(gnorm[bad], 1e-300)[:, None]
            slope[bad] = -gnorm[bad]
            a.rho[:, bad] = 0.0
            a.n_pairs[bad] = 0
        # Backtracking Armijo line search, all problems in step.
        step = np.ones(k)
        accepted = np.zeros(k, dtype=bool)
        f_new = np.empty(k)
        g_new = np.empty((k, n_par))
        for _bt in range(max_backtracks):
            todo = np.flatnonzero(~accepted)
            if todo.size == 0:
                break
            if todo.size == k:  # the first try: every problem, no gathers
                f_try, g_try = fun(a.x + step[:, None] * d, a.rows)
                f_ref = a.f + c1 * step * slope
            else:
                f_try, g_try = fun(a.x[todo] + step[todo, None] * d[todo], a.rows[todo])
                f_ref = a.f[todo] + c1 * step[todo] * slope[todo]
            ok = np.isfinite(f_try) & np.all(np.isfinite(g_try), axis=1)
            ok &= f_try <= f_ref
            acc = todo[ok]
            f_new[acc] = f_try[ok]
            g_new[acc] = g_try[ok]
            accepted[acc] = True
            step[todo[~ok]] *= 0.5
        okrows = np.flatnonzero(accepted)
        s_new = step[okrows, None] * d[okrows]
        y_new = g_new[okrows] - ga[okrows]
        sy = np.einsum("kp,kp->k", s_new, y_new)
        keep = sy > 1e-12 * np.linalg.norm(s_new, axis=1) * np.linalg.norm(y_new, axis=1)
        a.push(okrows[keep], s_new[keep], y_new[keep], 1.0 / sy[keep])
        decrease = a.f[okrows] - f_new[okrows]
        tiny = decrease <= ftol * np.abs(a.f[okrows])
        a.small_steps[okrows] = np.where(tiny, a.small_steps[okrows] + 1, 0)
        a.x[okrows] = a.x[okrows] + s_new
        a.f[okrows] = f_new[okrows]
        a.g[okrows] = g_new[okrows]
        if okrows.size < k:
            retire(~accepted, LINE_SEARCH_FAILED, it + 1)
        done_f = a.small_steps >= patience
        if np.any(done_f):
            retire(done_f, CONVERGED_F, it + 1)
    retire(np.ones(a.rows.size, dtype=bool), MAX_ITER, max_iter)
    return BatchResult(x=x, f=f, grad=g, status=status, n_iter=n_iter)
