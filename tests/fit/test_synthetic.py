"""Recovery of known laws from synthetic data, and the closed-form allocation."""

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from fit.allocation import optimal_allocation
from fit.frontier import fit_frontier, frontier_owners
from fit.optim import CONVERGED_GRAD, MAX_ITER, batched_lbfgs
from fit.sumlaw import default_grid, derived, fit_sum_law, summary_dict

TRUTH = {"E": 1.5, "A": 400.0, "B": 1500.0, "alpha": 0.35, "beta": 0.30}


def _sample(rng, n=80, noise=0.01):
    logn = rng.uniform(np.log(1e7), np.log(1e10), n)
    logd = rng.uniform(np.log(1e9), np.log(1e12), n)
    lo = TRUTH["E"] + TRUTH["A"] * np.exp(-TRUTH["alpha"] * logn) + TRUTH["B"] * np.exp(-TRUTH["beta"] * logd)
    return np.exp(logn), np.exp(logd), lo * np.exp(noise * rng.standard_normal(n))


def _small_grid():
    g = default_grid()
    return g[(g[:, 3] % 1 == 0.5) & (g[:, 4] % 1 == 0.5) & (g[:, 2] != 0.5) & (g[:, 2] != -0.5)]


@pytest.mark.slow  # 10 fits × 100 bootstraps
def test_sum_law_recovers_truth_within_intervals():
    """Over 10 noisy datasets the 95% intervals of α, β, E should cover the truth most times."""
    rng = np.random.default_rng(1)
    hits = {k: 0 for k in ("alpha", "beta", "E")}
    reps = 10
    for rep in range(reps):
        n, d, lo = _sample(rng)
        fit = fit_sum_law(n, d, lo, grid=_small_grid(), n_bootstrap=100, seed=rep)
        assert fit.converged, fit.message
        for k in hits:
            hits[k] += fit.intervals[k].contains(TRUTH[k])
    # Nominal 95%; with 100 bootstraps and 10 reps, ≥ 7 of 10 has a tiny chance to fail by luck.
    for k, h in hits.items():
        assert h >= 7, (k, h, hits)


def test_sum_law_noiseless_exact():
    rng = np.random.default_rng(2)
    n, d, lo = _sample(rng, n=40, noise=0.0)
    fit = fit_sum_law(n, d, lo, n_bootstrap=0)
    assert fit.converged
    for k, v in TRUTH.items():
        assert fit.params[k] == pytest.approx(v, rel=2e-3), k
    assert fit.objective < 1e-10


def test_frontier_recovers_power_law_and_owners():
    rng = np.random.default_rng(3)
    c = np.geomspace(1e15, 1e19, 40)
    lo = 30.0 * c**-0.2
    # Dominated checkpoints above the frontier must not be owners.
    c_all = np.concatenate([c, c * 1.01])
    l_all = np.concatenate([lo, lo * (1.05 + 0.1 * rng.random(40))])
    own = frontier_owners(c_all, l_all)
    assert set(own.tolist()) == set(range(40))
    f = fit_frontier(c_all, l_all, n_bootstrap=50)
    assert f.params["gamma_c"] == pytest.approx(0.2, rel=1e-9)
    assert f.params["F_c"] == pytest.approx(30.0, rel=1e-8)
    f2 = fit_frontier(c, 0.01 + lo, l_inf_free=True, n_bootstrap=0)
    assert f2.params["L_inf"] == pytest.approx(0.01, rel=1e-4)
    assert f2.params["gamma_c"] == pytest.approx(0.2, rel=1e-4)
    fw = fit_frontier(c, lo, c_min=1e16, c_max=1e18, n_bootstrap=0)
    assert fw.n_points == int(np.sum((c >= 1e16) & (c <= 1e18)))


def test_allocation_matches_numerical_optimum():
    th = np.array([np.log(TRUTH["A"]), np.log(TRUTH["B"]), np.log(TRUTH["E"]), TRUTH["alpha"], TRUTH["beta"]])
    k, c = 6.0, 1e22
    res = optimal_allocation(th, [c], k)

    def loss_at(logn):
        n = np.exp(logn)
        return TRUTH["A"] * n ** -TRUTH["alpha"] + TRUTH["B"] * (c / (k * n)) ** -TRUTH["beta"]

    best = minimize_scalar(loss_at, bounds=(np.log(1e6), np.log(1e14)), method="bounded", options={"xatol": 1e-10})
    assert res["N_opt"][0] == pytest.approx(np.exp(best.x), rel=1e-5)
    assert res["N_opt"][0] * res["D_opt"][0] * k == pytest.approx(c)
    dv = derived(th)
    assert dv["a"] + dv["b"] == pytest.approx(1.0)
    assert dv["gamma_c"] == pytest.approx(0.35 * 0.30 / 0.65)


def test_batched_lbfgs_matches_rosenbrock_minimum():
    def fun(x, rows):
        f = 100 * (x[:, 1] - x[:, 0] ** 2) ** 2 + (1 - x[:, 0]) ** 2
        g = np.stack([-400 * x[:, 0] * (x[:, 1] - x[:, 0] ** 2) - 2 * (1 - x[:, 0]), 200 * (x[:, 1] - x[:, 0] ** 2)], 1)
        return f, g

    x0 = np.random.default_rng(0).uniform(-2, 2, (50, 2))
    r = batched_lbfgs(fun, x0, gtol=1e-10)
    assert np.all(r.converged)
    np.testing.assert_allclose(r.x, 1.0, atol=1e-5)


def test_batched_lbfgs_rows_are_independent_problems():
    """Each row ends where the same L-BFGS from that row alone ends, bit for bit, whichever other
    problems share the batch and whenever they stop (the batch drops finished problems as it goes)."""
    def fun(x, rows):  # Rosenbrock, elementwise: a row's value does not depend on the other rows
        f = 100 * (x[:, 1] - x[:, 0] ** 2) ** 2 + (1 - x[:, 0]) ** 2
        g = np.stack([-400 * x[:, 0] * (x[:, 1] - x[:, 0] ** 2) - 2 * (1 - x[:, 0]), 200 * (x[:, 1] - x[:, 0] ** 2)], 1)
        return f, g

    x0 = np.random.default_rng(5).uniform(-3, 3, (40, 2))
    x0[0] = 1.0  # at the minimum: stops on the gradient before the first step
    for settings in ({"gtol": 1e-10}, {"max_iter": 25, "memory": 3}):
        together = batched_lbfgs(fun, x0, **settings)
        alone = [batched_lbfgs(fun, x0[i:i + 1], **settings) for i in range(len(x0))]
        for name in ("x", "f", "grad", "status", "n_iter"):
            np.testing.assert_array_equal(getattr(together, name), np.concatenate([getattr(a, name) for a in alone]))
        assert together.n_iter[0] == 0 and len(set(together.n_iter.tolist())) >= 4  # stops at many iterations
    assert set(together.status.tolist()) == {CONVERGED_GRAD, MAX_ITER}  # the short runs: some stop, most run out


def test_non_converged_fit_reports_no_numbers():
    rng = np.random.default_rng(4)
    n, d, lo = _sample(rng, n=30)
    # Loss growing with N and D: no decreasing law fits; the best start has α, β ≤ 0.
    fit = fit_sum_law(n, d, 1.0 / lo, grid=_small_grid(), n_bootstrap=0)
    assert not fit.converged
    s = summary_dict(fit)
    assert s["objective"] is None and "alpha" not in s and s["message"]


def test_allocation_loss_is_finite_when_the_n_term_vanishes():
    """A fit like the cpu study's GemNet-OC one: α ≈ 70, log A in the hundreds or more (A overflows, N^(−α) underflows).

    The loss along the compute-optimal path must be the finite limit E + B·D^(−β) (+ a vanishing
    N-term), not inf·0 = NaN, in the point estimate and in every bootstrap row.
    """
    th = np.array([[1580.0, 2.2, np.log(0.02), 70.7, 0.283], [1200.0, 2.0, np.log(0.03), 55.0, 0.25]])
    res = optimal_allocation(th, [2.4e10, 2.1e11], 139.4)
    assert np.all(np.isfinite(res["L_opt"])), res["L_opt"]
    e, b, beta = np.exp(th[:, 2:3]), np.exp(th[:, 1:2]), th[:, 4:5]
    n_term = np.exp(th[:, 0:1] - th[:, 3:4] * np.log(res["N_opt"]))
    np.testing.assert_allclose(res["L_opt"], e + n_term + b * res["D_opt"] ** (-beta), rtol=1e-12)
    assert np.all(res["L_opt"] > e)
