"""Spherical-tensor building blocks of eSEN: edge frames, SO(2) convolutions, norms, SO(3) linears.

Node features are real spherical tensors in e3nn's basis: ``x[n, i, c]`` with coefficient index
``i = l² + l + m`` for ``l = 0..lmax``, ``m = −l..l`` (``(lmax+1)²`` coefficients) and channel
``c``. In this basis the ``l = 1`` block is the Cartesian vector ``(x, y, z)`` and rotations about
the **y** axis mix only ``+m`` with ``−m`` (e3nn's pole is y), by the 2×2 rotation of angle ``mθ``
with the same sign for every ``l``. So, in a frame where an edge points along +y, an
SO(3)-equivariant linear map of the edge's features reduces to an SO(2)-equivariant one that acts
on each ``|m|`` separately (Passaro & Zitnick 2023, "Reducing SO(3) Convolutions to SO(2)",
arXiv 2302.03655, eqs. 6-9; used by eSEN, Fu et al. 2025, arXiv 2502.12147, Sec. 3).

Wigner-D matrices without Euler angles
--------------------------------------
Euler angles (``e3nn.o3.xyz_to_angles``) have infinite derivatives at the poles (an edge along ±y
gives NaN forces). :class:`EdgeFrame` instead builds, for each edge direction ``n``, a rotation
``R`` with ``R n = e_y`` that is a rational function of ``n`` with denominators ≥ 1 (Rodrigues'
formula on the hemisphere ``n_y ≥ 0``; on ``n_y < 0`` it rotates ``−n`` and then turns by π about
x). The frame jumps across ``n_y = 0`` only by a roll about the edge axis, to which every
SO(2)-equivariant map is blind, so outputs and their gradients stay smooth. ``D^l(R)`` follows
from e3nn's spherical harmonics, which are polynomials: for fixed unit points ``X`` (a Fibonacci
sphere), ``Y^l(R X) = Y^l(X) D^l(R)ᵀ``, hence ``D^l(R) = (pinv(Y^l(X)) Y^l(R X))ᵀ`` with the
pseudo-inverse computed once in float64.

Constants (sample points, pseudo-inverses, index maps) are computed on the CPU at construction
with plain torch ops (so the module builds under ``torch.device("meta")``) and kept outside the
parameter/buffer tree, copied to the input's device and dtype on first use. They are made
without ``torch.tensor/zeros/ones/full/arange/eye/empty`` for floating values: DeepSpeed's
``zero.Init`` replaces those factories while a model is built and returns bf16 under ``--precision
bf16`` whatever dtype is asked (eSEN then failed to build: ``linalg.pinv`` of bf16), which would
turn these fp64 constants of an fp32 island into bf16 ones.
"""

from __future__ import annotations

import math

import torch
from e3nn import o3
from torch import nn

from zoo.models.dense import Linear, linear
from zoo.models.precision import fp32_island


def num_coefficients(lmax: int) -> int:
    """``(lmax + 1)²``: the number of real spherical-harmonic coefficients up to ``lmax``."""
    return (lmax + 1) ** 2


def frame_layout(lmax: int, mmax: int) -> list[tuple[int, int]]:
    """``(l, m)`` of the coefficients kept in the edge frame, in m-major order.

    Order: ``m = 0`` for ``l = 0..lmax``; then for each ``m = 1..mmax`` the ``+m`` block
    (``l = m..lmax``) followed by the ``−m`` block (``l = m..lmax``). Coefficients with
    ``|m| > mmax`` are dropped (eSCN's truncation, arXiv 2302.03655 Sec. 4.2).
    """
    layout = [(l, 0) for l in range(lmax + 1)]
    for m in range(1, mmax + 1):
        layout += [(l, m) for l in range(m, lmax + 1)]
        layout += [(l, -m) for l in range(m, lmax + 1)]
    return layout


def _fibonacci_sphere(n: int) -> torch.Tensor:
    """``n`` nearly uniform unit vectors ``[n, 3]`` (float64), deterministic."""
    i = torch.linspace(0.5, n - 0.5, n, dtype=torch.float64)  # [n] (not arange: see EdgeFrame)
    polar = torch.acos(1 - 2 * i / n)
    azimuth = math.pi * (1 + 5**0.5) * i
    return torch.stack(
        [torch.sin(polar) * torch.cos(azimuth), torch.cos(polar), torch.sin(polar) * torch.sin(azimuth)], dim=-1
    )


class DeviceCache:
    """Constant tensors built on the CPU, copied once per (device, dtype) on first use."""

    def __init__(self, **tensors: torch.Tensor) -> None:
        self._cpu = tensors
        self._copies: dict = {}

    def get(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        key = (like.device, like.dtype)
        if key not in self._copies and torch.compiler.is_compiling():  # no cache write from a trace
            return {name: t.to(like.device, like.dtype if t.is_floating_point() else t.dtype)
                    for name, t in self._cpu.items()}  # (inside torch.func.grad it would leak a wrapper)
        if key not in self._copies:
            self._copies[key] = {
                name: t.to(like.device, like.dtype if t.is_floating_point() else t.dtype)
                for name, t in self._cpu.items()
            }
        return self._copies[key]


class EdgeFrame(nn.Module):
    """Wigner-D matrices that rotate spherical tensors into edge-aligned frames.

    Parameters
    ----------
    lmax : int
        Largest degree of the features.
    mmax : int
        Largest ``|m|`` kept in the frame (``0 ≤ mmax ≤ lmax``).

    Forward
    -------
    unit_vectors : ``[E, 3]`` unit edge directions.

    Returns ``D`` ``[E, K, (lmax+1)²]`` (at least fp32: an fp32 island): the rows of the block-diagonal Wigner-D matrix of ``R_e``
    (``R_e n_e = e_y``) for the ``K`` frame coefficients of :func:`frame_layout`. Rotate into the
    frame with ``D @ x`` (``[E, (lmax+1)², C] → [E, K, C]``) and back with ``Dᵀ @ y``.
    """

    def __init__(self, lmax: int, mmax: int) -> None:
        super().__init__()
        if not 0 <= mmax <= lmax:
            raise ValueError(f"need 0 <= mmax <= lmax, got lmax={lmax}, mmax={mmax}")
        self.lmax, self.mmax = int(lmax), int(mmax)
        layout = frame_layout(lmax, mmax)
        with torch.device("cpu"):  # explicit: constants hold values even when the model is built on meta
            points = _fibonacci_sphere(4 * lmax + 4)  # [P, 3]
            sh = o3.spherical_harmonics(list(range(lmax + 1)), points, normalize=False)  # [P, (lmax+1)²]
            size = num_coefficients(lmax)
            pinv = sh.new_zeros(size, points.shape[0])  # [(lmax+1)², P] float64
            degree = torch.zeros(size, dtype=torch.long)
            for l in range(lmax + 1):
                block = slice(l * l, (l + 1) ** 2)
                pinv[block] = torch.linalg.pinv(sh[:, block])
                degree[block] = l
            keep = torch.tensor([l * l + l + m for l, m in layout], dtype=torch.long)  # [K]
            mask = (degree[keep, None] == degree[None, :]).to(torch.float64)  # [K, (lmax+1)²]
            flip = torch.diag(points.new_tensor([1.0, -1.0, -1.0]))  # π about x
            self._const = DeviceCache(points=points, pinv_t=pinv.T.contiguous(), keep=keep, mask=mask, flip=flip)

    def rotation_to_y(self, unit_vectors: torch.Tensor) -> torch.Tensor:
        """Rotations ``R`` ``[E, 3, 3]`` with ``R n = e_y``, smooth on each hemisphere of ``n_y``."""
        c = self._const.get(unit_vectors)
        sign = torch.where(unit_vectors[:, 1:2] >= 0, 1.0, -1.0).to(unit_vectors.dtype)  # [E, 1]
        m = unit_vectors * sign  # [E, 3], m_y >= 0
        mx, my, mz = m.unbind(-1)
        zero = torch.zeros_like(mx)
        # Rodrigues: R = I + K + K² / (1 + m·e_y), K = [m × e_y]_×
        k = torch.stack(
            [torch.stack([zero, -mx, zero], -1), torch.stack([mx, zero, mz], -1), torch.stack([zero, -mz, zero], -1)],
            dim=-2,
        )  # [E, 3, 3]
        eye = torch.eye(3, dtype=m.dtype, device=m.device)
        rot = eye + k + (k @ k) / (1 + my)[:, None, None]  # [E, 3, 3]
        return torch.where(sign[:, :, None] > 0, rot, c["flip"] @ rot)  # [E, 3, 3]

    @fp32_island  # the pseudo-inverse and orthogonality need at least fp32 (zoo.models.precision)
    def forward(self, unit_vectors: torch.Tensor) -> torch.Tensor:
        c = self._const.get(unit_vectors)
        rot = self.rotation_to_y(unit_vectors)  # [E, 3, 3]
        turned = torch.einsum("pj,eij->epi", c["points"], rot)  # [E, P, 3]  rows R·x_p
        sh = o3.spherical_harmonics(list(range(self.lmax + 1)), turned, normalize=False)  # [E, P, (lmax+1)²]
        # D[r, s] = Σ_p Y(R x_p)[p, r] · pinv[s, p], within a degree block
        return (sh[:, :, c["keep"]].transpose(1, 2) @ c["pinv_t"]) * c["mask"]  # [E, K, (lmax+1)²]


class SO2Convolution(nn.Module):
    """SO(2)-equivariant linear map of edge-frame features, per ``|m|``, radially modulated.

    eSCN (arXiv 2302.03655, eq. 9): for ``m = 0`` a plain linear map over ``(l, channel)``; for
    ``m > 0`` the pair ``(x₊ₘ, x₋ₘ)`` is multiplied like a complex number,
    ``y₊ = W₁x₊ − W₂x₋``, ``y₋ = W₂x₊ + W₁x₋`` — one matmul of ``[x₊ ‖ x₋]`` with the block
    matrix ``[[W₁, W₂], [−W₂, W₁]]`` (assembled from ``W₁, W₂`` each call). With ``radial`` the
    inputs are first scaled per edge by ``[E, radial_size]`` weights (one per ``(|m|, l, input
    channel)``, shared by ``±m``), as eSEN's edgewise convolution does (arXiv 2502.12147,
    Sec. 3). With ``gates`` the inputs first pass the gated non-linearity (see :func:`gate`),
    fused here so that no gate tensor of the full size is built.

    Parameters
    ----------
    in_channels, out_channels : int
    lmax, mmax : int
    extra_scalars : int
        Extra invariant outputs from the ``m = 0`` map (e.g. gate values), returned separately.
    gauss_products : bool, default False
        For ``m > 0``, Gauss's three-multiplication complex product, ``k = W₁(x₊ + x₋)``,
        ``y₊ = k − (W₁ + W₂)x₋``, ``y₋ = k + (W₂ − W₁)x₊``: 3 matmuls instead of the 4 of the
        block matrix (25 % fewer multiply-adds there, forward and backward). Equal in exact
        arithmetic; rounds differently (measured 6e-7 relative in fp32, 3e-15 in float64), so
        it is an option, off by default.

    Forward: ``x`` ``[E, K, in]`` in :func:`frame_layout` order (or its blocks per ``|m|``,
    ``[E, lmax+1, in]`` then ``[E, 2(lmax+1−m), in]``), ``radial`` ``[E, radial_size]`` or None,
    ``gates`` ``[E, lmax·in]`` or None → ``([E, K, out], [E, extra_scalars])``; with
    ``blocks_out=True`` the output stays in its blocks per ``|m|`` (a list), which another
    SO2Convolution takes without a copy.
    """

    def __init__(self, in_channels: int, out_channels: int, lmax: int, mmax: int, extra_scalars: int = 0,
                 gauss_products: bool = False) -> None:
        super().__init__()
        self.cin, self.cout, self.lmax, self.mmax, self.extra = in_channels, out_channels, lmax, mmax, extra_scalars
        self.gauss_products = bool(gauss_products)
        self.sizes = [lmax + 1] + [lmax + 1 - m for m in range(1, mmax + 1)]  # l's per |m|
        self.radial_size = sum(n * in_channels for n in self.sizes)
        self.fc_m0 = Linear(self.sizes[0] * in_channels, self.sizes[0] * out_channels + extra_scalars)
        # per m > 0: W₁ and W₂ stacked, [2, n·out, n·in], init like nn.Linear scaled by 1/√2
        # (the complex product sums two maps)
        # (initialised before the ParameterList takes them: an engine that partitions parameters as
        # modules are built, DeepSpeed's zero.Init, leaves them empty afterwards)
        weights = []
        for n in self.sizes[1:]:
            weight = torch.empty(2, n * out_channels, n * in_channels)  # [2, n·out, n·in]
            bound = 1 / math.sqrt(n * in_channels) / math.sqrt(2)
            weights.append(nn.Parameter(nn.init.uniform_(weight, -bound, bound)))
        self.weight_m = nn.ParameterList(weights)

    def forward(
        self,
        x: torch.Tensor | list[torch.Tensor],
        radial: torch.Tensor | None = None,
        gates: torch.Tensor | None = None,
        blocks_out: bool = False,
    ) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor]:
        # Edge tensors are cut with split (backward: one cat), never sliced: the backward of each
        # slice of an [E, ...] tensor allocates and zero-fills a gradient of the full size.
        n0 = self.sizes[0]
        if isinstance(x, torch.Tensor):
            blocks = x.split([n0] + [2 * n for n in self.sizes[1:]], dim=1)  # per |m|: [E, n or 2n, in]
        else:  # already per |m| (the blocks_out of another SO2Convolution): no cat, no split
            blocks = x
        e = blocks[0].shape[0]
        if radial is not None:
            radial = radial.split([n * self.cin for n in self.sizes], dim=-1)  # per |m|: [E, n·in]
        if gates is not None:
            g = torch.sigmoid(gates).reshape(e, self.lmax, self.cin)  # [E, lmax, in], gate of l = 1..lmax
            scalar, vector = blocks[0].split([1, n0 - 1], dim=1)
            x0 = torch.cat([nn.functional.silu(scalar), vector * g], dim=1)  # [E, lmax+1, in]
        else:
            x0 = blocks[0]
        x0 = x0.reshape(e, n0 * self.cin)  # [E, (lmax+1)·in]
        if radial is not None:
            x0 = x0 * radial[0]
        y0 = self.fc_m0(x0)  # [E, (lmax+1)·out + extra]
        if self.extra:  # (no split of nothing: its backward would cat an empty gradient)
            y0, extra = y0.split([n0 * self.cout, self.extra], dim=1)  # [E, (lmax+1)·out], [E, extra]
        else:
            extra = y0.new_zeros(e, 0)  # [E, 0]
        outputs = [y0.reshape(e, n0, self.cout)]
        for index, n in enumerate(self.sizes[1:]):
            m = index + 1
            pair = blocks[m].reshape(e, 2, n, self.cin)  # [E, ±m, l = m..lmax, in]
            if gates is not None:
                # the gates of l = m..lmax: the last n rows of g (a split, not a slice)
                pair = pair * g.split([self.lmax - n, n], dim=1)[1][:, None]
            pair = pair.reshape(e, 2, n * self.cin)  # [E, 2, n·in]
            if radial is not None:
                pair = pair * radial[m][:, None]
            w1, w2 = self.weight_m[index]  # [n·out, n·in] each
            if self.gauss_products:
                plus, minus = pair.unbind(1)  # [E, n·in] each (strided rows: fine for the matmul)
                k = linear(plus + minus, w1)  # [E, n·out]
                y_plus = k - linear(minus, w1 + w2)  # W₁x₊ − W₂x₋
                y_minus = k + linear(plus, w2 - w1)  # W₂x₊ + W₁x₋
                outputs.append(torch.stack([y_plus, y_minus], dim=1).reshape(e, 2 * n, self.cout))
                continue
            weight = torch.cat([torch.cat([w1, -w2], 1), torch.cat([w2, w1], 1)], 0)  # [2n·out, 2n·in]
            # y₊ = W₁x₊ − W₂x₋, y₋ = W₂x₊ + W₁x₋
            outputs.append(linear(pair.reshape(e, 2 * n * self.cin), weight).reshape(e, 2 * n, self.cout))
        if blocks_out:
            return outputs, extra  # per |m|: [E, n or 2n, out]; [E, extra]
        return torch.cat(outputs, dim=1), extra  # [E, K, out], [E, extra]


class EquivariantRMSNorm(nn.Module):
    """RMS layer norm of spherical tensors ``[N, (lmax+1)², C]``.

    The ``l = 0`` channel is centred over channels; then every coefficient is divided by the
    root of the degree-balanced mean square (each ``l`` weighs ``1/(lmax+1)``, spread over its
    ``2l+1`` components; mean over channels) and scaled by a learned weight per ``(l, channel)``;
    a learned bias is added to ``l = 0`` only. Rotations act within each ``l`` block and keep
    its norm, so this is equivariant (the equivariant RMS norm of EquiformerV2/eSEN,
    arXiv 2306.12059 Sec. 3.3, arXiv 2502.12147).
    """

    def __init__(self, lmax: int, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.lmax, self.eps = lmax, eps
        self.weight = nn.Parameter(torch.ones(lmax + 1, channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        with torch.device("cpu"):
            balance = torch.as_tensor([1.0 / ((2 * l + 1) * (lmax + 1)) for l in range(lmax + 1) for _ in range(2 * l + 1)],
                                      dtype=torch.float32)  # (as_tensor: see EdgeFrame)
            repeats = torch.tensor([2 * l + 1 for l in range(lmax + 1)])
        self._const = DeviceCache(balance=balance, repeats=repeats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self._const.get(x)
        scalar, rest = x.split([1, x.shape[1] - 1], dim=1)  # [N, 1, C], [N, (lmax+1)² − 1, C]
        x = torch.cat([scalar - scalar.mean(dim=-1, keepdim=True), rest], dim=1)  # [N, (lmax+1)², C]
        mean_square = (x.pow(2) * c["balance"][:, None]).sum(dim=1).mean(dim=-1)  # [N]
        x = x * torch.rsqrt(mean_square + self.eps)[:, None, None]
        x = x * self.weight.repeat_interleave(c["repeats"], dim=0, output_size=x.shape[1])  # [N, (lmax+1)², C]
        scalar, rest = x.split([1, x.shape[1] - 1], dim=1)
        return torch.cat([scalar + self.bias, rest], dim=1)


class SO3Linear(nn.Module):
    """Equivariant linear map per degree: ``y_l = x_l W_l`` (bias on ``l = 0`` only).

    ``[N, (lmax+1)², in]`` → ``[N, (lmax+1)², out]``; ``lmax + 1`` small matmuls.
    """

    def __init__(self, in_channels: int, out_channels: int, lmax: int) -> None:
        super().__init__()
        self.lmax = lmax
        self.linears = nn.ModuleList(Linear(in_channels, out_channels, bias=(l == 0)) for l in range(lmax + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = x.split([2 * l + 1 for l in range(self.lmax + 1)], dim=1)  # per l: [N, 2l+1, in]
        return torch.cat([lin(block) for block, lin in zip(blocks, self.linears)], dim=1)


def gate(x: torch.Tensor, gates: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Gated non-linearity (Weiler et al. 2018, arXiv 1807.02547; eSCN/eSEN's ``gate``).

    ``x`` ``[M, K, C]`` with coefficient 0 the ``l = 0`` scalar, ``gates`` ``[M, lmax·C]``
    invariant pre-activations, ``degrees`` ``[K]`` the ``l`` of each coefficient. Scalars get
    SiLU; each ``l > 0`` coefficient is multiplied by ``sigmoid(gate[l, c])``.
    """
    m, _, channels = x.shape
    g = torch.sigmoid(gates).reshape(m, gates.shape[1] // channels, channels)  # [M, lmax, C]
    factors = g[:, (degrees[1:] - 1)]  # [M, K-1, C]
    scalar, rest = x.split([1, x.shape[1] - 1], dim=1)  # [M, 1, C], [M, K-1, C]
    return torch.cat([nn.functional.silu(scalar), rest * factors], dim=1)
