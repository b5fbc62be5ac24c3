"""GemNet-OC: invariant two-, three- and four-body message passing (Gasteiger et al. 2022).

Implements GemNet-OC (arXiv 2204.02782), built on GemNet (arXiv 2106.08903), as a
:class:`zoo.models.base.ForceField`:

- four interaction graphs built inside the model from positions and ``batch``
  (:mod:`zoo.models.gemnet_oc.graph`): the *main* graph (``cutoff``, the batch's own edges), and the
  quadruplet (``cutoff_qint``), atom-to-edge/edge-to-atom (``cutoff_aeaint``) and atom-to-atom
  (``cutoff_aint``) graphs rebuilt from positions with their own cutoffs (uncapped radius graph),
  then each limited to its ``max_neighbors_*`` nearest neighbours per atom — GemNet-OC's own
  hyperparameters (fairchem's OC20 values 30 / 8 / 20 / none), explicit and documented, never a
  silent cap of the data graph;
- bases: Gaussian radial basis × polynomial envelope, angles through Legendre polynomials of
  their cosines (real spherical harmonics with m = 0: ``cbf``), dihedrals through the outer
  product ``Y_l^0(∠cab) · Y_m^0(dihedral)`` (``sbf``, fairchem's ``legendre_outer``);
- interaction blocks with edge-to-edge (triplets, quadruplets), atom-to-edge, edge-to-atom and
  atom-to-atom messages (:mod:`zoo.models.gemnet_oc.interactions`), output blocks after the embedding
  and after every interaction block, concatenated into an energy MLP (per atom) and a force MLP
  (per edge);
- direct forces ``F_a = Σ_c f_ca · (pos_c − pos_a)/d_ca`` (E(3)-equivariant by construction), or
  conservative forces by ``direct_forces=False``;
- fitted scale factors (:func:`zoo.models.gemnet_oc.blocks.fit_scale_factors`); charge and spin
  multiplicity through :class:`zoo.models.common.ChargeSpinEmbedding` added to the atom embeddings.

Energies are E(3)-invariant (distances and cosines only; the dihedral enters through its cosine,
so reflections leave it unchanged).

Width
-----
``width`` is ``emb_size_atom``. The other sizes follow fixed ratios of it, those of fairchem's
OC20 configuration at ``emb_size_atom = 256`` (trip 64, quad 32, aint 64, rbf 16, cbf 16, sbf 32),
except the edge size, which equals the width (fairchem: 2×) — this matches the paper's
parameter counts (arXiv 2510.09768, ``omol25_scaling_checkpoints.csv``) far better, see the
table (N from ``zoo.registry.count_parameters``). The paper's N is exactly
``194 w² + 885 w + 86016`` (exact at its widths 32–320), i.e. its sub-sizes do not grow with
the width; ours do (the bilinear layers grow as w³), hence the growing gap above 256. Sizes never
go below 4. Depth (4 blocks), ``num_radial`` 128 and ``num_spherical`` 7 are fixed (fairchem
defaults).

=====  ==========================  =========================
width  N (this implementation)     N (arXiv 2510.09768 runs)
=====  ==========================  =========================
32     298,816                     312,992
64     1,067,648                   937,280
128    4,174,336                   3,377,792
256    16,947,200                  13,026,560
512    71,827,456                  —
1024   323,698,688                 —
=====  ==========================  =========================

Usage
-----
>>> from datapipe.graph import batch_from_atoms
>>> from zoo.models.gemnet_oc.blocks import fit_scale_factors
>>> from zoo.registry import build
>>> from zoo.testing import water_cluster
>>> model = build("gemnet-oc", width=16, num_blocks=1)
>>> batches = [batch_from_atoms([water_cluster(3, seed=s)], cutoff=model.data_cutoff) for s in range(2)]
>>> scales = fit_scale_factors(model, batches)   # once, before training (the launcher: a few training batches)
>>> len(scales), all(s > 0 for s in scales.values())
(15, True)

Simplifications against fairchem: no periodic boundaries, no ``qint_tags`` (all atoms take part
in quadruplets), no per-block gradient scaling of the shared basis layers, no ``forces_coupled``;
the main graph's neighbour limit keeps a pair when either direction is among the k nearest.
"""

from __future__ import annotations

import torch
from torch import nn

from datapipe import keys
from zoo.models.base import ForceField
from zoo.models.common import ChargeSpinEmbedding, gather, scatter_sum
from zoo.models.gemnet_oc.blocks import BasisEmbedding, Dense, RadialBasis, ResidualLayer, legendre_basis, run_scaled
from zoo.models.gemnet_oc.graph import (
    Graph,
    build_radius_graph,
    graph_from_edges,
    quadruplets,
    reverse_edges,
    scaled_normals,
    subgraph,
    symmetric_knn_mask,
    triplets,
)
from zoo.models.gemnet_oc.interactions import EdgeEmbedding, InteractionBlock, OutputBlock, cab_plan
from zoo.models.gemnet_oc.sparse import OuterPlan, share_index_maps
from zoo.models.precision import to_compute

#: size of each embedding as a fraction of the width (emb_size_atom); fairchem OC20 ratios at 256
SIZE_RATIOS = {
    "atom": 1.0,
    "edge": 1.0,
    "trip_in": 0.25,
    "trip_out": 0.25,
    "quad_in": 0.125,
    "quad_out": 0.125,
    "aint_in": 0.25,
    "aint_out": 0.25,
    "rbf": 0.0625,
    "cbf": 0.0625,
    "sbf": 0.125,
}


def embedding_sizes(width: int) -> dict[str, int]:
    """Every embedding size at ``width``: ``max(4, round(ratio · width))``."""
    return {name: max(4, round(ratio * width)) for name, ratio in SIZE_RATIOS.items()}


class GemNetOC(ForceField):
    """GemNet-OC force field (arXiv 2204.02782).

    Parameters
    ----------
    width : int
        ``emb_size_atom``; every other size follows :data:`SIZE_RATIOS`.
    num_blocks : int
        Interaction blocks (4, fairchem's OC20 default).
    num_radial, num_spherical : int
        Gaussians of the radial bases (128) and Legendre orders of the angular bases (7).
    cutoff : float
        Main (embedding) graph, Å (6.0; the batch's own graph, filtered by the base class).
    cutoff_qint, cutoff_aeaint, cutoff_aint : float
        Quadruplet, atom-to-edge/edge-to-atom and atom-to-atom graphs, Å (8.0 each, a CPU-friendly
        default; the GemNet-OC paper and docs/DESIGN.md use 10–12 Å). Rebuilt from positions.
    max_neighbors, max_neighbors_qint, max_neighbors_aeaint, max_neighbors_aint : int or None
        Neighbours kept per atom in each graph (nearest first; ties kept). ``None`` = uncapped.
        Defaults 30 / 8 / 20 / None: fairchem's OC20 GemNet-OC values (aint: 1000 there).
    direct_forces : bool
        Direct force head (default, the paper's choice) or ``−∂E/∂positions``.
    max_atomic_number : int
        Largest element embedded.

    Raises
    ------
    ValueError
        for non-positive sizes or cutoffs, or a main cutoff above the other graphs' cutoffs.
    """

    #: read by ForceField.enable_compile and the launcher's --compile (docs/compile.md)
    compile_refusal = (
        "its forward builds the interaction graphs (a radius graph through vesin/NumPy, triplets and "
        "quadruplets whose sizes depend on the data), which dynamo cannot trace: 83 graph breaks in one "
        "forward (torch._dynamo.explain, torch 2.13), so the compiled model would run as ~84 small graphs, "
        "recompiled as sizes change; train GemNet-OC eagerly"
    )

    def __init__(
        self,
        width: int,
        *,
        num_blocks: int = 4,
        num_radial: int = 128,
        num_spherical: int = 7,
        cutoff: float = keys.DEFAULT_CUTOFF,
        cutoff_qint: float = 8.0,
        cutoff_aeaint: float = 8.0,
        cutoff_aint: float = 8.0,
        max_neighbors: int | None = 30,
        max_neighbors_qint: int | None = 8,
        max_neighbors_aeaint: int | None = 20,
        max_neighbors_aint: int | None = None,
        direct_forces: bool = True,
        max_atomic_number: int = keys.MAX_ATOMIC_NUMBER,
    ) -> None:
        super().__init__(cutoff=cutoff, direct_forces=direct_forces, max_atomic_number=max_atomic_number)
        if width < 1 or num_blocks < 1 or num_radial < 1 or num_spherical < 2:
            raise ValueError("width, num_blocks, num_radial ≥ 1 and num_spherical ≥ 2 are required")
        if min(cutoff, cutoff_qint, cutoff_aeaint, cutoff_aint) <= 0:
            raise ValueError("cutoffs must be positive")
        for k in (max_neighbors, max_neighbors_qint, max_neighbors_aeaint, max_neighbors_aint):
            if k is not None and k < 1:
                raise ValueError(f"max_neighbors must be None or ≥ 1, got {k}")
        self.cutoff_qint, self.cutoff_aeaint, self.cutoff_aint = float(cutoff_qint), float(cutoff_aeaint), float(cutoff_aint)
        self.max_neighbors, self.max_neighbors_qint = max_neighbors, max_neighbors_qint
        self.max_neighbors_aeaint, self.max_neighbors_aint = max_neighbors_aeaint, max_neighbors_aint
        self.graph_cutoffs = tuple(sorted({self.cutoff, self.cutoff_qint, self.cutoff_aeaint, self.cutoff_aint}))
        self.num_blocks, self.num_spherical = num_blocks, num_spherical
        self.sizes = sizes = embedding_sizes(width)
        a, e, r, c, s = (sizes[k] for k in ("atom", "edge", "rbf", "cbf", "sbf"))
        R, S = num_radial, num_spherical

        # radial bases of each graph (Gaussians × envelope at that graph's cutoff)
        self.radial_main = RadialBasis(self.cutoff, R)
        self.radial_qint = RadialBasis(self.cutoff_qint, R)
        self.radial_aeaint = RadialBasis(self.cutoff_aeaint, R)
        self.radial_aint = RadialBasis(self.cutoff_aint, R)
        # basis projections shared by all blocks (fairchem's init_shared_basis_layers)
        self.mlp_rbf_tint, self.mlp_cbf_tint = Dense(R, r, activation=False), BasisEmbedding(R, c, S)
        self.mlp_rbf_qint, self.mlp_cbf_qint = Dense(R, r, activation=False), BasisEmbedding(R, c, S)
        self.mlp_sbf_qint = BasisEmbedding(R, s, S * S)
        self.mlp_rbf_aeint, self.mlp_cbf_aeint = Dense(R, r, activation=False), BasisEmbedding(R, c, S)
        self.mlp_rbf_eaint, self.mlp_cbf_eaint = Dense(R, r, activation=False), BasisEmbedding(R, c, S)
        self.mlp_rbf_aint = BasisEmbedding(R, r)
        self.mlp_rbf_h, self.mlp_rbf_out = Dense(R, r, activation=False), Dense(R, r, activation=False)

        self.atom_embedding = nn.Embedding(self.max_atomic_number + 1, a)
        if not self.atom_embedding.weight.is_meta:
            nn.init.uniform_(self.atom_embedding.weight, -(3**0.5), 3**0.5)
        self.charge_spin = ChargeSpinEmbedding(a)
        self.edge_embedding = EdgeEmbedding(a, R, e)
        self.int_blocks = nn.ModuleList(InteractionBlock(sizes, S) for _ in range(num_blocks))
        self.out_blocks = nn.ModuleList(
            OutputBlock(a, e, r, num_residual=3, num_after_atom=3, direct_forces=self.direct_forces)
            for _ in range(num_blocks + 1)
        )
        self.out_mlp_E = nn.Sequential(Dense(a * (num_blocks + 1), a), ResidualLayer(a), ResidualLayer(a))
        self.out_energy = Dense(a, 1, activation=False)
        if self.direct_forces:
            self.out_mlp_F = nn.Sequential(Dense(e * (num_blocks + 1), e), ResidualLayer(e), ResidualLayer(e))
            self.out_forces = Dense(e, 1, activation=False)

    # ------------------------------------------------------------------------------------------
    def graphs(self, positions: torch.Tensor, edge_index: torch.Tensor, batch: torch.Tensor) -> dict:
        """The four graphs and their triplet/quadruplet indices (see :mod:`zoo.models.gemnet_oc.graph`)."""
        n = positions.shape[0]
        main = graph_from_edges(positions, edge_index)
        if self.max_neighbors is not None:
            main = main.select(symmetric_knn_mask(main, reverse_edges(main.edge_index, n), n, self.max_neighbors))
        big = build_radius_graph(positions, batch, max(self.cutoff_qint, self.cutoff_aeaint, self.cutoff_aint))
        qint = subgraph(big, self.cutoff_qint, self.max_neighbors_qint, n)
        aeaint = subgraph(big, self.cutoff_aeaint, self.max_neighbors_aeaint, n)
        aint = subgraph(big, self.cutoff_aint, self.max_neighbors_aint, n)
        g = {
            "big": big,
            "main": main,
            "qint": qint,
            "aeaint": aeaint,
            "aint": aint,
            "reverse": reverse_edges(main.edge_index, n),
            "trip_e2e": triplets(main, main, n),
            "trip_a2e": triplets(aeaint, main, n),
            "trip_e2a": triplets(main, aeaint, n),
            "quad": quadruplets(main, qint, n),
        }
        # the sums Σ basis ⊗ message of every block, indexed once per batch (zoo.models.gemnet_oc.sparse)
        S, quad, t_out = self.num_spherical, g["quad"], g["quad"]["trip_out"]
        # K products of [T] maps rather than one of [T·K] maps where the messages are narrow (sparse.py;
        # measured at width 64, 16 channels: the same products, maps 5.6 → 1.2 ms per step; at 56 the
        # single product was 2× faster)
        narrow = self.sizes["trip_in"] <= 16
        g["plans"] = {
            "e2e": OuterPlan(g["trip_e2e"]["out"], g["trip_e2e"]["in"], S, main.num_edges, main.num_edges, by_order=narrow),
            "a2e": OuterPlan(g["trip_a2e"]["out"], g["trip_a2e"]["in"], S, main.num_edges, aeaint.num_edges, by_order=narrow),
            "e2a": OuterPlan(g["trip_e2a"]["out"], g["trip_e2a"]["in"], S, aeaint.num_edges, main.num_edges, by_order=narrow),
            "quad": OuterPlan(quad["quad_out"], quad["quad_in"], S, t_out["out"].numel(),
                              quad["trip_in"]["in"].numel(), by_order=True),  # maps of [Q], not [Q·S]
            "cab": cab_plan(t_out["out"], S, main.num_edges),
            "aint": OuterPlan(aint.target, aint.source, self.sizes["rbf"], n, n),
        }
        share_index_maps(g["plans"].values())  # plans of the same structure build their CSR maps once
        return g

    def bases(self, g: dict) -> dict:
        """Radial, circular and spherical bases, projected by the shared layers."""
        main, qint, aeaint, aint = g["main"], g["qint"], g["aeaint"], g["aint"]
        S = self.num_spherical
        # fp32 islands (zoo.models.precision): distances, unit vectors, cosines, radial and Legendre
        # bases; each is cast to the compute dtype where a learned projection takes it
        c = self.compute_dtype(main.distance.device)
        rbf_main = to_compute(self.radial_main(main.distance), c)  # [E, R]
        if self.cutoff_qint == self.cutoff_aeaint == self.cutoff_aint:
            # one radial basis of the big graph, rows picked for each sub-graph (the same function)
            rbf_big = self.radial_aint(g["big"].distance)  # [E_big, R]
            rbf_qint, rbf_aeaint, rbf_aint = (rbf_big.index_select(0, sub.origin) for sub in (qint, aeaint, aint))
        else:
            rbf_qint, rbf_aeaint = self.radial_qint(qint.distance), self.radial_aeaint(aeaint.distance)
            rbf_aint = self.radial_aint(aint.distance)
        rbf_qint, rbf_aeaint, rbf_aint = (to_compute(r, c) for r in (rbf_qint, rbf_aeaint, rbf_aint))

        def angular(cosine):  # [T] → [T, S], rows (the sums gather their CSR values from rows)
            return to_compute(legendre_basis(cosine, S), c)

        def circular(trip, u_in, u_out):  # cosine of the angle at the shared atom a
            return angular((gather(u_in, trip["in"]) * gather(u_out, trip["out"])).sum(-1))  # [T, S]

        out = {
            "e2e_rad": self.mlp_rbf_tint(rbf_main),  # [E, r]
            "e2e_cir": (self.mlp_cbf_tint(rbf_main), circular(g["trip_e2e"], main.unit, main.unit)),
            "a2e_rad": self.mlp_rbf_aeint(rbf_aeaint),  # [E_ae, r]
            "a2e_cir": (self.mlp_cbf_aeint(rbf_main), circular(g["trip_a2e"], aeaint.unit, main.unit)),
            "e2a_rad": self.mlp_rbf_eaint(rbf_main),  # [E, r]
            "e2a_cir": (self.mlp_cbf_eaint(rbf_aeaint), circular(g["trip_e2a"], main.unit, aeaint.unit)),
            "a2a_rad": self.mlp_rbf_aint(rbf_aint),  # [E_aint, r]
            "atom_rad": self.mlp_rbf_h(rbf_main),  # [E, r]
            "out_rad": self.mlp_rbf_out(rbf_main),  # [E, r]
            "rbf_main": rbf_main,  # [E, R], also the edge embedding's input
        }
        # quadruplets d → b → a ← c: unit vectors point from an edge's target to its source
        quad, t_in, t_out = g["quad"], g["quad"]["trip_in"], g["quad"]["trip_out"]
        u_ba = gather(qint.unit, t_in["out"])  # [T_in, 3] (pos_b − pos_a)/d
        u_db = gather(main.unit, t_in["in"])  # [T_in, 3] (pos_d − pos_b)/d
        cos_abd = -(u_ba * u_db).sum(-1)  # [T_in] angle at b between a and d
        rad_ba = gather(self.mlp_cbf_qint(rbf_qint), t_in["out"])  # [T_in, cbf, S]
        out["q_cbf"] = (rad_ba @ to_compute(legendre_basis(cos_abd, S), c).unsqueeze(-1)).squeeze(-1)  # [T_in, cbf]
        out["q_rad"] = self.mlp_rbf_qint(rbf_main)  # [E, r] of d_db
        u_ca, u_ab = gather(main.unit, t_out["out"]), gather(qint.unit, t_out["in"])  # [T_out, 3] from a to c, a to b
        cos_cab = (u_ca * u_ab).sum(-1)  # [T_out]
        normal_cab = torch.cross(-u_ca, u_ab, dim=-1)  # [T_out, 3] (a − c) × (b − a)
        normal_abd = torch.cross(u_ba, u_db, dim=-1)  # [T_in, 3]  (b − a) × (d − b)
        # safe_cosine of the normals, each normal scaled once per triplet rather than once per quadruplet
        n_cab, n_abd = scaled_normals(normal_cab), scaled_normals(normal_abd)  # [T_out, 3], [T_in, 3]
        cos_dihedral = (gather(n_cab, quad["quad_out"]) * gather(n_abd, quad["quad_in"])).sum(-1).clamp(-1.0, 1.0)  # [Q]
        out["q_sbf"] = (
            self.mlp_sbf_qint(rbf_main),  # [E, sbf, S²]
            angular(cos_cab),  # [T_out, S]
            angular(cos_dihedral),  # [Q, S]
        )
        return out

    # ------------------------------------------------------------------------------------------
    def interact(self, atomic_numbers, positions, edge_index, edge_vectors, batch, charge, spin, num_graphs):
        """Per-atom energies ``[N]`` and direct forces ``[N, 3]`` (or None), normalised units."""
        n = positions.shape[0]
        g = self.graphs(positions, edge_index, batch)
        main: Graph = g["main"]
        b = self.bases(g)

        h = self.atom_embedding(atomic_numbers) + self.charge_spin(charge, spin)[batch]  # [N, A]
        m = self.edge_embedding(h, b["rbf_main"], main.edge_index)  # [E, C]
        x_e, x_f = self.out_blocks[0](h, m, b["out_rad"], main.target, n)
        xs_e, xs_f = [x_e], [x_f]
        for block, out_block in zip(self.int_blocks, self.out_blocks[1:]):
            h, m = block(h, m, b, g)  # [N, A], [E, C]
            x_e, x_f = out_block(h, m, b["out_rad"], main.target, n)
            xs_e.append(x_e)
            xs_f.append(x_f)

        energy = self.out_energy(self.out_mlp_E(torch.cat(xs_e, dim=-1))).squeeze(-1)  # [N]
        if not self.direct_forces:
            return energy, None
        v, k = run_scaled(self.out_mlp_F, torch.cat(xs_f, dim=-1))  # out_mlp_F(·) = k·v  [E, C]
        f_ca = self.out_forces.scaled(v, k)[0]  # [E, 1]
        forces = scatter_sum(f_ca * main.unit, main.target, n)  # [N, 3]
        return energy, forces
