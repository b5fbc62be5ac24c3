"""MC-EGNN: E(n)-equivariant graph network with multiple Cartesian vector channels per atom.

The EGNN of Satorras, Hoogeboom & Welling 2021 (arXiv 2102.09844, eqs. 3–6) generalised, as in
Levy et al. 2023 ("Using multiple vector channels improves E(n)-equivariant graph neural
networks", arXiv 2309.03139), from one coordinate per node to ``C`` vector channels per node.
The second rung of the symmetry ladder of arXiv 2510.09768: tensor order ℓ = 1, two-body
messages. Every operation is built from invariants (distances, inner products) and from linear
combinations of vectors with invariant coefficients, acting on the channel axis only, so the
model is E(3)-equivariant: energies are invariant and forces equivariant under rotations,
reflections, translations and permutations.

State of atom ``i``: scalars ``h_i`` ``[w]`` and vectors ``V_i`` ``[3, C]`` (translation-invariant
vectors, zero at the input; forces are vectors, not positions). One layer (``r_ij = x_j − x_i``,
``d_ij = |r_ij|``, ``r̂_ij = r_ij / d_ij``, ``u`` the smooth cutoff envelope)::

    s_ij  = [⟨V_i^c, r̂_ij⟩, ⟨V_j^c, r̂_ij⟩, ⟨V_i^c, V_j^c⟩]_c          [E, 3C] invariants
    m_ij  = u(d_ij) · φ_e(h_i, h_j, Bessel(d_ij), s_ij)                 [E, w]   (eq. 3)
    h_i  ← h_i + φ_h(h_i, Σ_j m_ij / √(1 + n_i), |V_i|)                [N, w]   (eq. 6)
    a_ij, b_ij = φ_x(m_ij)                                             [E, C] each
    ΔV_i  = Σ_j u(d_ij) (r̂_ij ⊗ a_ij + V_j ⊙ b_ij) / (1 + n_i)         [N, 3, C] (eq. 4)
    V_i  ← V_i + [ΔV_i, V_i] W_V                                       [N, 3, C]

with ``n_i = Σ_j u(d_ij)`` the envelope-weighted neighbour count. Heads: ``E_i = MLP(h_i)``
(``w → w/2 → 1``) and the direct force ``F_i = V_i w_F`` (``C → 1``, a linear combination of
the vector channels, hence equivariant).

Variance scaling. Satorras et al. average the coordinate update over neighbours (eq. 4, ``C =
1/(M−1)``); arXiv 2510.09768 notes the same ``1/E`` scaling is needed to stop gradients blowing
up as graphs grow. Here the vector update is divided by ``1 + n_i`` (a mean over neighbours:
its size does not grow with the number of edges) and the scalar update by ``√(1 + n_i)``;
channel mixing ``W_V`` has fan-in ``2C`` with PyTorch's ``1/√fan_in`` initialisation, so the
variance is also stable as channels grow. Using the smooth count ``n_i`` (not the integer degree)
keeps energies and forces smooth as an atom crosses the cutoff. Edge directions are unit vectors
``r̂`` (bounded, as the ``normalize`` option of the EGNN authors' code), so the update does not
grow with distance either.

Width and parameter count
-------------------------
Width ``w`` is the scalar hidden size. Vector channels ``C = max(4, w // 8)`` by default; depth
7 layers (Satorras et al.'s QM9 setting), 16 Bessel functions. Per layer ``φ_e`` (``2w + 16 + 3C
→ w → w``), ``φ_h`` (``2w + C → w → w``), ``φ_x`` (``w → w → 2C``): about ``7.8 w²``, so
``N ≈ 55 w²``. The paper's MC-EGNN is about twice as large per width (``N/w²`` from 114 at
``w = 96`` to 98 at ``w = 896``; ``../shared/data/omol25_scaling_checkpoints.csv``); we do
not have its code, and our count is quadratic in width as theirs is. Forward FLOPs per atom per
parameter, κ (``zoo.flops.report.model_report``, first 32 structures of the OMol25 sample, FMA = 2):
14.8 at ``w = 96``, 14.4 at ``w = 512``, against the paper's 28.09 — ``φ_e``'s first layer runs
its ``h_i``, ``h_j`` parts per atom (then gathers), which the original EGNN code runs per edge.

======  ============  ==============  =========
width   N (ours)      N (paper)       ours/paper
======  ============  ==============  =========
32      65,373
64      243,321
96      533,845       1,055,050       0.51
160     1,452,621     2,745,453       0.53
320     5,719,641     10,372,498      0.55
512     14,555,073    26,080,791      0.56
896     44,384,145    78,480,670      0.57
1024    57,929,601
======  ============  ==============  =========

(``zoo.registry.count_parameters("mc-egnn", w)``, direct force head; the conservative model has
no force head and no vector update in its last layer, whose output nothing reads: ``w² + (2C + 1) w
+ 2C² + 3C`` fewer parameters.)
"""

from __future__ import annotations

import torch
from torch import nn

from datapipe import keys
from zoo.models.base import ForceField
from zoo.models.common import BesselBasis, ChargeSpinEmbedding, PolynomialEnvelope, mlp, scatter_sum
from zoo.models.precision import to_compute


def safe_norm(vectors: torch.Tensor, dim: int, eps: float = 1e-6) -> torch.Tensor:
    """``√(|v|² + ε²) − ε`` along ``dim``: zero at ``v = 0`` with finite gradients there."""
    return (vectors.pow(2).sum(dim) + eps * eps).sqrt() - eps


class MCEGNNLayer(nn.Module):
    """One equivariant graph convolution with ``C`` vector channels (see the module docstring).

    Satorras et al. 2021 (arXiv 2102.09844) eqs. 3, 4 and 6, with the vector channels of Levy
    et al. 2023 (arXiv 2309.03139).

    Parameters
    ----------
    width : int
        Scalar hidden size ``w``.
    vector_channels : int
        Vector channels ``C``.
    num_radial : int
        Bessel functions of the edge length.
    update_vectors : bool
        False for a last layer whose vectors nothing reads (conservative model): the vector update
        ``φ_x``, ``W_V`` is not built, so every parameter receives a gradient.
    """

    def __init__(self, width: int, vector_channels: int, num_radial: int, update_vectors: bool = True) -> None:
        super().__init__()
        c = vector_channels
        # φ_e's first layer, split into node parts (gathered per edge) and the edge part
        self.edge_target = nn.Linear(width, width)
        self.edge_source = nn.Linear(width, width, bias=False)
        self.edge_invariants = nn.Linear(num_radial + 3 * c, width, bias=False)
        self.edge_out = nn.Sequential(nn.SiLU(), nn.Linear(width, width), nn.SiLU())
        self.node = mlp([2 * width + c, width, width])  # φ_h
        self.update_vectors = update_vectors
        if update_vectors:
            self.coefficients = mlp([width, width, 2 * c])  # φ_x → a_ij, b_ij
            self.mix = nn.Linear(2 * c, c, bias=False)  # W_V, acts on the channel axis only

    def forward(
        self,
        h: torch.Tensor,
        vectors: torch.Tensor,
        radial: torch.Tensor,
        directions: torch.Tensor,
        envelope: torch.Tensor,
        degree: torch.Tensor,
        source: torch.Tensor,
        target: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Update scalars and vectors.

        Parameters
        ----------
        h : ``[N, w]`` scalars. vectors : ``[N, 3, C]`` (Å-free, translation invariant).
        radial : ``[E, R]`` Bessel basis of ``d_ij``. directions : ``[E, 3]`` unit vectors
        ``r̂_ij`` (target i → source j). envelope : ``[E]`` ``u(d_ij)``. degree : ``[N, 1]``
        ``n_i``. source, target : ``[E]`` atom indices (messages flow source → target).

        Returns
        -------
        ``h`` ``[N, w]`` and ``vectors`` ``[N, 3, C]`` after the layer.
        """
        n_atoms = h.shape[0]
        v_i, v_j = vectors[target], vectors[source]  # [E, 3, C], [E, 3, C]
        d = directions.unsqueeze(-1)  # [E, 3, 1]
        invariants = torch.cat([(v_i * d).sum(1), (v_j * d).sum(1), (v_i * v_j).sum(1)], dim=-1)  # [E, 3C]
        pre = (
            self.edge_target(h)[target]
            + self.edge_source(h)[source]
            + self.edge_invariants(torch.cat([radial, invariants], dim=-1))
        )  # [E, w]
        messages = self.edge_out(pre) * envelope.unsqueeze(-1)  # [E, w]

        aggregated = scatter_sum(messages, target, n_atoms) * (1.0 + degree).rsqrt()  # [N, w]
        h = h + self.node(torch.cat([h, aggregated, safe_norm(vectors, dim=1)], dim=-1))  # [N, w]
        if not self.update_vectors:
            return h, vectors

        a, b = self.coefficients(messages).chunk(2, dim=-1)  # [E, C], [E, C]
        vector_messages = (d * a.unsqueeze(1) + v_j * b.unsqueeze(1)) * envelope.view(-1, 1, 1)  # [E, 3, C]
        update = scatter_sum(vector_messages, target, n_atoms) / (1.0 + degree).unsqueeze(-1)  # [N, 3, C]
        vectors = vectors + self.mix(torch.cat([update, vectors], dim=-1))  # [N, 3, C]
        return h, vectors


class MCEGNN(ForceField):
    """Multi-channel E(n)-equivariant GNN force field (the paper's MC-EGNN).

    Parameters
    ----------
    width : int
        Scalar hidden size ``w`` (the scaling knob).
    vector_channels : int or None
        Vector channels per atom ``C``; None (default) → ``max(4, width // 8)``.
    num_layers : int
        Equivariant layers; default 7 (Satorras et al. 2021, QM9 setting).
    num_radial : int
        Bessel radial functions of the edge length; default 16.
    cutoff : float
        Graph radius, Å; default 6.
    direct_forces : bool
        True (default): forces are a learned linear combination of the final vector channels
        (equivariant, not conservative). False: ``−∂E/∂x`` (no force head is built).
    max_atomic_number : int
        Largest Z embedded; default 100.

    Notes
    -----
    ``interact`` maps ``atomic_numbers [N]``, ``edge_index [2, E]``, ``edge_vectors [E, 3]`` (Å),
    ``batch [N]``, ``charge [B]``, ``spin [B]`` to per-atom energies ``[N]`` and direct forces
    ``[N, 3]`` in normalised units; both are E(3)-equivariant (energy invariant).
    """

    def __init__(
        self,
        width: int,
        *,
        vector_channels: int | None = None,
        num_layers: int = 7,
        num_radial: int = 16,
        cutoff: float = keys.DEFAULT_CUTOFF,
        direct_forces: bool = True,
        max_atomic_number: int = keys.MAX_ATOMIC_NUMBER,
    ) -> None:
        super().__init__(cutoff=cutoff, direct_forces=direct_forces, max_atomic_number=max_atomic_number)
        channels = max(4, width // 8) if vector_channels is None else int(vector_channels)
        if width < 2 or channels < 1 or num_layers < 1 or num_radial < 1:
            raise ValueError(
                f"need width ≥ 2, vector_channels ≥ 1, num_layers ≥ 1, num_radial ≥ 1; "
                f"got {width}, {channels}, {num_layers}, {num_radial}"
            )
        self.vector_channels = channels
        self.atom_embedding = nn.Embedding(max_atomic_number + 1, width)
        self.charge_spin = ChargeSpinEmbedding(width)
        self.radial = BesselBasis(cutoff, num_radial)
        self.envelope = PolynomialEnvelope(cutoff)
        self.layers = nn.ModuleList(
            MCEGNNLayer(width, channels, num_radial, update_vectors=direct_forces or index < num_layers - 1)
            for index in range(num_layers)
        )
        self.energy_head = mlp([width, width // 2, 1])
        self.force_head = nn.Linear(channels, 1, bias=False) if direct_forces else None

    def interact(self, atomic_numbers, positions, edge_index, edge_vectors, batch, charge, spin, num_graphs):
        """Per-atom energies ``[N]`` and direct forces ``[N, 3]`` (or None), normalised units.

        See :meth:`zoo.models.base.ForceField.interact` for the arguments.
        """
        source, target = edge_index[0], edge_index[1]  # [E], [E]
        n_atoms = atomic_numbers.shape[0]
        compute = self.compute_dtype(edge_vectors.device)  # bf16 under --precision bf16
        # fp32 islands (zoo.models.precision): lengths, directions (the l = 1 harmonics), envelope,
        # Bessel basis, the smooth degree
        lengths = edge_vectors.norm(dim=-1)  # [E] Å (> min_distance, checked by the base)
        directions = edge_vectors / lengths.unsqueeze(-1)  # [E, 3]
        envelope = self.envelope(lengths)  # [E]
        radial = self.radial(lengths)  # [E, R]
        degree = scatter_sum(envelope.unsqueeze(-1), target, n_atoms)  # [N, 1] smooth neighbour count
        radial, directions, envelope, degree = (to_compute(t, compute) for t in (radial, directions, envelope, degree))

        h = self.atom_embedding(atomic_numbers) + self.charge_spin(charge, spin)[batch]  # [N, w]
        vectors = h.new_zeros(n_atoms, 3, self.vector_channels)  # [N, 3, C]
        for layer in self.layers:
            h, vectors = layer(h, vectors, radial, directions, envelope, degree, source, target)
        node_energy = self.energy_head(h).squeeze(-1)  # [N]
        forces = self.force_head(vectors).squeeze(-1) if self.force_head is not None else None  # [N, 3]
        return node_energy, forces
