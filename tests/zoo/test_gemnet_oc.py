"""GemNet-OC (zoo.models.gemnet_oc.model): the zoo's property suite plus GemNet-OC-specific checks
(interaction graphs, triplet/quadruplet indices against brute force, degenerate dihedrals,
scale-factor fitting, parameter counts).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule

from datapipe import keys
from datapipe.graph import batch_from_atoms
from zoo.models.gemnet_oc.blocks import ScaleFactor, fit_scale_factors, legendre_basis
from zoo.models.gemnet_oc.graph import build_radius_graph, knn_mask, quadruplets, reverse_edges, subgraph, triplets
from zoo.registry import MODELS, build, count_parameters
from zoo.testing import (
    ForceFieldTests,
    assert_invariant_energy_equivariant_forces,
    evaluate,
    perturbed,
    random_rotation,
)


@pytest.mark.slow  # the fast lane runs the shared suite on the MPNN (tests/zoo/test_mpnn.py)
class TestGemNetOC(ForceFieldTests):
    """GemNet-OC at width 8, 2 blocks. Invariant under all of E(3) (cosines only)."""

    model_name = "gemnet-oc"
    width = 8
    overrides = {"num_blocks": 2}
    equivariant = True
    reflections = True


def make(direct_forces=True, dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    model = build("gemnet-oc", 8, direct_forces=direct_forces, num_blocks=2, **overrides).to(dtype)
    model.set_normalization(None, 1.0)
    return model.eval()


# -- graphs and indices ---------------------------------------------------------------------------
def _positions(seed=0, n=9, box=4.0):
    return torch.as_tensor(np.random.default_rng(seed).uniform(0, box, size=(n, 3)), dtype=torch.float64)


def test_radius_graph_matches_brute_force_per_structure():
    pos = torch.cat([_positions(0), _positions(1) + 0.5])  # two structures that overlap in space
    batch = torch.tensor([0] * 9 + [1] * 9)
    graph = build_radius_graph(pos, batch, 3.0)
    d = torch.cdist(pos, pos)
    expected = {(j, i) for i in range(18) for j in range(18) if i != j and batch[i] == batch[j] and d[i, j] < 3.0}
    assert set(map(tuple, graph.edge_index.T.tolist())) == expected
    assert torch.allclose(graph.distance, d[graph.source, graph.target])
    assert bool((graph.target[1:] >= graph.target[:-1]).all()), "sorted by target"


def test_neighbour_limit_keeps_nearest_and_ties():
    distance = torch.tensor([1.0, 2.0, 2.0, 3.0, 0.5, 4.0])
    target = torch.tensor([0, 0, 0, 0, 1, 1])
    assert knn_mask(distance, target, 2, 2).tolist() == [True, True, True, False, True, True]
    assert knn_mask(distance, target, 2, 1).tolist() == [True, False, False, False, True, False]


def test_triplets_and_quadruplets_match_brute_force():
    pos = _positions(3, n=8, box=3.0)
    batch = torch.zeros(8, dtype=torch.long)
    main = build_radius_graph(pos, batch, 2.2)
    qint = subgraph(build_radius_graph(pos, batch, 3.0), 3.0, 3, 8)
    edges = [tuple(e) for e in main.edge_index.T.tolist()]  # (source, target)
    qedges = [tuple(e) for e in qint.edge_index.T.tolist()]
    trip = triplets(main, main, 8)
    got = {(edges[i], edges[o]) for i, o in zip(trip["in"].tolist(), trip["out"].tolist())}
    want = {(ei, eo) for ei in edges for eo in edges if ei[1] == eo[1] and ei[0] != eo[0]}
    assert got == want and len(got) == trip["in"].numel()
    quad = quadruplets(main, qint, 8)
    t_in, t_out = quad["trip_in"], quad["trip_out"]
    got = {
        (edges[int(t_in["in"][qi])], qedges[int(t_out["in"][qo])], edges[int(t_out["out"][qo])])
        for qi, qo in zip(quad["quad_in"].tolist(), quad["quad_out"].tolist())
    }
    want = {
        ((d, b), (b, a), (c, a))
        for (b, a) in qedges
        for (d, b2) in edges
        for (c, a2) in edges
        if b2 == b and a2 == a and len({a, b, c, d}) == 4
    }
    assert got == want and len(got) == quad["quad_in"].numel() and len(want) > 0
    # every quadruplet's two triplets share the quadruplet-graph edge b → a
    assert torch.equal(t_in["out"][quad["quad_in"]], t_out["in"][quad["quad_out"]])


def test_reverse_edges():
    pos = _positions(4)
    g = build_radius_graph(pos, torch.zeros(9, dtype=torch.long), 3.0)
    rev = reverse_edges(g.edge_index, 9)
    assert torch.equal(g.edge_index[:, rev], g.edge_index.flip(0))


def test_legendre_basis_is_normalised_y_l0():
    x = torch.linspace(-1, 1, 5, dtype=torch.float64)
    basis = legendre_basis(x, 4)
    p3 = 0.5 * (5 * x**3 - 3 * x)
    assert torch.allclose(basis[:, 3], np.sqrt(7 / (4 * np.pi)) * p3)


# -- model ------------------------------------------------------------------------------------------
def test_graph_cutoffs_and_quadruplets_are_used():
    model = make()
    assert model.graph_cutoffs == (6.0, 8.0)
    atoms = perturbed(molecule("CH3CH2OH"), 2)
    batch = batch_from_atoms([atoms], cutoff=8.0)
    pos = batch[keys.POSITIONS]
    g = model.graphs(pos, batch[keys.EDGE_INDEX], batch[keys.BATCH])
    assert g["quad"]["quad_in"].numel() > 0 and g["trip_a2e"]["in"].numel() > 0
    assert int(torch.bincount(g["qint"].target).max()) <= 8 + 1  # limit 8 (ties could add more)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "conservative"])
def test_collinear_atoms_give_finite_gradients(direct):
    """Acetylene: every dihedral is undefined (zero plane normals) — no NaN anywhere."""
    model = make(direct).train()
    atoms = Atoms("HCCH", positions=[[0, 0, -1.66], [0, 0, -0.60], [0, 0, 0.60], [0, 0, 1.66]])
    out = evaluate(model, [atoms])
    loss = out[keys.ENERGY].sum() + out[keys.FORCES].pow(2).sum()
    loss.backward()
    assert torch.isfinite(out[keys.FORCES]).all()
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


@pytest.mark.slow  # (the fit itself runs in the fast lane as zoo/models/gemnet_oc/model.py's doctest)
def test_fitted_scale_factors_normalise_and_keep_invariance():
    model = make()
    mols = [perturbed(molecule("C6H6"), 1), perturbed(molecule("CH3CH2OH"), 2)]
    batch = batch_from_atoms(mols, cutoff=8.0)
    fitted = fit_scale_factors(model, [batch])
    factors = {n: m for n, m in model.named_modules() if isinstance(m, ScaleFactor)}
    assert set(fitted) == set(factors) and len(fitted) == 2 * 11 + 3 * 2
    assert all(np.isfinite(v) and v > 0 for v in fitted.values())
    assert any(abs(v - 1.0) > 0.1 for v in fitted.values())
    # after fitting, the scaled output has the second moment of its reference
    name = "int_blocks.1.trip_interaction.scale_cbf_sum"
    factor = factors[name]
    factor._stats = [0.0, 0, 0.0, 0]
    model(batch)
    sum_x, n_x, sum_ref, n_ref = factor._stats
    factor._stats = None
    ratio = float(factor.scale) ** 2 * (sum_x / n_x) / (sum_ref / n_ref)
    assert abs(ratio - 1.0) < 1e-3
    assert_invariant_energy_equivariant_forces(model, mols[1], random_rotation(3))
    assert "int_blocks.0.quad_interaction.scale_sbf_sum.scale" in model.state_dict()


def test_scale_factor_fit_rejects_batches_without_edges():
    with pytest.raises(ValueError, match="no non-zero activations"):
        fit_scale_factors(make(), [batch_from_atoms([Atoms("C", positions=[[0, 0, 0]])], cutoff=8.0)])


def test_parameter_counts_on_meta_device():
    counts = [count_parameters("gemnet-oc", w) for w in MODELS["gemnet-oc"].widths]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    torch.manual_seed(0)
    model = build("gemnet-oc", 32)
    assert sum(p.numel() for p in model.parameters()) == counts[0]


def test_all_four_atom_permutations_of_a_quadruplet_give_one_energy():
    """Permutation invariance on a 4-atom structure (only quadruplet-rich geometry)."""
    model = make()
    atoms = Atoms("CNOF", positions=[[0, 0, 0], [1.3, 0.1, 0], [1.9, 1.2, 0.3], [3.0, 1.4, 1.2]])
    base = evaluate(model, [atoms])
    for order in list(itertools.permutations(range(4)))[1::5]:
        out = evaluate(model, [atoms[list(order)]])
        torch.testing.assert_close(out[keys.ENERGY], base[keys.ENERGY], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out[keys.FORCES], base[keys.FORCES][list(order)], rtol=1e-5, atol=1e-6)
