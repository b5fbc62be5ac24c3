"""Per-step FLOPs for the launcher at < 1 % of the run's time: :class:`StepFlopCounter`.

An exact count (:func:`zoo.flops.trace.count_step`) traces the model once — comparable to a forward
pass, far too slow for every step. For a fixed model, every operator's FLOPs is a product of
fixed widths and *one* batch-dependent size (atoms, edges, structures, or a derived count such
as GemNet-OC's triplets and quadruplets), so a step's FLOPs is a linear function of those sizes.
The counter

1. counts exactly the first ``min_exact`` batches with distinct sizes — 4 for the exact
   features below, features + 2 for the approximate ones — (and any batch whose sizes it has
   counted before is answered from a cache),
2. then fits ``flops ≈ θ · x`` by least squares on the exact counts, with features
   ``x = (1, B, N, E)`` (structures, atoms, edges: exact for MPNN, MC-EGNN and eSEN, whose every
   operator scales with one of them), and, for a model with several graph cutoffs
   (``model.graph_cutoffs``, GemNet-OC), per cutoff the edges, ``Σ_i d_i²`` and
   ``Σ_(j→i) d_i d_j`` (``d_i`` atom i's degree), proxies of its triplet and quadruplet sets —
   approximate, as its neighbour limits make those sets non-linear in any cheap feature,
3. keeps verifying: whenever the time spent counting is below ``budget`` (default 0.5 %) of the
   wall time since the first call, the next new batch is counted exactly, its fit error
   recorded (:attr:`StepFlopCounter.max_fit_error`), the exact value returned and the fit redone.

Each phase (forward, force backward, backward, loss, matmul) is fitted separately.
"""

from __future__ import annotations

import time

import numpy as np
from torch import nn

from datapipe import keys

_PHASES = ("forward", "force_backward", "backward", "loss", "matmul_step")


def batch_features(batch, cutoffs: tuple[float, ...], geometric: bool = True) -> np.ndarray:
    """Size features of ``batch`` for the linear fit.

    ``[1, B, N, E]`` with ``E`` the batch's edges. With ``geometric`` (models with several graph
    cutoffs, Å, or batches holding edges beyond the model's cutoff) then, for each cutoff,
    ``[E_c, Σ_i d_i², Σ_(j→i) d_i d_j]`` over the edges shorter than it, ``d_i`` being atom i's
    in-degree (proxies of 3- and 4-body index sets). The batch's edges must reach the largest
    cutoff.
    """
    edge_index = batch[keys.EDGE_INDEX]
    n = int(batch[keys.POSITIONS].shape[0])
    features = [1.0, float(batch.num_graphs), float(n), float(edge_index.shape[1])]
    if not geometric:
        return np.array(features)
    positions = batch[keys.POSITIONS].detach().cpu().numpy()
    edge_index = edge_index.cpu().numpy()
    delta = positions[edge_index[0]] - positions[edge_index[1]]  # [E, 3]
    squared = np.einsum("ij,ij->i", delta, delta)  # [E]
    for cutoff in cutoffs:
        edges = edge_index[:, squared < cutoff * cutoff]
        degree = np.bincount(edges[1], minlength=n).astype(np.float64)  # [N]
        features += [float(edges.shape[1]), float(degree @ degree), float(degree[edges[0]] @ degree[edges[1]])]
    return np.array(features)


class StepFlopCounter:
    """FLOPs of each training step, cheap enough to call on every step.

    Parameters
    ----------
    model : the :class:`~zoo.models.base.ForceField` being trained (unwrapped; not the engine).
    direct_forces : defaults to ``model.direct_forces``.
    budget : largest share of wall time spent in exact counts once the fit is ready.
    min_exact : exact counts before the fit is used (default: number of features + 2).
    materialise : for a ``model`` on the meta device (a shape-only trace, no memory): a callable
        returning a real copy, used instead from the first batch whose trace needs tensor values
        (a forward with ``.item()``/``nonzero``, e.g. GemNet-OC's triplets). Without it such a
        batch raises.

    Attributes
    ----------
    exact_counts : number of traced counts so far. seconds : time spent in this counter.
    max_fit_error : largest relative error of the fit on a later exact count (``nan`` until one).
    last : the last :class:`~zoo.flops.trace.StepFlops` counted exactly.

    Examples
    --------
    >>> from datapipe.graph import batch_from_atoms
    >>> from zoo.flops.trace import count_step
    >>> from zoo.registry import build
    >>> from zoo.testing import water_cluster
    >>> model = build("mpnn", width=16)
    >>> counter = StepFlopCounter(model, budget=0.0)          # no exact count once the fit is ready
    >>> loader = [batch_from_atoms([water_cluster(n, seed=n)], cutoff=model.data_cutoff) for n in range(2, 12)]
    >>> for batch in loader:
    ...     flops = counter.step_flops(batch)       # int, FLOPs of this step (FMA = 2)
    >>> counter.exact_counts == counter.min_exact < len(loader)
    True
    >>> abs(flops / count_step(model, batch).total - 1) < 0.01   # the fit's count of the last step
    True
    """

    def __init__(self, model: nn.Module, direct_forces: bool | None = None, *, budget: float = 0.005,
                 min_exact: int | None = None, materialise=None) -> None:
        self.model = model
        self.materialise = materialise
        self.direct_forces = model.direct_forces if direct_forces is None else bool(direct_forces)
        self.budget = float(budget)
        self.cutoffs = tuple(sorted(set(model.graph_cutoffs) | {float(model.cutoff)}))
        # one cutoff and every edge within it: FLOPs are exactly linear in (1, B, N, E) (verified
        # for MPNN, MC-EGNN, eSEN); switched to geometric features if a batch has longer edges
        self.geometric = len(self.cutoffs) > 1
        self._min_exact = min_exact
        self._x: list[np.ndarray] = []
        self._y: list[np.ndarray] = []
        self._cache: dict[tuple, np.ndarray] = {}
        self._theta: np.ndarray | None = None
        self._start: float | None = None
        self.seconds = 0.0
        self.exact_counts = 0
        self.fit_errors: list[float] = []
        self.last = None

    @property
    def min_exact(self) -> int:
        """Exact counts before the fit is used, unless given: one per feature where the fit is
        exact (``(1, B, N, E)``: MPNN, MC-EGNN, eSEN — verified on held-out batches in
        ``tests/zoo/test_flops.py``), features + 2 where it is approximate (GemNet-OC's proxies)."""
        if self._min_exact is not None:
            return int(self._min_exact)
        return 4 + 3 * len(self.cutoffs) + 2 if self.geometric else 4

    @property
    def max_fit_error(self) -> float:
        return max(self.fit_errors) if self.fit_errors else float("nan")

    # ------------------------------------------------------------------------------------------
    def exact(self, batch):
        """Count ``batch`` exactly (trace); updates the fit. Returns a :class:`~zoo.flops.trace.StepFlops`."""
        from zoo.flops.trace import count_step

        try:
            flops = count_step(self.model, batch, self.direct_forces)
        except (RuntimeError, NotImplementedError):
            if self.materialise is None or not next(self.model.parameters()).is_meta:
                raise
            self.model, self.materialise = self.materialise(), None  # the forward needs values
            flops = count_step(self.model, batch, self.direct_forces)
        self.exact_counts += 1
        self.last = flops
        if flops.unsupported:
            raise RuntimeError(f"operators without a FLOP handle: {flops.unsupported}")
        if not self.geometric and flops.edges != int(batch[keys.EDGE_INDEX].shape[1]):
            # the batch holds edges beyond the model's cutoff: restart the fit on geometric features
            self.geometric = True
            self._x, self._y, self._cache, self._theta = [], [], {}, None
        return flops

    def breakdown(self, batch) -> dict[str, int]:
        """Phase FLOPs ``{forward, force_backward, backward, loss, matmul_step, total}`` of ``batch``."""
        started = time.perf_counter()
        if self._start is None:
            self._start = started
        x = batch_features(batch, self.cutoffs, self.geometric)
        key = tuple(x.tolist())
        if key in self._cache:
            y = self._cache[key]
        elif self._theta is None or self._can_afford(started) or not self._in_span(x):
            predicted = None if self._theta is None else x @ self._theta
            flops = self.exact(batch)
            x = batch_features(batch, self.cutoffs, self.geometric)  # may have switched
            key = tuple(x.tolist())
            y = np.array([float(getattr(flops, p)) for p in _PHASES])
            if predicted is not None:
                total, guess = y[:4].sum(), predicted[:4].sum()
                self.fit_errors.append(abs(guess - total) / max(total, 1.0))
            self._cache[key] = y
            self._x.append(x)
            self._y.append(y)
            if len(self._x) >= self.min_exact:
                design = np.stack(self._x)
                self._theta = np.linalg.lstsq(design, np.stack(self._y), rcond=None)[0]
                # rows spanning the sizes seen: a batch outside their span (e.g. a new structure
                # count when all earlier batches had one) is not determined by the fit
                _, sv, vt = np.linalg.svd(design, full_matrices=False)
                self._span = vt[sv > sv[0] * 1e-10]
        else:
            y = np.maximum(x @ self._theta, 0.0)
        self.seconds += time.perf_counter() - started
        out = {p: int(round(v)) for p, v in zip(_PHASES, y)}
        out["total"] = out["forward"] + out["force_backward"] + out["backward"] + out["loss"]
        return out

    def _in_span(self, x: np.ndarray) -> bool:
        """Is ``x`` a combination of the exactly counted sizes (so the fit determines its FLOPs)?"""
        residual = x - self._span.T @ (self._span @ x)
        return float(np.abs(residual).max()) <= 1e-9 * max(float(np.abs(x).max()), 1.0)

    def step_flops(self, batch) -> int:
        """FLOPs of one training step (forward + loss + backward) on ``batch``, FMA = 2."""
        return self.breakdown(batch)["total"]

    def overhead(self) -> float:
        """Share of the wall time since the first call spent counting."""
        if self._start is None:
            return 0.0
        return self.seconds / max(time.perf_counter() - self._start, 1e-9)

    def _can_afford(self, now: float) -> bool:
        """Would one more exact count keep the counting share of wall time within the budget?"""
        expected = self.seconds / max(self.exact_counts, 1)
        return self.seconds + expected <= self.budget * (now - self._start + expected)
