"""Batched L-BFGS: many independent smooth minimisations advanced together in numpy.

The sum-law fit (``fit.sumlaw``) starts L-BFGS from a grid of ~4,500 points and refits ~1,000
bootstrap resamples. Running those one by one through ``scipy.optimize.minimize`` costs a Python
round trip per iteration per problem; here every problem keeps its own L-BFGS history, step and
stopping state, and one call of the user's objective evaluates all active problems at once.

The algorithm is the standard limited-memory BFGS two-loop recursion with a backtracking Armijo
line search (Nocedal & Wright, *Numerical Optimization*, 2nd ed., Algorithms 7.4 and 3.1), applied
row-wise. Problems do not interact: row ``s`` of the result is what a sequential L-BFGS with the
same settings would give from row ``s`` of ``x0``.
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


def _run(fun, x0, memory, max_iter, gtol, ftol, patience, max_backtracks, c1) -> BatchResult:
    x = np.array(x0, dtype=float, copy=True)
    if x.ndim != 2 or not np.all(np.isfinite(x)):
        raise ValueError(f"x0 must be a finite [S, P] array, got shape {x.shape}")
    n_prob, n_par = x.shape
    all_rows = np.arange(n_prob)
    f, g = fun(x, all_rows)
    f = np.array(f, dtype=float)
    g = np.array(g, dtype=float)
    status = np.full(n_prob, -1, dtype=int)
    status[~(np.isfinite(f) & np.all(np.isfinite(g), axis=1))] = NON_FINITE
    n_iter = np.zeros(n_prob, dtype=int)
    s_hist = np.zeros((memory, n_prob, n_par))  # [m, S, P]
    y_hist = np.zeros((memory, n_prob, n_par))  # [m, S, P]
    rho = np.zeros((memory, n_prob))  # [m, S]; 0 marks an empty slot
    n_pairs = np.zeros(n_prob, dtype=int)  # pairs stored so far (ring position = n_pairs % m)
    small_steps = np.zeros(n_prob, dtype=int)

    for _ in range(max_iter):
        gmax = np.max(np.abs(g), axis=1)
        done_g = (status < 0) & (gmax <= gtol * (1.0 + np.abs(f)))
        status[done_g] = CONVERGED_GRAD
        act = np.flatnonzero(status < 0)
        if act.size == 0:
            break
        ga = g[act]  # [k, P]
        # Two-loop recursion over the ring buffer, newest pair first.
        q = ga.copy()
        alphas = np.zeros((memory, act.size))
        newest = (n_pairs[act] - 1) % memory  # [k]
        for j in range(memory):
            slot = (newest - j) % memory  # [k]
            s_j = s_hist[slot, act]  # [k, P]
            y_j = y_hist[slot, act]
            r_j = rho[slot, act] * (j < n_pairs[act])  # [k]
            a_j = r_j * np.einsum("kp,kp->k", s_j, q)
            q -= a_j[:, None] * y_j
            alphas[j] = a_j
        has = n_pairs[act] > 0
        last = newest
        s_l = s_hist[last, act]
        y_l = y_hist[last, act]
        yy = np.einsum("kp,kp->k", y_l, y_l)
        sy = np.einsum("kp,kp->k", s_l, y_l)
        gamma = np.where(has & (yy > 0), sy / np.where(yy > 0, yy, 1.0), 0.0)
        first = ~has | (gamma <= 0)
        gnorm = np.linalg.norm(ga, axis=1)
        gamma = np.where(first, 1.0 / np.maximum(gnorm, 1e-300), gamma)
        r = gamma[:, None] * q
        for j in reversed(range(memory)):
            slot = (newest - j) % memory
            s_j = s_hist[slot, act]
            y_j = y_hist[slot, act]
            r_j = rho[slot, act] * (j < n_pairs[act])
            b_j = r_j * np.einsum("kp,kp->k", y_j, r)
            r += (alphas[j] - b_j)[:, None] * s_j
        d = -r  # [k, P]
        slope = np.einsum("kp,kp->k", ga, d)
        bad = ~(slope < 0) | ~np.all(np.isfinite(d), axis=1)
        if np.any(bad):  # lost descent: restart from steepest descent with a fresh memory
            d[bad] = -ga[bad] / np.maximum(gnorm[bad], 1e-300)[:, None]
            slope[bad] = -gnorm[bad]
            rho[:, act[bad]] = 0.0
            n_pairs[act[bad]] = 0
        # Backtracking Armijo line search, all problems in step.
        step = np.ones(act.size)
        accepted = np.zeros(act.size, dtype=bool)
        f_new = np.empty(act.size)
        g_new = np.empty((act.size, n_par))
        for _bt in range(max_backtracks):
            todo = np.flatnonzero(~accepted)
            if todo.size == 0:
                break
            rows = act[todo]
            x_try = x[rows] + step[todo, None] * d[todo]
            f_try, g_try = fun(x_try, rows)
            ok = np.isfinite(f_try) & np.all(np.isfinite(g_try), axis=1)
            ok &= f_try <= f[rows] + c1 * step[todo] * slope[todo]
            acc = todo[ok]
            f_new[acc] = f_try[ok]
            g_new[acc] = g_try[ok]
            accepted[acc] = True
            step[todo[~ok]] *= 0.5
        failed = act[~accepted]
        status[failed] = LINE_SEARCH_FAILED
        okrows = np.flatnonzero(accepted)
        rows = act[okrows]
        s_new = step[okrows, None] * d[okrows]
        y_new = g_new[okrows] - g[rows]
        sy = np.einsum("kp,kp->k", s_new, y_new)
        keep = sy > 1e-12 * np.linalg.norm(s_new, axis=1) * np.linalg.norm(y_new, axis=1)
        kr = rows[keep]
        slot = n_pairs[kr] % memory
        s_hist[slot, kr] = s_new[keep]
        y_hist[slot, kr] = y_new[keep]
        rho[slot, kr] = 1.0 / sy[keep]
        n_pairs[kr] += 1
        decrease = f[rows] - f_new[okrows]
        tiny = decrease <= ftol * np.abs(f[rows])
        small_steps[rows] = np.where(tiny, small_steps[rows] + 1, 0)
        x[rows] = x[rows] + s_new
        f[rows] = f_new[okrows]
        g[rows] = g_new[okrows]
        n_iter[act] += 1
        status[rows[small_steps[rows] >= patience]] = CONVERGED_F
    status[status < 0] = MAX_ITER
    return BatchResult(x=x, f=f, grad=g, status=status, n_iter=n_iter)
