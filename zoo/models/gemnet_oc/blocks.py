"""Layers, bases and scale factors of GemNet-OC (Gasteiger et al. 2022, arXiv 2204.02782).

- :class:`Dense`, :class:`ResidualLayer`: bias-free linear layers with the scaled SiLU
  ``silu(x)/0.6`` and He-orthogonal initialisation (GemNet, arXiv 2106.08903, App. B).
- :class:`ScaleFactor` and :func:`fit_scale_factors`: scalars fitted on sample batches so that
  summed messages keep the variance of their inputs (GemNet App. B "Scaling factors"; GemNet-OC
  notes training is unstable without them).
- :class:`RadialBasis` (Gaussians × polynomial envelope, GemNet-OC Sec. 3 "Basis functions"),
  :func:`legendre_basis` (real spherical harmonics with m = 0 of an angle's cosine),
  :class:`BasisEmbedding` (the shared down-projection of radial ⊗ angular bases).
- :func:`aggregate_outer`: ``Σ_t basis[t] ⊗ x[t]`` grouped by an output index, the "efficient
  bilinear layer" of GemNet-OC (Sec. 3 "Efficient basis calculation"), as zero-padded matmuls.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from zoo.models.common import GaussianBasis, PolynomialEnvelope
from zoo.models.gemnet_oc.activation import silu
from zoo.models.gemnet_oc.graph import inner_index
from zoo.models.gemnet_oc.layout import columns
from zoo.models import dense
from zoo.models.dense import Linear
from zoo.models.precision import fp32_island


#: below this many rows a product runs as ``torch.nn.functional.linear`` (the BLAS), not through
#: :func:`zoo.models.dense.linear`'s oneDNN Function: on GemNet-OC's atom rows (N ≈ 350) the Function's
#: Python backward and its transposed copies cost more than oneDNN's faster kernel gains (one core,
#: ``[350, 64] @ [64, 64]`` forward + backward 0.18 against 0.13 ms; equal at 1,000 rows, oneDNN
#: 1.7× faster at 5,268). Both are fp32 products with fp32 sums (round-off differs).
SMALL_ROWS = 1024


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weightᵀ`` ``[rows, in] → [rows, out]`` (bias-free): ``F.linear`` under :data:`SMALL_ROWS` rows,
    else :func:`zoo.models.dense.linear` (its errors)."""
    if x.dim() == 2 and x.shape[0] < SMALL_ROWS:
        return nn.functional.linear(x, weight)
    return dense.linear(x, weight)


def he_orthogonal_(weight: torch.Tensor) -> torch.Tensor:
    """Orthogonal init rescaled to variance ``1/fan_in`` (GemNet's "HeOrthogonal").

    Skipped on the meta device (no data there; the model is built without memory for counting).
    """
    if weight.is_meta:
        return weight
    with torch.no_grad():
        flat = weight.view(weight.shape[0], -1)
        nn.init.orthogonal_(flat)
        fan_in = flat.shape[1]
        flat -= flat.mean(dim=1, keepdim=True)
        flat /= flat.var(dim=1, keepdim=True).add(1e-12).sqrt()
        flat *= math.sqrt(1.0 / fan_in)
    return weight


class ScaledSiLU(nn.Module):
    """``silu(x) / 0.6``: keeps unit variance for unit-normal inputs (GemNet App. B); the SiLU of
    :mod:`zoo.models.gemnet_oc.activation` (hand-written first and second derivatives)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu(x) * (1.0 / 0.6)


class Dense(nn.Module):
    """Bias-free linear layer ``[..., in] → [..., out]`` with optional scaled SiLU."""

    def __init__(self, in_features: int, out_features: int, activation: bool = True) -> None:
        super().__init__()
        self.linear = Linear(in_features, out_features, bias=False)  # nn.Linear, fp32 CPU products in oneDNN (zoo.models.dense)
        he_orthogonal_(self.linear.weight)
        self.activation = ScaledSiLU() if activation else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.linear(x))  # (the module: its hooks see the product)

    def scaled(self, v: torch.Tensor, k: float = 1.0) -> tuple[torch.Tensor, float]:
        """``(v', k')`` with ``forward(k·v) = k'·v'`` ``[rows, out]``: the input's scale folded into the
        weight, the activation's 1/0.6 handed on (for the next layer to fold), no elementwise pass
        spent on either."""
        weight = self.linear.weight if k == 1.0 else self.linear.weight * k  # [out, in]
        if isinstance(self.activation, nn.Identity):
            return linear(v, weight), 1.0
        return silu(linear(v, weight)), 1.0 / 0.6


class ResidualLayer(nn.Module):
    """``(x + Dense(Dense(x))) / √2`` (GemNet Fig. 3 "Residual").

    Computed as ``(x + silu(W₂' silu(W₁ x)) / 0.6) / √2`` with ``W₂' = W₂ / 0.6``: the first layer's
    1/0.6 is moved onto the (small) second weight and the second one into the sum, two fewer
    passes over the ``[rows, units]`` activations, the same function.
    """

    def __init__(self, units: int) -> None:
        super().__init__()
        self.dense = nn.Sequential(Dense(units, units), Dense(units, units))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = self.dense[0].linear.weight, self.dense[1].linear.weight
        y = silu(linear(x, first))  # [rows, units], 0.6 · Dense₁(x)
        y = silu(linear(y, second * (1.0 / 0.6)))  # 0.6 · Dense₂(Dense₁(x))
        return torch.add(x, y, alpha=1.0 / 0.6).mul_(1.0 / math.sqrt(2.0))

    def scaled(self, v: torch.Tensor, k: float = 1.0) -> tuple[torch.Tensor, float]:
        """``(v', k')`` with ``forward(k·v) = k'·v'``: ``k`` folded into the first weight, and
        ``(k·v + y/0.6)/√2 = (y + 0.6·k·v) / (0.6·√2)``, so one elementwise pass (an add) instead of two,
        the factor ``k' = 1/(0.6·√2)`` left for the caller to fold (into the next weight)."""
        first, second = self.dense[0].linear.weight, self.dense[1].linear.weight
        y = silu(linear(v, first if k == 1.0 else first * k))  # [rows, units]
        y = silu(linear(y, second * (1.0 / 0.6)))
        return torch.add(y, v, alpha=0.6 * k), 1.0 / (0.6 * math.sqrt(2.0))


def run_scaled(layers: Iterable[nn.Module], v: torch.Tensor, k: float = 1.0) -> tuple[torch.Tensor, float]:
    """``(v', k')`` with ``layers(k·v) = k'·v'`` for a sequence of :class:`Dense` / :class:`ResidualLayer`,
    each scale folded into the next weight (see their ``scaled``)."""
    for layer in layers:
        v, k = layer.scaled(v, k)
    return v, k


def dense_stack(units_in: int, units: int, num_residual: int) -> nn.Sequential:
    """``Dense(in → units)`` (only if sizes differ) then ``num_residual`` residual layers."""
    layers: list[nn.Module] = [Dense(units_in, units)] if units_in != units else []
    layers += [ResidualLayer(units) for _ in range(num_residual)]
    return nn.Sequential(*layers)


class ScaleFactor(nn.Module):
    """A fitted scalar ``s``: ``forward(x, ref) = s · x``.

    ``s`` is a buffer (1.0 at construction, also on the meta device) set by
    :func:`fit_scale_factors` to ``sqrt(E[ref²] / E[x²])`` over sample batches, so that a sum
    over a variable number of neighbours keeps the second moment of its input ``ref`` (as
    fairchem's ``ScaleFactor`` is fitted), or to ``1 / sqrt(E[x²])`` without ``ref``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(()))
        self._stats: list[float] | None = None  # [Σ x², n_x, Σ ref², n_ref] while fitting

    @property
    def fitting(self) -> bool:
        """Whether :func:`fit_scale_factors` is recording this factor's statistics now."""
        return self._stats is not None

    def forward(self, x: torch.Tensor, ref: torch.Tensor | Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """``s · x``; while fitting, the second moments of ``x`` and ``ref`` are recorded (``ref`` may be
        a function returning it, called only then, for a reference that is not otherwise built)."""
        if self._stats is not None:
            with torch.no_grad():
                ref = ref() if callable(ref) else ref
                self._stats[0] += float(x.detach().double().pow(2).sum())
                self._stats[1] += x.numel()
                if ref is not None:
                    self._stats[2] += float(ref.detach().double().pow(2).sum())
                    self._stats[3] += ref.numel()
        return x * self.scale


@torch.no_grad()
def _set_scale(factor: ScaleFactor, name: str) -> None:
    sum_x, n_x, sum_ref, n_ref = factor._stats
    if n_x == 0 or sum_x == 0.0:
        raise ValueError(f"scale factor {name}: no non-zero activations seen; give batches with edges")
    target = sum_ref / n_ref if n_ref else 1.0
    factor.scale.fill_(math.sqrt(target / (sum_x / n_x)))


def fit_scale_factors(model: nn.Module, batches: Iterable, progress=None) -> dict[str, float]:
    """Fit every :class:`ScaleFactor` of ``model`` on ``batches``, one after the other.

    Factors are fitted in module order (a factor's input depends on the ones before it), each
    from one pass of ``model(batch)`` over all batches, as fairchem's ``fit.py`` does. Call it
    once before training, on a few training batches (e.g. 8–16), then save the model: the
    factors are buffers and travel with the state dict.

    Parameters
    ----------
    model : a module containing ScaleFactor submodules (e.g. :class:`zoo.models.gemnet_oc.model.GemNetOC`).
    batches : re-iterable collection of batches the model accepts (a list).
    progress : optional ``progress(done, total)`` called after each factor is fitted (one pass
        over ``batches`` each).

    Returns
    -------
    ``{module name: fitted scale}``.

    Raises
    ------
    ValueError
        if a factor sees no non-zero activation (batches without edges, triplets, …).
    """
    batches = list(batches)
    factors = [(name, m) for name, m in model.named_modules() if isinstance(m, ScaleFactor)]
    was_training = model.training
    model.eval()
    fitted: dict[str, float] = {}
    try:
        for name, factor in factors:
            factor.scale.fill_(1.0)
            factor._stats = [0.0, 0, 0.0, 0]
            with torch.enable_grad():  # conservative models differentiate inside forward
                for batch in batches:
                    model(batch)
            _set_scale(factor, name)
            factor._stats = None
            fitted[name] = float(factor.scale)
            if progress is not None:
                progress(len(fitted), len(factors))
    finally:
        for _, factor in factors:
            factor._stats = None
        model.train(was_training)
    return fitted


class RadialBasis(nn.Module):
    """Gaussian radial basis times DimeNet's polynomial envelope (p = 5).

    GemNet-OC's choice (arXiv 2204.02782, Sec. 3 "Basis functions": Gaussians instead of
    spherical Bessel functions). ``[E]`` Å → ``[E, num_radial]``; exactly 0 beyond ``cutoff``
    with zero first and second derivatives there (smooth energy at the cutoff).
    """

    def __init__(self, cutoff: float, num_radial: int) -> None:
        super().__init__()
        self.gaussians = GaussianBasis(cutoff, num_radial, flush_underflow=True)  # below 1.6e-38 → 0 (its docstring)
        self.envelope = PolynomialEnvelope(cutoff, exponent=5)

    @fp32_island
    def forward(self, distance: torch.Tensor) -> torch.Tensor:
        return self.gaussians(distance) * self.envelope(distance).unsqueeze(-1)  # [E, R]


@fp32_island
def legendre_basis(cosine: torch.Tensor, num_spherical: int) -> torch.Tensor:
    """Real spherical harmonics ``Y_l^0`` of an angle, ``l = 0..num_spherical−1``.

    ``Y_l^0(θ) = sqrt((2l+1)/4π) · P_l(cos θ)`` with Bonnet's recursion for the Legendre
    polynomials ``P_l``; a polynomial in the cosine, so no ``acos`` and finite gradients at
    ``cos = ±1``. ``[T]`` → ``[T, num_spherical]``.

    The recursion runs on the normalised ``Y_l = n_l P_l`` directly,
    ``Y_{l+1} = (n_{l+1}/n_l)·((2l+1)/(l+1))·x·Y_l − (n_{l+1}/n_{l−1})·(l/(l+1))·Y_{l−1}``: two passes
    per order and no normalising pass (the same polynomials; float round-off differs). The result is
    row-major ``[T, num_spherical]`` (the layout the sparse sums read), the orders written as its
    columns (:func:`zoo.models.gemnet_oc.layout.columns`: no transposed copy).
    """
    x = cosine.clamp(-1.0, 1.0)
    norms = [math.sqrt((2 * l + 1) / (4 * math.pi)) for l in range(num_spherical)]
    ys = [torch.full_like(x, norms[0]), x * norms[1]]
    for l in range(1, num_spherical - 1):
        a = norms[l + 1] / norms[l] * (2 * l + 1) / (l + 1)
        b = norms[l + 1] / norms[l - 1] * l / (l + 1)
        ys.append(torch.addcmul(ys[l - 1] * -b, x, ys[l], value=a))  # (out of place: the FLOP counters' addcmul)
    return columns(ys[:num_spherical])  # [T, S]


class BasisEmbedding(nn.Module):
    """Shared projection of a raw radial basis, optionally per angular component.

    ``[E, R] → [E, I, S]`` with weight ``[R, S, I]`` (``num_spherical`` given), else
    ``[E, R] → [E, I]`` (GemNet-OC's ``BasisEmbedding``; the radial part of the
    ``rbf ⊗ cbf`` / ``rbf ⊗ sbf`` bases before the bilinear layer).
    """

    def __init__(self, num_radial: int, emb_size: int, num_spherical: int | None = None) -> None:
        super().__init__()
        self.num_spherical = num_spherical
        shape = (num_radial, num_spherical, emb_size) if num_spherical else (emb_size, num_radial)
        self.weight = nn.Parameter(torch.empty(shape))
        he_orthogonal_(self.weight)

    def forward(self, rad: torch.Tensor) -> torch.Tensor:
        if self.num_spherical is None:
            return linear(rad, self.weight)  # [E, I]
        num_radial, num_spherical, emb_size = self.weight.shape
        w = self.weight.reshape(num_radial, num_spherical * emb_size)  # [R, S*I]
        return linear(rad, w.t()).reshape(rad.shape[0], num_spherical, emb_size).transpose(1, 2)  # [E, I, S]


def pad_slots(index: torch.Tensor, size: int) -> tuple[int, torch.Tensor]:
    """``(Kmax, slot)`` of a sorted, non-empty ``index`` ``[T]``: the largest group and each element's row
    ``index·Kmax + rank in its group`` ``[T]`` of the flattened zero-padded ``[size·Kmax]`` blocks."""
    inner = inner_index(index, size)  # [T]
    kmax = int(inner.max()) + 1
    return kmax, index * kmax + inner


def aggregate_outer(basis: torch.Tensor, x: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """``y[o] = Σ_{t: index[t] = o} basis[t] ⊗ x[t]``: ``[T, K], [T, C] → [size, K, C]``.

    ``index`` must be sorted (non-decreasing). Rows are scattered into zero-padded
    ``[size, Kmax, ·]`` blocks and contracted with one batched matmul (GemNet-OC's efficient
    reformulation), which never materialises the ``[T, K, C]`` outer products.
    """
    k, c = basis.shape[-1], x.shape[-1]
    if index.numel() == 0:
        return x.new_zeros(size, k, c)
    kmax, slot = pad_slots(index, size)
    # index_copy into flat rows (backward: one index_select) rather than a 2-D index_put
    basis_pad = basis.new_zeros(size * kmax, k).index_copy(0, slot, basis).view(size, kmax, k)  # [size, Kmax, K]
    x_pad = x.new_zeros(size * kmax, c).index_copy(0, slot, x).view(size, kmax, c)  # [size, Kmax, C]
    return basis_pad.transpose(1, 2) @ x_pad  # [size, K, C]
