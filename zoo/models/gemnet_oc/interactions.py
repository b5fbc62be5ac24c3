"""Message-passing blocks of GemNet-OC (Gasteiger et al. 2022, arXiv 2204.02782, Fig. 2 and 3).

An interaction block updates the edge embeddings ``m_ca`` (main graph) and atom embeddings
``h_a`` from four kinds of messages:

- edge-to-edge through triplets ``b → a ← c`` (two-body + angle, GemNet eq. 7),
- edge-to-edge through quadruplets ``d → b → a ← c`` (+ dihedral, GemNet eq. 8),
- atom-to-edge (atom ``b`` → main edge ``c → a`` via the angle ``∠cab``),
- edge-to-atom (main edge ``c → a`` → atom ``b`` via ``∠cba``) and atom-to-atom (radial).

Every bilinear layer sums ``basis ⊗ message`` over a neighbourhood with
:func:`zoo.models.gemnet_oc.sparse.outer_sum` (one sparse × dense product per block; the index
plans are built once per batch, :class:`~zoo.models.gemnet_oc.sparse.OuterPlan`) and is followed by
a fitted :class:`ScaleFactor`.
Constant factors are folded (exact up to round-off): each layer's ``silu(·)/0.6``, the residual
layers' ``1/√2``, the ``1/2``, ``1/√2`` of the sums and the fitted scale factors are carried as a
Python float beside an unscaled tensor (``(v, k)`` with value ``k·v``: the ``messages`` and
``scaled`` methods, :func:`~zoo.models.gemnet_oc.blocks.run_scaled`) and multiplied into the next
weight, not applied as a pass over ``[E, C]``; the four layers reading ``m`` at the start of a block
run as one product, the two up projections of a symmetric message as another. While a scale
factor is fitted, the product it records is formed as before (same fitted scales, tested).
Shapes: ``N`` atoms, ``E`` main edges, ``T`` triplets, ``Q`` quadruplets.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from zoo.models.common import gather, scatter_sum
from zoo.models.gemnet_oc.activation import silu  # SiLU with hand-written derivatives (conservative forces)
from zoo.models.gemnet_oc.blocks import Dense, ResidualLayer, ScaleFactor, dense_stack, linear, run_scaled
from zoo.models.gemnet_oc.sparse import OuterPlan, outer_sum

INV_SQRT_2 = 1.0 / math.sqrt(2.0)


def scaled_product(factor: ScaleFactor, act: torch.Tensor, k: float, rad: torch.Tensor,
                   weight: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """``factor((k·act) ⊙ linear(rad, weight), ref=k·act)`` ``[rows, C]``, with ``k`` and the fitted scale
    folded into the (small) weight ``[C, emb_rbf]``: one elementwise pass instead of three. While the
    factor is being fitted, the product it records is formed as before."""
    if factor.fitting:
        return factor(act * linear(rad, weight * k), ref=lambda: act * k)
    return act * linear(rad, weight * (factor.scale * k))  # [rows, C]


def up_projections(x: torch.Tensor, ca: Dense, ac: Dense, reverse: torch.Tensor) -> torch.Tensor:
    """``v`` ``[E, C]`` with ``(ca(x) + ac(x)[reverse]) / √2 = v / (0.6·√2)``: both layers in one product
    (they read the same ``x``) and one activation pass, their 1/0.6 and the 1/√2 left to the caller."""
    out = ca.linear.weight.shape[0]
    both = silu(linear(x, torch.cat([ca.linear.weight, ac.linear.weight])))  # [E, 2C]
    v_ca, v_ac = both.split(out, dim=1)
    return v_ca + gather(v_ac, reverse)  # [E, C]


class TripletInteraction(nn.Module):
    """Triplet message passing ``x_ba ⊗ (rbf(d_ca) ⊗ cbf(∠cab)) → m_ca``.

    ``symmetric``: the result updates both ``c → a`` and its counter-edge ``a → c`` (GemNet-OC
    "symmetric message passing"); otherwise it is optionally moved to the counter-edge
    (``swap_output``). With ``to_atoms``, the per-out-edge results are summed once more onto the
    out-edges' target atoms (edge-to-atom interaction).
    """

    def __init__(self, emb_in: int, emb_out: int, trip_in: int, trip_out: int, emb_rbf: int, emb_cbf: int,
                 symmetric: bool, swap_output: bool) -> None:  # fmt: skip
        super().__init__()
        self.symmetric, self.swap_output = symmetric, swap_output
        self.dense_ba = Dense(emb_in, emb_in)
        self.mlp_rbf = Dense(emb_rbf, emb_in, activation=False)
        self.scale_rbf = ScaleFactor()
        self.bilinear = Dense(emb_cbf * trip_in, trip_out, activation=False)
        self.scale_cbf_sum = ScaleFactor()
        self.down_projection = Dense(emb_in, trip_in)
        self.up_projection_ca = Dense(trip_out, emb_out)
        self.up_projection_ac = Dense(trip_out, emb_out) if symmetric else None

    def forward(self, m: torch.Tensor, rad: torch.Tensor, cir: tuple[torch.Tensor, torch.Tensor],
                trip: OuterPlan, reverse: torch.Tensor | None, expand: torch.Tensor | None = None,
                to_atoms: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:  # fmt: skip
        """
        m : ``[E_in', C_in]`` input embeddings (edges, or atoms gathered by ``expand``).
        rad : ``[E_in, emb_rbf]`` radial embedding of the in-edges.
        cir : (``[E_out, emb_cbf, S]`` radial weights of the out-edges, ``[T, S]`` angular basis).
        trip : the triplets' plan (``out`` the out-edge, ``inp`` the in-edge of each triplet).
        reverse : ``[E_out]`` counter-edges.
        Returns ``[E_out, emb_out]`` (or ``[N, emb_out]`` with ``to_atoms``).
        """
        v, k = self.messages(m, rad, cir, trip, reverse, expand, to_atoms)
        return v * k

    def messages(self, m: torch.Tensor, rad: torch.Tensor, cir: tuple[torch.Tensor, torch.Tensor],
                 trip: OuterPlan, reverse: torch.Tensor | None, expand: torch.Tensor | None = None,
                 to_atoms: tuple[torch.Tensor, int] | None = None,
                 act: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:  # fmt: skip
        """``(v, k)`` with ``forward(...) = k·v``; ``act`` = ``silu(m W_baᵀ)`` (0.6 · ``dense_ba(m)``) when
        the caller computed it (:class:`InteractionBlock`: one product for all layers reading ``m``).
        Every 1/0.6 and fitted scale is folded into the next weight (exact up to round-off)."""
        rad_w, sph = cir
        if act is None:
            act = silu(linear(m, self.dense_ba.linear.weight))  # [E_in', C_in]
        if expand is not None:
            act = gather(act, expand)  # [E_in, C_in]
        x = scaled_product(self.scale_rbf, act, 1.0 / 0.6, rad, self.mlp_rbf.linear.weight)  # [E_in, C_in]
        x_in = silu(linear(x, self.down_projection.linear.weight))  # [E_in, trip_in], 0.6 · down_projection(x)
        y = outer_sum(sph, x_in, trip)  # [E_out, S, trip_in]  (Σ over triplets of sph ⊗ x_in[in])
        z = (rad_w @ y).flatten(1)  # [E_out, emb_cbf · trip_in]
        if to_atoms is not None:
            z = scatter_sum(z, to_atoms[0], to_atoms[1])  # [N, emb_cbf · trip_in]
        weight = self.bilinear.linear.weight  # [trip_out, emb_cbf · trip_in]
        if self.scale_cbf_sum.fitting:
            ref = lambda: gather(x_in, trip.inp) * (1.0 / 0.6)  # noqa: E731  built only while fitting
            x = self.scale_cbf_sum(linear(z, weight * (1.0 / 0.6)), ref=ref)
        else:
            x = linear(z, weight * (self.scale_cbf_sum.scale / 0.6))  # [E_out or N, trip_out]
        if self.symmetric:
            return up_projections(x, self.up_projection_ca, self.up_projection_ac, reverse), INV_SQRT_2 / 0.6
        if self.swap_output:
            x = gather(x, reverse)
        return silu(linear(x, self.up_projection_ca.linear.weight)), 1.0 / 0.6  # [E_out or N, emb_out]


def cab_plan(out: torch.Tensor, num_spherical: int, num_edges: int) -> OuterPlan:
    """Plan of the quadruplet sum's second stage (Σ over ``b`` per edge ``c → a``): input row ``t`` of the
    first stage's ``[T_out, S·C]`` sums goes to ``out[t]`` ``[T_out]`` (sorted; the edge ``c → a`` of each
    triplet ``b → a ← c``), basis ``[T_out, S]`` (the angle ∠cab)."""
    t = out.numel()
    return OuterPlan(out, torch.arange(t, device=out.device), num_spherical, num_edges, t)


class QuadrupletInteraction(nn.Module):
    """Quadruplet message passing ``m_db → (ba) → m_ca`` with rbf(d_db), cbf(d_ba, ∠abd) and the
    spherical basis sbf(d_ca, ∠cab, dihedral c-a-b-d).

    The spherical basis is GemNet-OC's ``legendre_outer``: ``Y_l^0(∠cab) · Y_m^0(dihedral)``. It
    factorises, so the sum over quadruplets runs in two stages: over ``d`` per triplet
    ``b → a ← c`` (dihedral part), then over ``b`` per edge ``c → a`` (angle part) — the same sum,
    without a ``[Q, S²]`` tensor.
    """

    def __init__(self, emb_edge: int, quad_in: int, quad_out: int, emb_rbf: int, emb_cbf: int, emb_sbf: int,
                 num_spherical: int) -> None:  # fmt: skip
        super().__init__()
        self.dense_db = Dense(emb_edge, emb_edge)
        self.mlp_rbf = Dense(emb_rbf, emb_edge, activation=False)
        self.scale_rbf = ScaleFactor()
        self.mlp_cbf = Dense(emb_cbf, quad_in, activation=False)
        self.scale_cbf = ScaleFactor()
        self.bilinear = Dense(emb_sbf * quad_in, quad_out, activation=False)
        self.scale_sbf_sum = ScaleFactor()
        self.down_projection = Dense(emb_edge, quad_in)
        self.up_projection_ca = Dense(quad_out, emb_edge)
        self.up_projection_ac = Dense(quad_out, emb_edge)
        self.num_spherical = num_spherical

    def forward(self, m: torch.Tensor, rad: torch.Tensor, cbf: torch.Tensor, sbf: tuple[torch.Tensor, ...],
                quad: dict, plans: tuple[OuterPlan, OuterPlan], reverse: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """
        m : ``[E, C]``. rad : ``[E, emb_rbf]`` (of d_db). cbf : ``[T_in, emb_cbf]`` (d_ba, ∠abd).
        sbf : (``[E, emb_sbf, S²]`` radial weights of d_ca, ``[T_out, S]`` of ∠cab, ``[Q, S]`` of the
        dihedral). quad : indices from :func:`zoo.models.gemnet_oc.graph.quadruplets`. plans : of the
        sum over quadruplets per trip_out and of the sum over trip_out per edge. Returns ``[E, C]``.
        """
        v, k = self.messages(m, rad, cbf, sbf, quad, plans, reverse)
        return v * k

    def messages(self, m: torch.Tensor, rad: torch.Tensor, cbf: torch.Tensor, sbf: tuple[torch.Tensor, ...],
                 quad: dict, plans: tuple[OuterPlan, OuterPlan], reverse: torch.Tensor,
                 act: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:  # fmt: skip
        """``(v, k)`` with ``forward(...) = k·v``; ``act`` = ``silu(m W_dbᵀ)`` if the caller computed it
        (see :meth:`TripletInteraction.messages`)."""
        rad_w, sph_cab, sph_dihedral = sbf
        s = self.num_spherical
        if act is None:
            act = silu(linear(m, self.dense_db.linear.weight))  # [E, C], 0.6 · dense_db(m)
        x = scaled_product(self.scale_rbf, act, 1.0 / 0.6, rad, self.mlp_rbf.linear.weight)  # [E, C]
        x = gather(silu(linear(x, self.down_projection.linear.weight)), quad["trip_in"]["in"])  # [T_in, quad_in]
        x = scaled_product(self.scale_cbf, x, 1.0 / 0.6, cbf, self.mlp_cbf.linear.weight)  # [T_in, quad_in]
        plan_quad, plan_cab = plans
        num_edges, c = rad_w.shape[0], x.shape[-1]
        z = outer_sum(sph_dihedral, x, plan_quad)  # [T_out, S, quad_in]  (Σ over d), as it lies
        y = outer_sum(sph_cab, z.flatten(1), plan_cab).reshape(num_edges, s * s, c)  # [E, S, S·C] → [E, S², C]
        ref = lambda: gather(x, plan_quad.inp)  # noqa: E731  [Q, quad_in], built only while fitting
        z = (rad_w @ y).flatten(1)  # [E, emb_sbf · quad_in]  (S² ∠cab-major, as the outer product)
        if self.scale_sbf_sum.fitting:
            x = self.scale_sbf_sum(self.bilinear(z), ref=ref)
        else:
            x = linear(z, self.bilinear.linear.weight * self.scale_sbf_sum.scale)  # [E, quad_out]
        return up_projections(x, self.up_projection_ca, self.up_projection_ac, reverse), INV_SQRT_2 / 0.6


class PairInteraction(nn.Module):
    """Atom-to-atom messages ``h_b ⊗ rbf(d_ba) → h_a`` on the long-range atom graph."""

    def __init__(self, emb_atom: int, pair_in: int, pair_out: int, emb_rbf: int) -> None:
        super().__init__()
        self.bilinear = Dense(emb_rbf * pair_in, pair_out, activation=False)
        self.scale_rbf_sum = ScaleFactor()
        self.down_projection = Dense(emb_atom, pair_in)
        self.up_projection = Dense(pair_out, emb_atom)

    def forward(self, h: torch.Tensor, rad: torch.Tensor, plan: OuterPlan) -> torch.Tensor:
        """h : ``[N, A]``; rad : ``[E_aint, emb_rbf]``; plan : of the aint edges (out = target,
        inp = source). Returns ``[N, A]``."""
        x_b = self.down_projection(h)  # [N, pair_in]
        y = outer_sum(rad, x_b, plan)  # [N, emb_rbf, pair_in]
        x = self.scale_rbf_sum(self.bilinear(y.flatten(1)), ref=lambda: gather(x_b, plan.inp))  # [N, pair_out]
        return self.up_projection(x)  # [N, A]


class EdgeEmbedding(nn.Module):
    """``m_ca = Dense([h_c, h_a, x_ca])`` (GemNet eq. 5): atom pair plus an edge feature.

    The weight acting on ``[h_c, h_a, x_ca]`` is applied in three parts: the two atom parts on the
    atoms (``N ≪ E`` rows) and then gathered onto the edges, the edge part on the edges — the same
    sum without the ``[E, 2A + C]`` concatenation (and its gradient).
    """

    def __init__(self, emb_atom: int, emb_in: int, emb_out: int) -> None:
        super().__init__()
        self.dense = Dense(2 * emb_atom + emb_in, emb_out)
        self.emb_atom = emb_atom

    def forward(self, h: torch.Tensor, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        v, k = self.scaled(h, x, edge_index)
        return v * k  # [E, emb_out]

    def scaled(self, h: torch.Tensor, v: torch.Tensor, edge_index: torch.Tensor, k: float = 1.0) -> tuple[torch.Tensor, float]:
        """``(v', k')`` with ``forward(h, k·v) = k'·v'`` (``k`` folded into the edge part of the weight)."""
        a, weight = self.emb_atom, self.dense.linear.weight  # [out, 2A + C]
        source = linear(h, weight[:, :a])  # [N, out]
        target = linear(h, weight[:, a : 2 * a])  # [N, out]
        y = linear(v, weight[:, 2 * a :] if k == 1.0 else weight[:, 2 * a :] * k)  # [E, out]
        y = y + gather(source, edge_index[0]) + gather(target, edge_index[1])  # [E, out]
        return silu(y), 1.0 / 0.6  # the Dense layer's scaled SiLU


class AtomUpdate(nn.Module):
    """``h'_a = MLP(s · Σ_c m_ca ⊙ W rbf(d_ca))`` (GemNet Fig. 3 "Atom emb. update")."""

    def __init__(self, emb_atom: int, emb_edge: int, emb_rbf: int, num_residual: int) -> None:
        super().__init__()
        self.dense_rbf = Dense(emb_rbf, emb_edge, activation=False)
        self.scale_sum = ScaleFactor()
        self.layers = dense_stack(emb_edge, emb_atom, num_residual)

    def aggregate(self, m: torch.Tensor, rad: torch.Tensor, target: torch.Tensor, num_atoms: int,
                  k: float = 1.0) -> torch.Tensor:  # fmt: skip
        """``s · Σ_c (k·m)_ca ⊙ W rbf(d_ca)`` ``[N, emb_edge]`` (``k`` folded into ``W``)."""
        weight = self.dense_rbf.linear.weight  # [emb_edge, emb_rbf]
        x = scatter_sum(m * linear(rad, weight if k == 1.0 else weight * k), target, num_atoms)  # [N, emb_edge]
        return self.scale_sum(x, ref=m if k == 1.0 else (lambda: m * k))

    def forward(self, m: torch.Tensor, rad: torch.Tensor, target: torch.Tensor, num_atoms: int,
                k: float = 1.0) -> torch.Tensor:  # fmt: skip
        """The update from edge embeddings ``k·m`` ``[E, emb_edge]`` → ``[N, emb_atom]``."""
        return self.layers(self.aggregate(m, rad, target, num_atoms, k))  # [N, emb_atom]


class OutputBlock(AtomUpdate):
    """Per-block output: atom energies features ``[N, A]`` and (direct forces) edge features ``[E, C]``."""

    def __init__(self, emb_atom: int, emb_edge: int, emb_rbf: int, num_residual: int, num_after_atom: int,
                 direct_forces: bool) -> None:  # fmt: skip
        super().__init__(emb_atom, emb_edge, emb_rbf, num_residual)
        self.after_atom = dense_stack(emb_atom, emb_atom, num_after_atom)
        if direct_forces:
            self.seq_forces = dense_stack(emb_edge, emb_edge, num_residual)
            self.dense_rbf_F = Dense(emb_rbf, emb_edge, activation=False)
            self.scale_rbf_F = ScaleFactor()
        self.direct_forces = direct_forces

    def forward(self, h, m, rad, target, num_atoms):  # type: ignore[override]
        x_e = self.layers(self.aggregate(m, rad, target, num_atoms))  # [N, A]
        x_e = self.after_atom((x_e + h) * INV_SQRT_2)  # [N, A]
        if not self.direct_forces:
            return x_e, None
        v, k = run_scaled(self.seq_forces, m)  # seq_forces(m) = k·v  [E, C]
        return x_e, scaled_product(self.scale_rbf_F, v, k, rad, self.dense_rbf_F.linear.weight)  # [N, A], [E, C]


class InteractionBlock(nn.Module):
    """One GemNet-OC interaction block (arXiv 2204.02782, Fig. 3): all messages, then the edge
    update (residual layers, skip), the atom update and the edge update from atoms."""

    def __init__(self, sizes: dict[str, int], num_spherical: int, num_before_skip: int = 2,
                 num_after_skip: int = 2, num_concat: int = 1, num_atom: int = 3,
                 num_atom_emb_layers: int = 2) -> None:  # fmt: skip
        super().__init__()
        a, e = sizes["atom"], sizes["edge"]
        ti, to, r, c = sizes["trip_in"], sizes["trip_out"], sizes["rbf"], sizes["cbf"]
        self.dense_ca = Dense(e, e)
        self.trip_interaction = TripletInteraction(e, e, ti, to, r, c, symmetric=True, swap_output=True)
        self.quad_interaction = QuadrupletInteraction(
            e, sizes["quad_in"], sizes["quad_out"], r, c, sizes["sbf"], num_spherical
        )
        self.atom_edge_interaction = TripletInteraction(a, e, ti, to, r, c, symmetric=True, swap_output=True)
        self.edge_atom_interaction = TripletInteraction(e, a, ti, to, r, c, symmetric=False, swap_output=False)
        self.atom_interaction = PairInteraction(a, sizes["aint_in"], sizes["aint_out"], r)
        self.layers_before_skip = nn.Sequential(*[ResidualLayer(e) for _ in range(num_before_skip)])
        self.layers_after_skip = nn.Sequential(*[ResidualLayer(e) for _ in range(num_after_skip)])
        self.atom_emb_layers = nn.Sequential(*[ResidualLayer(a) for _ in range(num_atom_emb_layers)])
        self.atom_update = AtomUpdate(a, e, r, num_atom)
        self.concat_layer = EdgeEmbedding(a, e, e)
        self.residual_m = nn.Sequential(*[ResidualLayer(e) for _ in range(num_concat)])

    def forward(self, h: torch.Tensor, m: torch.Tensor, bases: dict, graphs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """h ``[N, A]``, m ``[E, C]`` → updated (h, m). ``bases``/``graphs`` from GemNetOC.interact."""
        main, aeaint = graphs["main"], graphs["aeaint"]
        reverse, num_atoms, plans = graphs["reverse"], h.shape[0], graphs["plans"]
        # the four dense layers that read m in one product and one activation pass: 0.6 × each output
        layers = (self.dense_ca, self.trip_interaction.dense_ba, self.quad_interaction.dense_db,
                  self.edge_atom_interaction.dense_ba)
        acts = silu(linear(m, torch.cat([layer.linear.weight for layer in layers])))  # [E, 4C]
        act_skip, act_e2e, act_qint, act_e2a = acts.split(m.shape[1], dim=1)  # 4 × [E, C]
        v_e2e, k_e2e = self.trip_interaction.messages(m, bases["e2e_rad"], bases["e2e_cir"], plans["e2e"], reverse,
                                                      act=act_e2e)
        v_qint, k_qint = self.quad_interaction.messages(m, bases["q_rad"], bases["q_cbf"], bases["q_sbf"], graphs["quad"],
                                                        (plans["quad"], plans["cab"]), reverse, act=act_qint)
        v_a2e, k_a2e = self.atom_edge_interaction.messages(
            h, bases["a2e_rad"], bases["a2e_cir"], plans["a2e"], reverse, expand=aeaint.source
        )
        v_e2a, k_e2a = self.edge_atom_interaction.messages(
            m, bases["e2a_rad"], bases["e2a_cir"], plans["e2a"], None, to_atoms=(aeaint.target, num_atoms), act=act_e2a
        )
        h_a2a = self.atom_interaction(h, bases["a2a_rad"], plans["aint"])

        # x = (x_skip + x_e2e + x_qint + x_a2e) / 2 (1/sqrt(4 summands)) = kx · v, every factor 1/(0.6·√2)
        if not k_e2e == k_qint == k_a2e == INV_SQRT_2 / 0.6:
            raise AssertionError("the symmetric interactions' factors differ")
        v = torch.add(act_skip, (v_e2e + v_qint).add_(v_a2e), alpha=INV_SQRT_2)  # [E, C]
        h = (h + v_e2a * k_e2a + h_a2a) * (1.0 / math.sqrt(3.0))  # [N, A]

        v, k = run_scaled(self.layers_before_skip, v, 0.5 / 0.6)
        m_sum = torch.add(m, v, alpha=k)  # [E, C]; m = m_sum / √2
        v_m, k_m = run_scaled(self.layers_after_skip, m_sum, INV_SQRT_2)  # m = k_m · v_m
        h = self.atom_emb_layers(h)
        h = (h + self.atom_update(v_m, bases["atom_rad"], main.target, num_atoms, k=k_m)) * INV_SQRT_2  # [N, A]
        v, k = run_scaled(self.residual_m, *self.concat_layer.scaled(h, v_m, main.edge_index, k_m))
        m = torch.add(v_m, v, alpha=k / k_m).mul_(k_m * INV_SQRT_2)  # (m + residual_m(concat)) / √2  [E, C]
        return h, m
