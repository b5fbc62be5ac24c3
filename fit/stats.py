"""Bootstrap summaries: standard error and percentile interval of a sample of estimates."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    """Bootstrap summary of one estimated quantity.

    Attributes
    ----------
    se : float
        Standard deviation of the bootstrap estimates (the bootstrap standard error).
    lo, hi : float
        Percentile interval (Efron & Tibshirani 1993, §13.3) at central probability ``level``.
    level : float
    n : int
        Number of finite bootstrap estimates used.
    """

    se: float
    lo: float
    hi: float
    level: float
    n: int

    def contains(self, value: float) -> bool:
        """True when ``lo <= value <= hi``."""
        return bool(self.lo <= value <= self.hi)

    def to_dict(self) -> dict:
        return {"se": self.se, "lo": self.lo, "hi": self.hi, "level": self.level, "n": self.n}


def summarize(samples, level: float = 0.95) -> Interval:
    """Standard error and percentile interval of bootstrap estimates.

    Parameters
    ----------
    samples : array_like, shape [B]
        Bootstrap estimates; non-finite entries are dropped (and counted out of ``n``).
    level : float
        Central probability of the interval, in (0, 1).

    Returns
    -------
    Interval
        NaN fields when fewer than 2 finite samples remain.

    Raises
    ------
    ValueError
        If ``level`` is not in (0, 1).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"interval level must be in (0, 1), got {level}")
    x = np.asarray(samples, dtype=float).ravel()
    x = x[np.isfinite(x)]
    if x.size < 2:
        return Interval(float("nan"), float("nan"), float("nan"), level, int(x.size))
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(x, [tail, 100.0 - tail])
    return Interval(float(np.std(x, ddof=1)), float(lo), float(hi), level, int(x.size))
