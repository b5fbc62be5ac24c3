"""GemNet-OC's faster formulations (issue 12) against the ones they replace, in float64.

- sums ``Σ basis ⊗ message`` as CSR products (:mod:`zoo.models.gemnet_oc.sparse`) against the
  zero-padded batched matmul of before (:func:`zoo.models.gemnet_oc.blocks.aggregate_outer`) and
  the gather/outer/index_add reference, values, first and second derivatives;
- the edge embedding without the ``[E, 2A + C]`` concatenation, the residual layer with 1/0.6
  folded into the weight, the radial bases taken from the big graph, the dihedral cosine with
  normals scaled per triplet — each against the formula it replaces;
- the whole model: CSR path against the padded fallback (what tracing and FLOP counters run),
  direct and conservative, energies, forces and parameter gradients.

Outputs and gradients must agree to float64 round-off. Speed is measured in
benchmarks/bench_gemnet.py, not here.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from datapipe.graph import batch_from_atoms
from zoo.models.common import UNDERFLOW_EXPONENT, GaussianBasis, gather, scatter_sum
from zoo.models import dense
from zoo.models.gemnet_oc import csr, sparse
from zoo.models.gemnet_oc import blocks, interactions
from zoo.models.gemnet_oc.blocks import (Dense, ResidualLayer, ScaleFactor, aggregate_outer, fit_scale_factors,
                                         legendre_basis, run_scaled)
from zoo.models.gemnet_oc.graph import build_radius_graph, safe_cosine, scaled_normals, subgraph
from zoo.models.gemnet_oc.interactions import EdgeEmbedding
from zoo.models.gemnet_oc.sparse import OuterPlan, outer_sum, outer_sum_dense
from zoo.registry import build
from zoo.testing import water_cluster

TOL = dict(rtol=1e-10, atol=1e-12)
f64 = torch.float64


def random_plan(seed: int, num_out=6, num_in=7, t=23, k=3, empty_rows=True):
    gen = torch.Generator().manual_seed(seed)
    high = num_out - 1 if empty_rows else num_out  # leave the last output row empty
    out = torch.sort(torch.randint(0, high, (t,), generator=gen)).values
    inp = torch.randint(0, num_in, (t,), generator=gen)
    return OuterPlan(out, inp, k, num_out, num_in), gen


def sparse_sum(basis, x, plan):
    """The CSR path itself."""
    return sparse._Product.apply(basis, x, plan)  # [O, K, C]


def grads(outputs, inputs, create_graph=False):
    gen = torch.Generator().manual_seed(7)
    total = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outputs)
    return torch.autograd.grad(total, inputs, create_graph=create_graph)


def training_step(width: int, direct: bool, dtype: torch.dtype):
    """A 2-block model on two water clusters; ``step()`` → (outputs, parameter gradients) of one step."""
    torch.manual_seed(0)
    model = build("gemnet-oc", width, num_blocks=2, direct_forces=direct).to(dtype)
    model.set_normalization(None, 1.0)
    model.train()
    batch = batch_from_atoms([water_cluster(4, seed=1), water_cluster(3, seed=2)], cutoff=model.data_cutoff)
    batch["positions"] = batch["positions"].to(dtype)

    def step():
        model.zero_grad(set_to_none=True)
        out = model(batch)
        (out["energy"].abs().mean() + out["forces"].norm(dim=-1).mean()).backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    return step


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_outer_sum_matches_padded_bmm_and_dense_reference(seed):
    plan, gen = random_plan(seed)
    basis = torch.randn(plan.out.numel(), plan.k, generator=gen, dtype=f64, requires_grad=True)
    x = torch.randn(plan.num_in, 5, generator=gen, dtype=f64, requires_grad=True)
    new = sparse_sum(basis, x, plan)  # [O, K, C]
    padded = aggregate_outer(basis, gather(x, plan.inp), plan.out, plan.num_out)  # the formulation before
    dense = outer_sum_dense(basis, x, plan)
    assert new.shape == padded.shape == (plan.num_out, plan.k, 5)
    torch.testing.assert_close(new, padded, **TOL)
    torch.testing.assert_close(dense, padded, **TOL)
    for a, b in zip(grads([new], [basis, x]), grads([padded], [basis, x])):
        torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(outer_sum(basis.detach(), x, plan), padded, **TOL)  # the public entry, CSR path
    torch.testing.assert_close(outer_sum(basis, x, plan), padded, **TOL)  # the public entry, padded path


def test_outer_sum_second_derivatives():
    """Conservative training differentiates the backward once more (gradgradcheck)."""
    plan, gen = random_plan(3, t=15)
    basis = torch.randn(plan.out.numel(), plan.k, generator=gen, dtype=f64, requires_grad=True)
    x = torch.randn(plan.num_in, 4, generator=gen, dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda b, v: sparse_sum(b, v, plan), (basis, x))
    assert torch.autograd.gradgradcheck(lambda b, v: sparse_sum(b, v, plan), (basis, x))
    # and the double backward equals the dense reference's
    first_new = grads([sparse_sum(basis, x, plan)], [basis, x], create_graph=True)
    first_ref = grads([outer_sum_dense(basis, x, plan)], [basis, x], create_graph=True)
    for a, b in zip(grads(first_new, [basis, x]), grads(first_ref, [basis, x])):
        torch.testing.assert_close(a, b, **TOL)


def test_outer_sum_falls_back_to_padded_matmul_under_counters_and_tracing():
    """What the FLOP counters see is the formulation they counted before: a batched matmul."""
    plan, gen = random_plan(4)
    basis = torch.randn(plan.out.numel(), plan.k, generator=gen, dtype=f64)
    x = torch.randn(plan.num_in, 3, generator=gen, dtype=f64)
    assert sparse.sparse_capable(basis, x)
    expected = aggregate_outer(basis, gather(x, plan.inp), plan.out, plan.num_out)
    with FlopCounterMode(display=False) as counter:
        assert not sparse.sparse_capable(basis, x)
        torch.testing.assert_close(outer_sum(basis, x, plan), expected, **TOL)
    assert counter.get_total_flops() > 0  # the bmm
    assert not sparse.sparse_capable(basis.to(torch.bfloat16), x)
    traced = torch.jit.trace(lambda b, v: outer_sum(b, v, plan), (basis, x), check_trace=False)
    kinds = {n.kind() for n in traced.graph.nodes()}
    assert "aten::matmul" in kinds or "aten::bmm" in kinds
    assert not any("sparse" in k or k == "prim::PythonOp" for k in kinds)


def test_outer_plan_rejects_unsorted_output_index():
    plan = OuterPlan(torch.tensor([1, 0, 2]), torch.tensor([0, 1, 2]), 2, 3, 3)
    with pytest.raises(ValueError, match="sorted"):
        outer_sum(torch.ones(3, 2, dtype=f64), torch.ones(3, 1, dtype=f64), plan)


def test_edge_embedding_without_concatenation_matches_dense_of_cat():
    torch.manual_seed(0)
    layer = EdgeEmbedding(5, 4, 6).double()
    h = torch.randn(7, 5, dtype=f64, requires_grad=True)
    x = torch.randn(11, 4, dtype=f64, requires_grad=True)
    edge_index = torch.randint(0, 7, (2, 11))
    new = layer(h, x, edge_index)
    old = layer.dense(torch.cat([gather(h, edge_index[0]), gather(h, edge_index[1]), x], dim=-1))
    torch.testing.assert_close(new, old, **TOL)
    params = [h, x, layer.dense.linear.weight]
    for a, b in zip(grads([new], params), grads([old], params)):
        torch.testing.assert_close(a, b, **TOL)


def test_residual_layer_with_folded_scale_matches_two_dense_layers():
    torch.manual_seed(0)
    layer = ResidualLayer(6).double()
    x = torch.randn(9, 6, dtype=f64, requires_grad=True)
    new = layer(x)
    old = (x + layer.dense(x)) / math.sqrt(2.0)  # Dense → Dense, each silu(·)/0.6
    assert isinstance(layer.dense[0], Dense)
    torch.testing.assert_close(new, old, **TOL)
    params = [x, *layer.parameters()]
    for a, b in zip(grads([new], params), grads([old], params)):
        torch.testing.assert_close(a, b, **TOL)


def test_radial_basis_from_big_graph_and_scaled_normals():
    torch.manual_seed(0)
    model = build("gemnet-oc", 8, num_blocks=1).double()
    pos = torch.rand(12, 3, dtype=f64) * 5
    big = build_radius_graph(pos, torch.zeros(12, dtype=torch.long), 4.0)
    sub = subgraph(big, 4.0, 3, 12)
    rows = model.radial_aint(big.distance).index_select(0, sub.origin)
    torch.testing.assert_close(rows, model.radial_qint(sub.distance), **TOL)
    torch.testing.assert_close(sub.distance, big.distance[sub.origin], rtol=0, atol=0)
    u, v = torch.randn(10, 3, dtype=f64), torch.randn(8, 3, dtype=f64)
    u[0] = 0.0  # degenerate normal: cosine 0, finite
    i, j = torch.randint(0, 10, (30,)), torch.randint(0, 8, (30,))
    new = (scaled_normals(u)[i] * scaled_normals(v)[j]).sum(-1).clamp(-1, 1)
    torch.testing.assert_close(new, safe_cosine(u[i], v[j]), **TOL)


def test_gaussians_below_the_smallest_normal_float_are_flushed_and_nothing_else_changes():
    """GemNet-OC's radial basis sets Gaussians under exp(−87) to 0 (torch.exp's slow path): every value
    and derivative moves by less than 1e-30, those at or above exp(−87) not at all."""
    d = torch.linspace(0.0, 6.5, 997, dtype=f64, requires_grad=True)  # Å, past the cutoff too
    plain, flushed = GaussianBasis(6.0, 128).double(), GaussianBasis(6.0, 128, flush_underflow=True).double()
    old, new = plain(d), flushed(d)  # [997, 128]
    small = old < math.exp(UNDERFLOW_EXPONENT)
    assert 0.5 < float(small.double().mean()) < 1.0  # most of a narrow basis is flushed
    assert bool((new[small] == 0).all()) and bool((new[~small] == old[~small]).all())
    assert float((new - old).abs().max()) < math.exp(UNDERFLOW_EXPONENT)
    (g_old,), (g_new,) = grads([old], [d]), grads([new], [d])
    torch.testing.assert_close(g_new, g_old, rtol=0, atol=1e-30)
    fp32 = GaussianBasis(6.0, 128, flush_underflow=True)(d.detach().float())  # [997, 128]
    assert fp32.dtype == torch.float32 and bool(((fp32 == 0) | (fp32 >= torch.finfo(torch.float32).tiny)).all())


def test_legendre_recursion_on_normalised_harmonics_matches_bonnet():
    """Y_l^0 by the normalised recursion against Bonnet's recursion on P_l then the norms (the
    formulation before), values and derivatives, float64, including cos = ±1."""
    x = torch.cat([torch.linspace(-1.0, 1.0, 201, dtype=f64), torch.tensor([1.2, -1.3], dtype=f64)]).requires_grad_()
    for num in (2, 3, 7):
        c = x.clamp(-1.0, 1.0)
        polys = [torch.ones_like(c), c]
        for l in range(1, num - 1):
            polys.append(((2 * l + 1) * c * polys[l] - l * polys[l - 1]) / (l + 1))
        old = torch.stack([math.sqrt((2 * l + 1) / (4 * math.pi)) * p for l, p in enumerate(polys[:num])], dim=-1)
        new = legendre_basis(x, num)
        assert new.shape == (x.numel(), num) and new.is_contiguous()  # rows (zoo.models.gemnet_oc.layout.columns)
        torch.testing.assert_close(new, old, **TOL)
        torch.testing.assert_close(grads([new], [x])[0], grads([old], [x])[0], **TOL)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "conservative"])
def test_model_sparse_path_matches_dense_fallback(direct, monkeypatch):
    """The whole model in float64, training step: CSR sums against the padded fallback."""
    step = training_step(8, direct, f64)
    calls = []
    original = sparse._Product.apply
    monkeypatch.setattr(sparse._Product, "apply", lambda *a: calls.append(1) or original(*a))
    out_sparse, grad_sparse = step()
    # both force modes take the CSR path (conservative: the bases' gradients too, tests/zoo/test_gemnet_sparse.py)
    assert calls
    monkeypatch.setattr(sparse, "sparse_capable", lambda *tensors: False)
    out_dense, grad_dense = step()
    for key in ("energy", "forces"):
        torch.testing.assert_close(out_sparse[key], out_dense[key], **TOL)
    assert grad_sparse.keys() == grad_dense.keys()
    for name in grad_sparse:
        torch.testing.assert_close(grad_sparse[name], grad_dense[name], **TOL, msg=name)


# --------------------------------------------------------------------------------------------
# dense layers through oneDNN (zoo.models.dense, tested on its own in tests/zoo/test_dense.py):
# float32 only, so the whole model is checked against nn.functional.linear at float32 round-off

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")


@needs_onednn
def test_linear_on_a_column_slice_of_a_weight_matches_functional_linear():
    """EdgeEmbedding multiplies by column blocks of one weight: a strided operand, values and two derivatives."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(300, 64, generator=gen, requires_grad=True)
    w_full = torch.randn(64, 130, generator=gen, requires_grad=True)
    w = w_full[:, 1:65]  # [64, 64], row stride 130
    assert dense.takes_onednn(x, w)

    def run(fn):
        y = nn.functional.silu(fn(x, w))  # [300, 64]
        first = grads([y], [x, w], create_graph=True)
        return [y, *first, *grads(first, [x, w_full])]

    for a, b in zip(run(dense.linear), run(nn.functional.linear)):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


@needs_onednn
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "conservative"])
def test_model_onednn_matches_functional_linear_float32(direct, monkeypatch):
    """The whole model in float32: oneDNN dense layers against nn.functional.linear, to fp32 round-off."""
    monkeypatch.setattr(blocks, "SMALL_ROWS", 0)  # every product through oneDNN (the test system is small)
    step = training_step(16, direct, torch.float32)
    calls = []
    original = dense._Linear.apply
    monkeypatch.setattr(dense._Linear, "apply", lambda *a: calls.append(1) or original(*a))
    out_new, grad_new = step()
    assert len(calls) > 50
    with torch.backends.mkldnn.flags(enabled=False):  # the switch back to the BLAS
        out_old, grad_old = step()
    for key in ("energy", "forces"):
        scale = float(out_old[key].detach().abs().max())
        torch.testing.assert_close(out_new[key], out_old[key], rtol=1e-4, atol=1e-5 * scale)
    assert grad_new.keys() == grad_old.keys()
    for name in grad_new:
        scale = float(grad_old[name].abs().max())
        torch.testing.assert_close(grad_new[name], grad_old[name], rtol=1e-3, atol=1e-4 * scale, msg=name)


def test_csr_maps_are_int32_where_the_counts_fit():
    plan, gen = random_plan(8)
    assert all(m.dtype == torch.int32 for m in plan.maps()) and all(m.dtype == torch.int32 for m in plan.maps_t()[:2])
    assert csr.index_dtype(2**31, 10) == csr.index_dtype(10, 2**31) == torch.int64
    basis, x = torch.randn(plan.out.numel(), plan.k, generator=gen), torch.randn(plan.num_in, 4, generator=gen)
    torch.testing.assert_close(sparse_sum(basis, x, plan), outer_sum_dense(basis, x, plan), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# folded scales (interactions.py): every 1/0.6, 1/√2 and fitted scale moved into the next weight,
# the four layers reading m in one product, the two up projections in one, against the plain
# formulas of before (each Dense layer applied on its own), float64


def plain_triplet(t, m, rad, cir, plan, reverse, expand=None, to_atoms=None):
    x = t.dense_ba(m)
    x = gather(x, expand) if expand is not None else x
    x = t.scale_rbf(x * t.mlp_rbf(rad), ref=x)
    x_in = t.down_projection(x)
    z = cir[0] @ outer_sum(cir[1], x_in, plan)
    z = scatter_sum(z, *to_atoms) if to_atoms is not None else z
    x = t.scale_cbf_sum(t.bilinear(z.flatten(1)), ref=lambda: gather(x_in, plan.inp))
    if t.symmetric:
        return (t.up_projection_ca(x) + gather(t.up_projection_ac(x), reverse)) / math.sqrt(2.0)
    return t.up_projection_ca(gather(x, reverse) if t.swap_output else x)


def plain_quadruplet(q, m, rad, cbf, sbf, quad, plans, reverse):
    """(with the second stage's plan of before: [T_out, S·C] rows, the angle basis once)"""
    s = q.num_spherical
    x = q.dense_db(m)
    x = q.scale_rbf(x * q.mlp_rbf(rad), ref=x)
    x = gather(q.down_projection(x), quad["trip_in"]["in"])
    x = q.scale_cbf(x * q.mlp_cbf(cbf), ref=x)
    y = outer_sum(sbf[1], outer_sum(sbf[2], x, plans[0]).flatten(1), plans[1]).reshape(sbf[0].shape[0], s * s, -1)
    x = q.scale_sbf_sum(q.bilinear((sbf[0] @ y).flatten(1)), ref=lambda: gather(x, plans[0].inp))
    return (q.up_projection_ca(x) + gather(q.up_projection_ac(x), reverse)) / math.sqrt(2.0)


def plain_block(block, h, m, b, g):
    main, ae, rev, n, p = g["main"], g["aeaint"], g["reverse"], h.shape[0], g["plans"]
    x = (block.dense_ca(m) + plain_triplet(block.trip_interaction, m, b["e2e_rad"], b["e2e_cir"], p["e2e"], rev)
         + plain_quadruplet(block.quad_interaction, m, b["q_rad"], b["q_cbf"], b["q_sbf"], g["quad"], (p["quad"], p["cab"]), rev)
         + plain_triplet(block.atom_edge_interaction, h, b["a2e_rad"], b["a2e_cir"], p["a2e"], rev, expand=ae.source)) / 2
    h = (h + plain_triplet(block.edge_atom_interaction, m, b["e2a_rad"], b["e2a_cir"], p["e2a"], None, to_atoms=(ae.target, n))
         + block.atom_interaction(h, b["a2a_rad"], p["aint"])) / math.sqrt(3.0)
    m = block.layers_after_skip((m + block.layers_before_skip(x)) / math.sqrt(2.0))
    up = block.atom_update
    h = (block.atom_emb_layers(h) + up.layers(up.scale_sum(scatter_sum(m * up.dense_rbf(b["atom_rad"]), main.target, n), ref=m))) / math.sqrt(2.0)
    layer = block.concat_layer
    cat = torch.cat([gather(h, main.edge_index[0]), gather(h, main.edge_index[1]), m], dim=-1)
    return h, (m + block.residual_m(layer.dense(cat))) / math.sqrt(2.0)


def folded_setup(seed=0):
    torch.manual_seed(seed)
    model = build("gemnet-oc", 8, num_blocks=1).double()
    for factor in model.modules():  # fitted-looking scales, so that folding them is exercised
        if isinstance(factor, ScaleFactor):
            factor.scale.fill_(0.5 + torch.rand(()).item())
    batch = batch_from_atoms([water_cluster(4, seed=1), water_cluster(3, seed=2)], cutoff=model.data_cutoff)
    pos, n = batch["positions"].double(), batch["positions"].shape[0]
    g = model.graphs(pos, batch["edge_index"], batch["batch"])
    h = torch.randn(n, 8, dtype=f64, requires_grad=True)
    m = torch.randn(g["main"].num_edges, 8, dtype=f64, requires_grad=True)
    return model, g, model.bases(g), h, m


def test_folded_interaction_block_matches_plain_layers():
    model, g, b, h, m = folded_setup()
    block = model.int_blocks[0]
    new, old = block(h, m, b, g), plain_block(block, h, m, b, g)
    for a, c in zip(new, old):
        torch.testing.assert_close(a, c, **TOL)
    params = [h, m, *block.parameters(), model.mlp_rbf_tint.linear.weight, model.mlp_sbf_qint.weight]
    for a, c in zip(grads(new, params, create_graph=True), grads(old, params)):  # (the bases' graph is shared)
        torch.testing.assert_close(a, c, **TOL)


def test_folded_output_block_and_force_head_match_plain_layers():
    model, g, b, h, m = folded_setup(1)
    ob, target, n = model.out_blocks[0], g["main"].target, h.shape[0]
    new = ob(h, m, b["out_rad"], target, n)
    x_f = ob.seq_forces(m)
    old = (ob.after_atom((ob.layers(ob.scale_sum(scatter_sum(m * ob.dense_rbf(b["out_rad"]), target, n), ref=m)) + h)
                         / math.sqrt(2.0)), ob.scale_rbf_F(x_f * ob.dense_rbf_F(b["out_rad"]), ref=x_f))
    x = torch.cat([m] * 2, dim=-1)
    v, k = run_scaled(model.out_mlp_F, x)
    new, old = [*new, model.out_forces.scaled(v, k)[0]], [*old, model.out_forces(model.out_mlp_F(x))]
    for a, c in zip(new, old):
        torch.testing.assert_close(a, c, **TOL)
    params = [h, m, *ob.parameters(), *model.out_mlp_F.parameters(), *model.out_forces.parameters()]
    for a, c in zip(grads(new, params), grads(old, params)):
        torch.testing.assert_close(a, c, **TOL)


def test_scale_factors_fitted_through_folded_layers_equal_the_plain_fit(monkeypatch):
    """While a factor is fitted, the product it records is the plain one: the same fitted scales."""
    def fit():
        torch.manual_seed(0)
        model = build("gemnet-oc", 8, num_blocks=1).double()
        batches = [batch_from_atoms([water_cluster(3, seed=s)], cutoff=model.data_cutoff) for s in range(2)]
        for batch in batches:
            batch["positions"] = batch["positions"].double()
        return fit_scale_factors(model, batches)

    new = fit()
    monkeypatch.setattr(interactions.InteractionBlock, "forward", plain_block)
    monkeypatch.setattr(interactions.OutputBlock, "forward", lambda ob, h, m, rad, t, n: (
        ob.after_atom((ob.layers(ob.scale_sum(scatter_sum(m * ob.dense_rbf(rad), t, n), ref=m)) + h) / math.sqrt(2.0)),
        ob.scale_rbf_F(ob.seq_forces(m) * ob.dense_rbf_F(rad), ref=ob.seq_forces(m))))
    old = fit()
    assert new.keys() == old.keys()
    for name in new:
        assert new[name] == pytest.approx(old[name], rel=1e-9), name


def test_inference_gives_the_same_outputs_as_with_gradients():
    """Inference (no gradients: the sums run without their backward maps and caches) gives the same
    energies and forces as with gradients enabled, float64."""
    model, _, _, _, _ = folded_setup(2)
    model.eval()
    batch = batch_from_atoms([water_cluster(4, seed=3), water_cluster(3, seed=4)], cutoff=model.data_cutoff)
    batch["positions"] = batch["positions"].double()
    with torch.no_grad():
        fast = model(batch)
    rows = model(batch)  # grad enabled: row-major bases
    for key in ("energy", "forces"):
        torch.testing.assert_close(fast[key], rows[key].detach(), **TOL)
