"""MPNN: unconstrained message passing on raw relative position vectors.

The lowest rung of the symmetry ladder of arXiv 2510.09768 (Ngo & Ravanbakhsh 2025): a message
passing neural network in the sense of Gilmer et al. 2017 (arXiv 1704.01212, eqs. 1–3) whose
edge features are the Cartesian components of the relative position ``r_ij = x_j − x_i`` (Å)
together with a radial basis of ``|r_ij|``. Nothing constrains it under rotations or
reflections; it is invariant under translations and permutations only (it sees relative vectors
and sums over neighbours). Its lack of symmetry is the point of the baseline; the paper's
ablation adds a symmetry loss over randomly rotated copies (:mod:`zoo.models.symmetry`).

Architecture (``w`` = width = hidden size, ``L`` = ``num_layers``)::

    h_i⁰   = Emb(Z_i) + Emb_q(Q) + Emb_s(S)                                        [N, w]
    r̃_ij   = [r_ij / r_c, Bessel(|r_ij|)]      raw vector components + radial basis  [E, 3 + R]
    m_ij   = u(|r_ij|) · SiLU(A_l ĥ_i + B_l ĥ_j + F_l r̃_ij + b_l),  ĥ = LayerNorm(h)  [E, w]
    h_i   ← h_i + W_l Σ_j m_ij / √(1 + n_i),   n_i = Σ_j u(|r_ij|)                  [N, w]
    E_i    = MLP_E(h_i^L) (w → w/2 → 1),   F_i = MLP_F(h_i^L) · n_i / (1 + n_i)  (w → w/2 → 3)

``u`` is the polynomial envelope (``u, u', u''`` vanish at the cutoff ``r_c``), so energies and
direct forces are smooth as an atom crosses the cutoff; ``n_i`` is the envelope-weighted
neighbour count, a smooth version of the degree (the sum is scaled by ``1/√(1+n_i)`` so its
size does not grow with the number of neighbours). The direct force head is gated by
``n_i / (1 + n_i)``: an atom with no neighbour within the cutoff feels exactly zero force (an
ungated MLP would turn its element and charge/spin embedding into a force on an isolated atom),
and the gate, like ``n_i``, is smooth as a neighbour crosses the cutoff. The message is a two-layer MLP of
``(h_i, h_j, r_ij)`` whose first layer is split into node parts (``A ĥ``, ``B ĥ`` computed per
atom, then gathered) and whose second layer ``W_l`` runs after the sum: every ``w × w`` product
is per atom, per edge only ``(3 + R) · w`` multiply-adds and elementwise work remain. That keeps
the forward FLOPs per atom per parameter small, as in the paper's MPNN (κ = 2.33, against 28.09
for MC-EGNN): measured κ 3.67 at ``w = 128`` and 2.23 at ``w = 1024``
(``zoo.flops.report.model_report``, first 32 structures of the OMol25 sample, FMA = 2).

Width and parameter count
-------------------------
Width scales the hidden size of every layer; depth (4 layers), radial basis (16 Bessel
functions) and envelope stay fixed. Each layer holds ``3 w²`` weights and the two heads ``w²/2``
each, so ``N = 13 w² + 229 w``. The paper's MPNN counts fit ``N = 12 w² + 205.5 w + 4`` exactly
at even widths (``../shared/data/omol25_scaling_checkpoints.csv``); we do not have its code.

======  ============  ==============  ==========
width   N (ours)      N (paper)       ours/paper
======  ============  ==============  ==========
64      67,908
128     242,308       222,916         1.09
256     910,596       839,044         1.09
512     3,525,124     3,250,948       1.08
1024    13,865,988    12,793,348      1.08
2048    54,994,948    50,752,516      1.08
4096    219,041,796   202,168,324     1.08
======  ============  ==============  ==========

(``zoo.registry.count_parameters("mpnn", w)``, direct force head; the conservative model has no
force head and ``w²/2 + 2 w + 3`` fewer parameters.)
"""

from __future__ import annotations

import torch
from torch import nn

from datapipe import keys
from zoo.models.base import ForceField
from zoo.models.common import BesselBasis, ChargeSpinEmbedding, PolynomialEnvelope, mlp, scatter_sum
from zoo.models.precision import to_compute


class MPNNLayer(nn.Module):
    """One message-passing step ``h_i ← h_i + W_u Σ_j u_ij · SiLU(A ĥ_i + B ĥ_j + F r̃_ij + b) / √(1+n_i)``.

    Gilmer et al. 2017 (arXiv 1704.01212): eq. 1, the message ``M_t(h_i, h_j, e_ij)`` summed over
    neighbours, is a two-layer MLP ``W_u SiLU(W_1 [ĥ_i, ĥ_j, r̃_ij])`` whose second layer ``W_u``
    is applied after the sum (a linear map commutes with it), so every ``w × w`` product runs
    per atom and only ``F r̃_ij`` (``(3 + R) · w``) and elementwise work run per edge; eq. 2, the
    update ``U_t``, is the residual sum.

    Parameters
    ----------
    width : int
        Hidden size ``w``.
    edge_features : int
        Size of the raw edge features ``r̃_ij`` (3 vector components + ``R`` radial functions).
    """

    def __init__(self, width: int, edge_features: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.target = nn.Linear(width, width)  # A (and the bias b)
        self.source = nn.Linear(width, width, bias=False)  # B
        self.edge = nn.Linear(edge_features, width, bias=False)  # F
        self.update = nn.Linear(width, width)  # W_u
        self.act = nn.SiLU()

    def forward(
        self,
        h: torch.Tensor,
        edge_features: torch.Tensor,
        envelope: torch.Tensor,
        inverse_degree: torch.Tensor,
        source: torch.Tensor,
        target: torch.Tensor,
    ) -> torch.Tensor:
        """Update node features.

        Parameters
        ----------
        h : ``[N, w]`` node features. edge_features : ``[E, 3 + R]`` raw edge features ``r̃``.
        envelope : ``[E]`` smooth cutoff ``u``. inverse_degree : ``[N, 1]`` ``1/√(1+n_i)``.
        source, target : ``[E]`` atom indices (messages flow source → target).

        Returns
        -------
        ``[N, w]`` updated node features.
        """
        hn = self.norm(h)  # [N, w]
        pre = self.target(hn)[target] + self.source(hn)[source] + self.edge(edge_features)  # [E, w]
        messages = self.act(pre) * envelope.unsqueeze(-1)  # [E, w]
        aggregated = scatter_sum(messages, target, h.shape[0]) * inverse_degree  # [N, w]
        return h + self.update(aggregated)  # [N, w]


class MPNN(ForceField):
    """Unconstrained message-passing force field (the paper's MPNN baseline).

    Parameters
    ----------
    width : int
        Hidden size ``w`` of atom, edge and message features (the scaling knob).
    num_layers : int
        Message-passing steps; default 4 (receptive field 24 Å at the 6 Å cutoff).
    num_radial : int
        Bessel radial functions of the edge length; default 16.
    cutoff : float
        Graph radius, Å; default 6.
    direct_forces : bool
        True (default): forces from an MLP on the final node features, three Cartesian outputs,
        not equivariant. False: conservative forces ``−∂E/∂x`` (no force head is built).
    max_atomic_number : int
        Largest Z embedded; default 100.

    Notes
    -----
    ``interact`` maps ``atomic_numbers [N]``, ``edge_index [2, E]``, ``edge_vectors [E, 3]`` (Å),
    ``batch [N]``, ``charge [B]``, ``spin [B]`` to per-atom energies ``[N]`` and direct forces
    ``[N, 3]`` in normalised units. Energies and forces change under a rotation of the input:
    :func:`zoo.testing.rotation_error` measures by how much.
    """

    def __init__(
        self,
        width: int,
        *,
        num_layers: int = 4,
        num_radial: int = 16,
        cutoff: float = keys.DEFAULT_CUTOFF,
        direct_forces: bool = True,
        max_atomic_number: int = keys.MAX_ATOMIC_NUMBER,
    ) -> None:
        super().__init__(cutoff=cutoff, direct_forces=direct_forces, max_atomic_number=max_atomic_number)
        if width < 2 or num_layers < 1 or num_radial < 1:
            raise ValueError(f"need width ≥ 2, num_layers ≥ 1, num_radial ≥ 1; got {width}, {num_layers}, {num_radial}")
        self.atom_embedding = nn.Embedding(max_atomic_number + 1, width)
        self.charge_spin = ChargeSpinEmbedding(width)
        self.radial = BesselBasis(cutoff, num_radial)
        self.envelope = PolynomialEnvelope(cutoff)
        self.layers = nn.ModuleList(MPNNLayer(width, 3 + num_radial) for _ in range(num_layers))
        self.energy_head = mlp([width, width // 2, 1])
        self.force_head = mlp([width, width // 2, 3]) if direct_forces else None

    def interact(self, atomic_numbers, positions, edge_index, edge_vectors, batch, charge, spin, num_graphs):
        """Per-atom energies ``[N]`` and direct forces ``[N, 3]`` (or None), normalised units.

        See :meth:`zoo.models.base.ForceField.interact` for the arguments.
        """
        source, target = edge_index[0], edge_index[1]  # [E], [E]
        n_atoms = atomic_numbers.shape[0]
        compute = self.compute_dtype(edge_vectors.device)  # bf16 under --precision bf16
        # fp32 islands (zoo.models.precision): lengths, envelope, Bessel basis, the smooth degree
        lengths = edge_vectors.norm(dim=-1)  # [E] Å
        envelope = self.envelope(lengths)  # [E]
        edge_features = torch.cat([edge_vectors / self.cutoff, self.radial(lengths)], dim=-1)  # [E, 3 + R]
        degree = scatter_sum(envelope.unsqueeze(-1), target, n_atoms)  # [N, 1] smooth neighbour count
        inverse_degree = (1.0 + degree).rsqrt()  # [N, 1]
        edge_features, envelope, degree, inverse_degree = (
            to_compute(t, compute) for t in (edge_features, envelope, degree, inverse_degree))  # boundary

        h = self.atom_embedding(atomic_numbers) + self.charge_spin(charge, spin)[batch]  # [N, w]
        for layer in self.layers:
            h = layer(h, edge_features, envelope, inverse_degree, source, target)  # [N, w]
        node_energy = self.energy_head(h).squeeze(-1)  # [N]
        forces = None
        if self.force_head is not None:  # gated: exactly zero without a neighbour within the cutoff
            forces = self.force_head(h) * (degree * inverse_degree.square())  # [N, 3] · n/(1+n) [N, 1]
        return node_energy, forces
