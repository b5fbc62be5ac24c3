"""Building blocks shared by the zoo's architectures (radial bases, envelopes, embeddings).

Radial bases and envelopes are fp32 islands (:func:`zoo.models.precision.fp32_island`): under bf16
they take and return at least fp32 tensors.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from zoo.models.precision import fp32_island


def gather(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``values[index]`` ``[len(index), ...]`` of ``values`` ``[N, ...]`` (``index`` int64 ``[M]``).

    ``index_select`` rather than advanced indexing: the same values, and on CPU a backward that is
    one ``index_add`` instead of the much slower accumulating ``index_put``.
    """
    return values.index_select(0, index)


def scatter_sum(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Sum rows of ``values`` ``[E, ...]`` into ``size`` bins given by ``index`` ``[E]``.

    Returns ``[size, ...]``. Deterministic on CPU; uses ``index_add`` (counted by our FLOP
    counter as one add per element).
    """
    out = torch.zeros((size, *values.shape[1:]), dtype=values.dtype, device=values.device)
    return out.index_add(0, index, values)


class PolynomialEnvelope(nn.Module):
    """Smooth cutoff ``u(d)`` with ``u(0)=1`` and ``u, u', u''`` all zero at the cutoff.

    DimeNet's polynomial envelope (Gasteiger et al. 2020, arXiv 2003.03123, eq. 8) with exponent
    ``p``; applied to ``x = d / cutoff`` and set to 0 for ``x ≥ 1``. ``d`` in Å, ``[E]`` → ``[E]``.
    """

    def __init__(self, cutoff: float, exponent: int = 5) -> None:
        super().__init__()
        self.cutoff = float(cutoff)
        self.p = int(exponent)

    @fp32_island
    def forward(self, distances: torch.Tensor) -> torch.Tensor:
        p = self.p
        x = distances / self.cutoff  # [E]
        a, b, c = -(p + 1) * (p + 2) / 2, p * (p + 2), -p * (p + 1) / 2
        value = 1 + a * x**p + b * x ** (p + 1) + c * x ** (p + 2)  # [E]
        return torch.where(x < 1, value, torch.zeros_like(value))


class BesselBasis(nn.Module):
    """Radial Bessel basis ``sqrt(2/c) · sin(nπ d / c) / d``, n = 1..num_radial.

    DimeNet (Gasteiger et al. 2020, arXiv 2003.03123, eq. 7). ``[E]`` Å → ``[E, num_radial]``.
    Distances are clamped below at 1e-6 Å (the limit d → 0 is finite: ``sqrt(2/c)·nπ/c``).
    """

    def __init__(self, cutoff: float, num_radial: int = 8) -> None:
        super().__init__()
        self.cutoff = float(cutoff)
        # linspace, not arange: DeepSpeed's zero.Init re-types arange's output to bf16 (zoo.models.esen.so2)
        self.register_buffer("frequencies", math.pi * torch.linspace(1, num_radial, num_radial, dtype=torch.float32))

    @fp32_island
    def forward(self, distances: torch.Tensor) -> torch.Tensor:
        d = distances.clamp_min(1e-6).unsqueeze(-1) / self.cutoff  # [E, 1]
        return math.sqrt(2.0 / self.cutoff) * torch.sin(self.frequencies * d) / (d * self.cutoff)  # [E, R]


#: ``log`` of float32's smallest normal number (``torch.finfo(torch.float32).tiny`` = 1.18e-38) is −87.34
UNDERFLOW_EXPONENT = -87.0


class GaussianBasis(nn.Module):
    """Gaussian radial basis ``exp(−(d − μ_k)² / (2 s²))`` on ``num_radial`` centres in [0, cutoff].

    SchNet (Schütt et al. 2017, arXiv 1706.08566, eq. 5). ``[E]`` Å → ``[E, num_radial]``.

    ``flush_underflow`` (off by default): Gaussians whose exponent is below
    :data:`UNDERFLOW_EXPONENT` (values under ``exp(−87) = 1.6e-38``: zero or subnormal in float32)
    are returned as exactly 0. With narrow Gaussians most entries are there (GemNet-OC, 128
    centres: ~80 %), and ``torch.exp`` takes a slow path for them (measured, one core:
    6.1 ms against 0.6 ms for a ``[6394, 128]`` basis). Every entry changes by less than 1.6e-38,
    so each row, which holds entries of order 1 where a centre is near, changes below round-off
    in float32 and float64.
    """

    def __init__(self, cutoff: float, num_radial: int = 32, flush_underflow: bool = False) -> None:
        super().__init__()
        self.register_buffer("centres", torch.linspace(0.0, float(cutoff), num_radial))
        self.width = float(cutoff) / max(num_radial - 1, 1)
        self.flush_underflow = flush_underflow

    @fp32_island
    def forward(self, distances: torch.Tensor) -> torch.Tensor:
        diff = distances.unsqueeze(-1) - self.centres  # [E, R]
        exponent = -0.5 * (diff / self.width) ** 2  # [E, R]
        if not self.flush_underflow:
            return torch.exp(exponent)
        small = exponent < UNDERFLOW_EXPONENT  # [E, R]
        return torch.where(small, 0.0, torch.exp(exponent.clamp_min(UNDERFLOW_EXPONENT)))


class ChargeSpinEmbedding(nn.Module):
    """Per-structure embedding of total charge (e) and spin multiplicity (2S+1).

    OMol25 labels every structure with both (Levine et al. 2025, arXiv 2505.08762); as in UMA
    (arXiv 2506.23971) they enter as learned embeddings added to every atom's features.
    Charges in [−max_charge, max_charge] and multiplicities 1..max_spin are embedded; values
    outside raise ``ValueError``.

    Input ``charge`` ``[B]``, ``spin`` ``[B]`` int64; output ``[B, channels]``.
    """

    def __init__(self, channels: int, max_charge: int = 10, max_spin: int = 11) -> None:
        super().__init__()
        self.max_charge, self.max_spin = int(max_charge), int(max_spin)
        self.charge = nn.Embedding(2 * self.max_charge + 1, channels)
        self.spin = nn.Embedding(self.max_spin + 1, channels)

    def check(self, charge: torch.Tensor, spin: torch.Tensor) -> None:
        """Raise ``ValueError`` if a charge or multiplicity is outside the embedded range."""
        if charge.is_meta:  # a shape-only trace (zoo.flops.trace): no values to check
            return
        if bool(((charge < -self.max_charge) | (charge > self.max_charge)).any()):
            raise ValueError(f"charge {charge.tolist()} outside ±{self.max_charge} e")
        if bool(((spin < 1) | (spin > self.max_spin)).any()):
            raise ValueError(f"spin multiplicity {spin.tolist()} outside 1..{self.max_spin}")

    def forward(self, charge: torch.Tensor, spin: torch.Tensor) -> torch.Tensor:
        # under torch.compile a data-dependent check is a graph break: ForceField.check_input runs
        # it eagerly before the compiled region instead
        if not torch.compiler.is_compiling():
            self.check(charge, spin)
        return self.charge(charge + self.max_charge) + self.spin(spin)  # [B, C]


def mlp(sizes: list[int], activation: type[nn.Module] = nn.SiLU, last_activation: bool = False) -> nn.Sequential:
    """A plain MLP ``Linear → act → … → Linear`` with the given layer sizes."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2 or last_activation:
            layers.append(activation())
    return nn.Sequential(*layers)
