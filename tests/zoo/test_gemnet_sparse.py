"""The three bilinear primitives of GemNet-OC's sums (:mod:`zoo.models.gemnet_oc.sparse`), in float64.

``P(b, x) = A(b)·x``, ``Pᵀ(b, g) = A(b)ᵀ·g`` and the sampled dots ``S(g, x)`` are each other's
derivatives; conservative-force training differentiates them twice. Checked here: each against its
plain formula (gathers, products, ``index_add``), gradcheck and gradgradcheck of each, that only
the gradients asked for are computed, the kept CSR values against in-place changes, and the whole
model's conservative forces and parameter gradients against the plain autograd reference
(:func:`~zoo.models.gemnet_oc.sparse.outer_sum_dense`).
"""

from __future__ import annotations

import pytest
import torch

from test_gemnet_fast import training_step  # tests/zoo is on the path (pytest's rootdir-relative import)
from zoo.models.gemnet_oc import interactions, sparse
from zoo.models.gemnet_oc.sparse import OuterPlan, outer_sum, outer_sum_dense, padded_sum

TOL = dict(rtol=1e-10, atol=1e-12)
f64 = torch.float64


def random_case(seed: int, num_out=6, num_in=7, t=23, k=3, c=4, by_order=False):
    """A plan with an empty output row and repeated inputs, and ``b [T, K]``, ``x [I, C]``, ``g [O, K, C]``."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.sort(torch.randint(0, num_out - 1, (t,), generator=gen)).values  # the last row stays empty
    inp = torch.randint(0, num_in, (t,), generator=gen)
    plan = OuterPlan(out, inp, k, num_out, num_in, by_order=by_order)
    b = torch.randn(t, k, generator=gen, dtype=f64, requires_grad=True)
    x = torch.randn(num_in, c, generator=gen, dtype=f64, requires_grad=True)
    g = torch.randn(num_out, k, c, generator=gen, dtype=f64, requires_grad=True)
    return plan, b, x, g


def reference(name, plan, first, second):
    """The plain formula of each primitive (autograd differentiates it)."""
    if name == "P":
        return outer_sum_dense(first, second, plan)  # [O, K, C]
    if name == "Pt":  # z[i] = Σ_{t: in[t] = i} Σ_k b[t, k] g[out[t], k]
        per_t = (first.unsqueeze(2) * second.index_select(0, plan.out)).sum(1)  # [T, C]
        return torch.zeros(plan.num_in, second.shape[-1], dtype=f64).index_add(0, plan.inp, per_t)
    return (first.index_select(0, plan.out) * second.index_select(0, plan.inp).unsqueeze(1)).sum(-1)  # S [T, K]


PRIMITIVES = {"P": sparse._Product, "Pt": sparse._ProductT, "S": sparse._Sampled}


def operands(name, b, x, g):
    return {"P": (b, x), "Pt": (b, g), "S": (g, x)}[name]


def weighted(outputs, inputs, seed=7, create_graph=False):
    gen = torch.Generator().manual_seed(seed)
    total = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outputs)
    return torch.autograd.grad(total, inputs, create_graph=create_graph)


@pytest.mark.parametrize("by_order", [False, True], ids=["one product", "by order"])
@pytest.mark.parametrize("name", ["P", "Pt", "S"])
@pytest.mark.parametrize("seed", [0, 1])
def test_primitive_values_and_derivatives_match_plain_formula(name, seed, by_order):
    plan, b, x, g = random_case(seed, by_order=by_order)
    first, second = operands(name, b, x, g)
    new = PRIMITIVES[name].apply(first, second, plan)
    ref = reference(name, plan, first, second)
    assert new.shape == ref.shape
    torch.testing.assert_close(new, ref, **TOL)
    d_new = weighted([new], [first, second], create_graph=True)
    d_ref = weighted([ref], [first, second], create_graph=True)
    for a, r in zip(d_new, d_ref):
        torch.testing.assert_close(a, r, **TOL)
    dd_new, dd_ref = weighted(d_new, [first, second], seed=8), weighted(d_ref, [first, second], seed=8)
    for a, r in zip(dd_new, dd_ref):
        torch.testing.assert_close(a, r, **TOL)


@pytest.mark.parametrize("by_order", [False, True], ids=["one product", "by order"])
@pytest.mark.parametrize("name", ["P", "Pt", "S"])
def test_primitive_gradcheck_and_gradgradcheck(name, by_order):
    plan, b, x, g = random_case(3, t=15, c=3, by_order=by_order)
    first, second = operands(name, b, x, g)
    fn = lambda u, v: PRIMITIVES[name].apply(u, v, plan)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (first, second))
    assert torch.autograd.gradgradcheck(fn, (first, second))


@pytest.mark.parametrize("by_order", [False, True], ids=["one product", "by order"])
def test_outer_sum_agrees_with_padded_and_dense_to_second_order(by_order):
    """Values, first and second derivatives (the sum is bilinear: the third vanish): CSR primitives,
    the padded batched matmul, the reference."""
    plan, b, x, _ = random_case(4, by_order=by_order)
    results = []
    for fn in (outer_sum, padded_sum, outer_sum_dense):
        y = fn(b, x, plan)
        d1 = weighted([y], [b, x], create_graph=True)
        d2 = weighted(d1, [b, x], seed=8)
        results.append((y, *d1, *d2))
    for new, padded, dense in zip(*results):
        torch.testing.assert_close(new, dense, **TOL)
        torch.testing.assert_close(padded, dense, **TOL)


def test_backward_computes_only_the_gradients_asked_for(monkeypatch):
    plan, b, x, _ = random_case(5)
    calls = []
    for name, cls in PRIMITIVES.items():
        original = cls.apply
        monkeypatch.setattr(cls, "apply", lambda *a, n=name, o=original: calls.append(n) or o(*a))
    y = outer_sum(b, x.detach(), plan)  # the basis only (the learned pair basis of direct training)
    torch.autograd.grad(y.sum(), [b])
    assert calls == ["P", "S"]
    calls.clear()
    y = outer_sum(b.detach(), x, plan)  # the messages only (a geometric basis, direct forces)
    torch.autograd.grad(y.sum(), [x])
    assert calls == ["P", "Pt"]


@pytest.mark.parametrize("by_order", [False, True], ids=["one product", "by order"])
def test_kept_csr_values_follow_in_place_changes(by_order):
    """A basis's CSR layout is kept between products; an in-place change must not reuse it."""
    plan, b, x, g = random_case(6, by_order=by_order)
    basis = b.detach() * 1.0  # not a leaf: its layout is kept
    first = outer_sum(basis, x, plan)
    transposed = sparse._ProductT.apply(basis, g, plan)
    basis.mul_(2.0)
    torch.testing.assert_close(outer_sum(basis, x, plan), 2 * first, **TOL)
    torch.testing.assert_close(sparse._ProductT.apply(basis, g, plan), 2 * transposed, **TOL)
    torch.testing.assert_close(outer_sum(basis, x, plan), outer_sum_dense(basis, x, plan), **TOL)


def test_empty_plan_and_misfit_operands():
    plan = OuterPlan(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 2, 3, 4)
    x = torch.randn(4, 5, dtype=f64, requires_grad=True)
    y = outer_sum(torch.zeros(0, 2, dtype=f64, requires_grad=True), x, plan)
    assert y.shape == (3, 2, 5) and not y.any()
    with pytest.raises(ValueError, match="do not fit the plan"):
        outer_sum(torch.zeros(1, 2, dtype=f64), x, plan)


@pytest.mark.parametrize("direct", [False, True], ids=["conservative", "direct"])
def test_model_forces_and_parameter_gradients_match_plain_autograd(direct, monkeypatch):
    """The whole model in float64 (2 blocks, two water clusters): energies, forces (conservative:
    −∂E/∂positions through the primitives' backward) and the parameter gradients of a loss on both
    (conservative: their double backward), against every sum written as gather × outer + index_add."""
    step = training_step(8, direct, f64)
    out_new, grad_new = step()
    monkeypatch.setattr(interactions, "outer_sum", outer_sum_dense)
    out_ref, grad_ref = step()
    for key in ("energy", "forces"):
        torch.testing.assert_close(out_new[key], out_ref[key], **TOL)
    assert grad_new.keys() == grad_ref.keys() and grad_new
    for name in grad_new:
        torch.testing.assert_close(grad_new[name], grad_ref[name], **TOL, msg=name)


def loop_maps(out: list[int], inp: list[int], k: int, num_out: int, num_in: int, by_order=False) -> dict:
    """The index maps of ``A`` (of each order's ``A_k`` where ``by_order``), ``Aᵀ`` and the sampled dots,
    written out element by element."""
    rows = [[t for t in range(len(out)) if out[t] == o] for o in range(num_out)]
    crow, col, gather = [0], [], []
    for o in range(num_out):
        for kk in range(k):
            col += [inp[t] for t in rows[o]]
            gather += [t * k + kk for t in rows[o]]
            crow.append(len(col))
    order = [t for i in range(num_in) for t in range(len(out)) if inp[t] == i]
    col_t = [out[t] * k + kk for t in order for kk in range(k)]
    crow_t = [0]
    for i in range(num_in):
        crow_t.append(crow_t[-1] + k * inp.count(i))
    kmax = max(len(r) for r in rows)
    sample = [(out[t] * k + kk) * kmax + rows[out[t]].index(t) for t in range(len(out)) for kk in range(k)]
    if by_order:
        crow, col = [sum(len(r) for r in rows[:o]) for o in range(num_out + 1)], list(inp)
        return {"maps": (crow, col), "maps_t": (crow_t, col_t, order), "sampling": (sample,)}
    return {"maps": (crow, col, gather), "maps_t": (crow_t, col_t, order), "sampling": (sample,)}


@pytest.mark.parametrize("by_order", [False, True], ids=["one product", "by order"])
@pytest.mark.parametrize("case", ["empty rows", "one row", "k=1", "single"])
def test_index_maps_match_element_by_element_construction(case, by_order):
    """The vectorised maps (cumulative sums, sorts) against loops over rows, exactly, with empty
    rows at the start, the middle and the end, and the index type they promise."""
    gen = torch.Generator().manual_seed(11)
    num_out, num_in, t, k = {"empty rows": (9, 6, 40, 3), "one row": (1, 5, 12, 4), "k=1": (5, 7, 30, 1),
                             "single": (3, 2, 1, 2)}[case]
    out = torch.randint(0, num_out, (t,), generator=gen)
    if case == "empty rows":
        out = out.clamp(2, num_out - 2)
        out[out == 4] = 5  # rows 0, 1, 4 and 8 empty
    out = torch.sort(out).values
    inp = torch.randint(0, num_in, (t,), generator=gen)
    plan = OuterPlan(out, inp, k, num_out, num_in, by_order=by_order)
    expected = loop_maps(out.tolist(), inp.tolist(), k, num_out, num_in, by_order)
    got = {"maps": plan.maps(), "maps_t": plan.maps_t(), "sampling": (plan.sampling(),)}
    for name, maps in expected.items():
        for want, have in zip(maps, got[name]):
            assert have.tolist() == want, name
    assert all(m.dtype == torch.int32 for m in (*plan.maps(), *plan.maps_t()[:2], plan.sampling()))


@pytest.mark.parametrize("by_order", [False, True], ids=["one product", "by order"])
def test_unsorted_output_index_is_refused(by_order):
    plan = OuterPlan(torch.tensor([0, 2, 1]), torch.tensor([0, 1, 0]), 2, 3, 2, by_order=by_order)
    with pytest.raises(ValueError, match="must be sorted"):
        plan.maps()


def test_plans_of_the_same_structure_share_their_maps():
    """share_index_maps: equal (out, inp, sizes) → one set of maps, the products unchanged; a plan
    that differs in one input row, or only in size, keeps its own."""
    plan, b, x, g = random_case(9)
    same = OuterPlan(plan.out.clone(), plan.inp.clone(), plan.k, plan.num_out, plan.num_in)
    other_inp = plan.inp.clone()
    other_inp[3] = (other_inp[3] + 1) % plan.num_in
    other = OuterPlan(plan.out, other_inp, plan.k, plan.num_out, plan.num_in)
    wider = OuterPlan(plan.out, plan.inp, plan.k, plan.num_out, plan.num_in + 1)
    by_order = OuterPlan(plan.out, plan.inp, plan.k, plan.num_out, plan.num_in, by_order=True)  # other maps
    sparse.share_index_maps([plan, other, same, wider, by_order])
    assert same.twin is plan and other.twin is None and wider.twin is None and plan.twin is None
    assert by_order.twin is None and len(by_order.maps()) == 2
    assert same.maps() is plan.maps() and same.maps_t() is plan.maps_t() and same.sampling() is plan.sampling()
    assert other.maps()[1] is not plan.maps()[1]
    for p in (same, other):
        for name in ("P", "Pt", "S"):
            first, second = operands(name, b, x, g)
            torch.testing.assert_close(PRIMITIVES[name].apply(first, second, p), reference(name, p, first, second), **TOL)


@pytest.mark.parametrize("by_order", [False, True], ids=["one product", "by order"])
def test_order_major_basis_gives_the_same_products(by_order):
    """A basis whose memory is order-major (strides ``(1, T)``, as the Legendre bases' gradients
    arrive in the double backward) is laid out from rows: the same products as from rows."""
    plan, b, x, g = random_case(10, by_order=by_order)
    rows = b.detach() * 1.0
    order_major = rows.t().contiguous().t()  # [T, K], strides (1, T)
    assert order_major.stride() == (1, plan.out.numel())
    for basis in (rows, order_major):
        torch.testing.assert_close(outer_sum(basis, x, plan), outer_sum_dense(rows, x, plan), **TOL)
        torch.testing.assert_close(sparse._ProductT.apply(basis, g, plan), reference("Pt", plan, rows, g), **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, f64])
def test_products_by_order_are_the_single_products_bit_for_bit(dtype):
    """``by_order``: K products of one [O, I] structure add the same terms in the same order as the
    single [O·K, I] product, so ``P`` is the same to the last bit (float32 and float64)."""
    gen = torch.Generator().manual_seed(12)
    out = torch.sort(torch.randint(1, 40, (700,), generator=gen)).values  # rows 0 and 40.. empty
    inp = torch.randint(0, 50, (700,), generator=gen)
    plans = [OuterPlan(out, inp, 7, 45, 50, by_order=flag) for flag in (False, True)]
    b = torch.randn(700, 7, generator=gen, dtype=dtype)
    x = torch.randn(50, 8, generator=gen, dtype=dtype)
    for basis in (b, b.t().contiguous().t()):  # rows, and order-major (no copy by order)
        one, by_order = (outer_sum(basis, x, plan) for plan in plans)
        assert torch.equal(one, by_order)
