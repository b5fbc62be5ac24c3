"""eSEN: a smooth, expressive equivariant network of spherical tensors.

Fu et al. 2025, "Learning Smooth and Expressive Interatomic Potentials for Physical Property
Prediction", arXiv 2502.12147; message passing by eSCN's SO(2) convolutions (Passaro & Zitnick
2023, arXiv 2302.03655). Written for this project from the papers; building blocks in
:mod:`zoo.models.esen.so2`.

Architecture (one forward)
--------------------------
- Node features ``x`` ``[N, (lmax+1)², C]`` (e3nn's real spherical-harmonic basis, ``C`` =
  ``width`` sphere channels). ``l = 0`` starts as an element embedding plus the structure's
  charge/spin embedding (:class:`zoo.models.common.ChargeSpinEmbedding`); all degrees then receive
  eSEN's *edge-degree embedding*: per edge, a radial MLP gives ``m = 0`` coefficients for every
  ``l`` in the edge frame, rotated back to the global frame, cut off smoothly and summed on the
  target atom.
- Edge features: a Gaussian expansion of the distance, concatenated with source and target
  element embeddings; each layer has its own radial MLP on them.
- ``num_layers`` blocks, each pre-norm with residuals (arXiv 2502.12147, Fig. 2):
  ``x += Message(RMSNorm(x))``, ``x += FeedForward(RMSNorm(x))``.
  *Message*: for edge ``j → i``, ``[x_j ‖ x_i]`` (2C channels) is rotated into the frame where
  the edge points along +y, truncated to ``|m| ≤ mmax``, passed through SO(2) convolution 1
  (inputs scaled by the radial MLP), a gate (SiLU on scalars, sigmoid gates on ``l > 0``), and
  SO(2) convolution 2; multiplied by the polynomial envelope of the distance (smooth at the
  cutoff), rotated back and summed over neighbours divided by ``avg_num_neighbors``.
  *FeedForward*: per-degree linear ``C → C``, gate, per-degree linear ``C → C``.
- Heads after a final RMS norm: energy = MLP(C → C → C → 1) on ``l = 0`` (per-atom, normalised
  units); direct forces = a linear map of the ``l = 1`` block to one vector per atom
  (equivariant by construction), or ``−∂E/∂positions`` with ``direct_forces=False``.

Symmetry: invariant energy and equivariant forces under rotations (SO(3)), translations and
permutations. Not under reflections: spherical tensors here carry no parity, so a mirror image
may get a different energy (as in eSCN/eSEN).

Width and defaults
------------------
``width`` = sphere channels ``C``; the hidden channels of the SO(2) convolutions and of the
feed-forward blocks and the edge channels equal ``C`` too, so N grows ≈ C². Fixed per
architecture: ``num_layers = 4`` (a depth scaled down for CPU training; the paper's models are
deeper), ``lmax = 2`` (the scaling study of arXiv 2510.09768 uses ``lmax = 4``: pass ``lmax=4``),
``mmax = lmax``, 6 Å cutoff, 64 Gaussians, envelope exponent 5, ``avg_num_neighbors = 20``
(measured: 20.1 edges per atom at 6 Å on the first 502 structures of the embedded training
data, ``data/omol25_sample/train/data0000.aselmdb``).

Trainable parameters N (``zoo.registry.count_parameters("esen", w, lmax=…)``, built on meta):

=====  ===========  =============
width  N (lmax 2)   N (lmax 4)
=====  ===========  =============
16     109,457      367,953
32     411,425      1,441,441
64     1,592,897    5,705,025
128    6,265,985    22,698,625
256    24,852,737   90,551,553
512    98,988,545   361,720,321
1024   395,109,377  1,445,909,505
=====  ===========  =============

>>> from zoo.registry import build
>>> model = build("esen", width=16)
>>> model.lmax, model.mmax, len(model.blocks)
(2, 2, 4)
"""

from __future__ import annotations

import torch
from torch import nn

from datapipe import keys
from zoo.models.base import ForceField
from zoo.models.common import ChargeSpinEmbedding, GaussianBasis, PolynomialEnvelope, scatter_sum
from zoo.models.dense import Linear
from zoo.models.esen.edges import edge_matmul, gather_pair
from zoo.models.esen.so2 import DeviceCache, EdgeFrame, EquivariantRMSNorm, SO2Convolution, SO3Linear, gate, num_coefficients
from zoo.models.precision import to_compute


def radial_mlp(in_features: int, hidden: int, out_features: int) -> nn.Sequential:
    """``Linear → LayerNorm → SiLU`` twice, then ``Linear``: edge features → per-edge weights."""
    return nn.Sequential(
        Linear(in_features, hidden),
        nn.LayerNorm(hidden),
        nn.SiLU(),
        Linear(hidden, hidden),
        nn.LayerNorm(hidden),
        nn.SiLU(),
        Linear(hidden, out_features),
    )


class EdgeDegreeEmbedding(nn.Module):
    """eSEN's initial embedding of every degree from the neighbourhood (arXiv 2502.12147, Sec. 3).

    A radial MLP of the edge features gives ``m = 0`` coefficients ``[E, lmax+1, C]`` in the edge
    frame; they are rotated to the global frame, multiplied by the envelope and summed on the
    target atom, divided by ``avg_num_neighbors``. Output ``[N, (lmax+1)², C]``.
    """

    def __init__(self, edge_features: int, edge_channels: int, channels: int, lmax: int):
        super().__init__()
        self.lmax, self.channels = lmax, channels
        self.radial = radial_mlp(edge_features, edge_channels, (lmax + 1) * channels)

    def forward(self, edge_features, wigner_back, target, num_nodes):
        """``wigner_back`` ``[E, (lmax+1)², K]``: Dᵀ times envelope / avg_num_neighbors."""
        m0 = self.radial(edge_features).reshape(-1, self.lmax + 1, self.channels)  # [E, lmax+1, C]
        k = wigner_back.shape[2]
        m0_columns = wigner_back.split([self.lmax + 1, k - self.lmax - 1], dim=2)[0]  # [E, (lmax+1)², lmax+1]
        message = edge_matmul(m0_columns, m0)  # [E, (lmax+1)², C]
        return scatter_sum(message, target, num_nodes)  # [N, (lmax+1)², C]


class MessageBlock(nn.Module):
    """Edgewise SO(2) convolution of eSEN (arXiv 2502.12147, Sec. 3; eSCN arXiv 2302.03655, eq. 9).

    ``[x_j ‖ x_i]`` → frame → SO2Conv(2C → H, radial, + lmax·H gates) → gate → SO2Conv(H → C)
    → envelope → global frame → Σ_j / avg_num_neighbors. ``[N, (lmax+1)², C]`` → same.
    """

    def __init__(
        self, channels: int, hidden: int, edge_features: int, edge_channels: int, lmax: int, mmax: int,
        gauss_products: bool = False,
    ) -> None:
        super().__init__()
        self.conv1 = SO2Convolution(2 * channels, hidden, lmax, mmax, extra_scalars=lmax * hidden,
                                    gauss_products=gauss_products)
        self.conv2 = SO2Convolution(hidden, channels, lmax, mmax, gauss_products=gauss_products)
        self.radial = radial_mlp(edge_features, edge_channels, self.conv1.radial_size)

    def forward(self, x, edge_features, wigner, wigner_back, source, target):
        pair = gather_pair(x, source, target)  # [E, (lmax+1)², 2C]  [x_j ‖ x_i]
        framed = edge_matmul(wigner, pair)  # [E, K, 2C]
        hidden, gates = self.conv1(framed, radial=self.radial(edge_features), blocks_out=True)  # per |m|, [E, lmax·H]
        framed, _ = self.conv2(hidden, gates=gates)  # [E, K, C]  (gate fused into conv2's input)
        message = edge_matmul(wigner_back, framed)  # [E, (lmax+1)², C]  (envelope and 1/avg_num_neighbors folded in)
        return scatter_sum(message, target, x.shape[0])  # [N, (lmax+1)², C]


class FeedForward(nn.Module):
    """Per-atom gated feed-forward block: SO3Linear(C → H) → gate → SO3Linear(H → C)."""

    def __init__(self, channels: int, hidden: int, lmax: int) -> None:
        super().__init__()
        self.lmax, self.hidden = lmax, hidden
        self.up = SO3Linear(channels, hidden, lmax)
        self.gates = Linear(channels, lmax * hidden)
        self.down = SO3Linear(hidden, channels, lmax)
        with torch.device("cpu"):
            self._const = DeviceCache(degrees=torch.tensor([l for l in range(lmax + 1) for _ in range(2 * l + 1)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)  # [N, (lmax+1)², H]
        if self.lmax > 0:
            scalar = x.split([1, x.shape[1] - 1], dim=1)[0].squeeze(1)  # [N, C]
            h = gate(h, self.gates(scalar), self._const.get(h)["degrees"])
        else:
            h = nn.functional.silu(h)
        return self.down(h)  # [N, (lmax+1)², C]


class Block(nn.Module):
    """One eSEN layer: ``x += Message(norm(x)); x += FeedForward(norm(x))``."""

    def __init__(self, channels, hidden, edge_features, edge_channels, lmax, mmax, gauss_products=False) -> None:
        super().__init__()
        self.norm_message = EquivariantRMSNorm(lmax, channels)
        self.message = MessageBlock(channels, hidden, edge_features, edge_channels, lmax, mmax, gauss_products)
        self.norm_feed_forward = EquivariantRMSNorm(lmax, channels)
        self.feed_forward = FeedForward(channels, hidden, lmax)

    def forward(self, x, edge_features, wigner, wigner_back, source, target):
        x = x + self.message(self.norm_message(x), edge_features, wigner, wigner_back, source, target)
        return x + self.feed_forward(self.norm_feed_forward(x))  # [N, (lmax+1)², C]


class ESEN(ForceField):
    """eSEN force field (arXiv 2502.12147) at a given width (see the module docstring).

    Parameters
    ----------
    width : int
        Sphere channels ``C`` (also the hidden and edge channels).
    num_layers : int, default 4
        Number of message-passing blocks.
    lmax : int, default 2
        Largest degree of the node features (2 or 4 in the scaling study; any ``≥ 1``).
    mmax : int or None, default None (= lmax)
        Largest ``|m|`` kept in the edge frames (``0 ≤ mmax ≤ lmax``).
    num_radial : int, default 64
        Gaussians in the distance expansion.
    avg_num_neighbors : float, default 20.0
        Divisor of the neighbour sums (a fixed constant, not fitted at construction).
    cutoff : float, default 6.0
        Å; the envelope goes smoothly to zero there.
    direct_forces : bool, default True
        Direct ``l = 1`` force head (True) or ``−∂E/∂positions`` (False).
    max_atomic_number : int, default 100
    gauss_products : bool, default False
        Gauss's three-multiplication complex products in the SO(2) convolutions (fewer
        multiply-adds, different fp32 rounding; see :class:`zoo.models.esen.so2.SO2Convolution`).

    Raises
    ------
    ValueError
        For ``width < 1``, ``num_layers < 1``, ``lmax < 1`` or ``mmax`` outside ``0..lmax``.
    """

    def __init__(
        self,
        width: int,
        *,
        num_layers: int = 4,
        lmax: int = 2,
        mmax: int | None = None,
        num_radial: int = 64,
        avg_num_neighbors: float = 20.0,
        cutoff: float = keys.DEFAULT_CUTOFF,
        direct_forces: bool = True,
        max_atomic_number: int = keys.MAX_ATOMIC_NUMBER,
        gauss_products: bool = False,
    ) -> None:
        super().__init__(cutoff=cutoff, direct_forces=direct_forces, max_atomic_number=max_atomic_number)
        mmax = lmax if mmax is None else int(mmax)
        if width < 1 or num_layers < 1 or lmax < 1 or not 0 <= mmax <= lmax:
            raise ValueError(
                f"eSEN needs width >= 1, num_layers >= 1, lmax >= 1 and 0 <= mmax <= lmax; "
                f"got width={width}, num_layers={num_layers}, lmax={lmax}, mmax={mmax}"
            )
        channels = hidden = edge_channels = int(width)
        self.channels, self.lmax, self.mmax = channels, int(lmax), mmax
        self.avg_num_neighbors = float(avg_num_neighbors)
        edge_features = num_radial + 2 * edge_channels

        self.atom_embedding = nn.Embedding(self.max_atomic_number + 1, channels)
        self.charge_spin = ChargeSpinEmbedding(channels)
        self.source_embedding = nn.Embedding(self.max_atomic_number + 1, edge_channels)
        self.target_embedding = nn.Embedding(self.max_atomic_number + 1, edge_channels)
        self.distance_expansion = GaussianBasis(self.cutoff, num_radial)
        self.envelope = PolynomialEnvelope(self.cutoff, exponent=5)
        self.frame = EdgeFrame(self.lmax, mmax)
        self.edge_degree = EdgeDegreeEmbedding(edge_features, edge_channels, channels, self.lmax)
        self.blocks = nn.ModuleList(
            Block(channels, hidden, edge_features, edge_channels, self.lmax, mmax, gauss_products)
            for _ in range(num_layers)
        )
        self.norm_out = EquivariantRMSNorm(self.lmax, channels)
        self.energy_head = nn.Sequential(
            Linear(channels, channels), nn.SiLU(), Linear(channels, channels), nn.SiLU(), Linear(channels, 1)
        )
        self.force_head = Linear(channels, 1, bias=False)

    def interact(self, atomic_numbers, positions, edge_index, edge_vectors, batch, charge, spin, num_graphs):
        """Per-atom energies ``[N]`` and direct forces ``[N, 3]`` (or None), normalised units."""
        source, target = edge_index[0], edge_index[1]  # [E], [E]
        num_nodes = atomic_numbers.shape[0]
        compute = self.compute_dtype(edge_vectors.device)  # bf16 under --precision bf16
        # fp32 islands (zoo.models.precision): distances, Wigner-D, envelope, Gaussian basis
        distances = edge_vectors.norm(dim=-1)  # [E] Å (> 0: the base refuses coincident atoms)
        wigner = self.frame(edge_vectors / distances[:, None])  # [E, K, (lmax+1)²]
        envelope = self.envelope(distances)  # [E]
        edge_features = torch.cat(
            [
                to_compute(self.distance_expansion(distances), compute),  # [E, R]
                self.source_embedding(atomic_numbers[source]),  # [E, C]
                self.target_embedding(atomic_numbers[target]),  # [E, C]
            ],
            dim=-1,
        )  # [E, R + 2C]

        scalars = self.atom_embedding(atomic_numbers) + self.charge_spin(charge, spin)[batch]  # [N, C]
        x = torch.cat(
            [scalars[:, None], scalars.new_zeros(num_nodes, num_coefficients(self.lmax) - 1, self.channels)], dim=1
        )  # [N, (lmax+1)², C]
        # rotation back to the global frame with the smooth cutoff and the neighbour-sum normalisation
        wigner_back = wigner.transpose(1, 2) * (envelope / self.avg_num_neighbors)[:, None, None]  # [E, (lmax+1)², K]
        wigner, wigner_back = to_compute(wigner, compute), to_compute(wigner_back, compute)  # the island's boundary
        x = x + self.edge_degree(edge_features, wigner_back, target, num_nodes)
        for block in self.blocks:
            x = block(x, edge_features, wigner, wigner_back, source, target)  # [N, (lmax+1)², C]
        x = self.norm_out(x)

        scalar, vector, _ = x.split([1, 3, x.shape[1] - 4], dim=1)  # [N, 1, C], [N, 3, C] (x, y, z), rest
        node_energy = self.energy_head(scalar.squeeze(1)).squeeze(-1)  # [N]
        forces = self.force_head(vector).squeeze(-1) if self.direct_forces else None  # [N, 3]
        return node_energy, forces
