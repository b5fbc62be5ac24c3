"""GemNet-OC's hand-written layouts and derivatives (issue 12: :mod:`zoo.models.gemnet_oc.layout`,
:mod:`zoo.models.gemnet_oc.activation`)
against the plain torch expressions they replace, float64: values, first and second derivatives
(gradcheck / gradgradcheck), and the plain path where ops are recorded."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from zoo.models import dense
from zoo.models.gemnet_oc import activation, blocks
from zoo.models.gemnet_oc.activation import silu
from zoo.models.gemnet_oc.blocks import legendre_basis
from zoo.models.gemnet_oc.layout import columns

f64 = torch.float64


def test_columns_equal_stack_and_are_rows():
    gen = torch.Generator().manual_seed(0)
    vectors = [torch.randn(11, generator=gen) for _ in range(5)]
    out = columns(vectors)
    assert out.is_contiguous() and out.shape == (11, 5)
    assert torch.equal(out, torch.stack(vectors, dim=1))  # copies: bit for bit


def test_columns_first_and_second_derivatives():
    gen = torch.Generator().manual_seed(1)
    vectors = tuple(torch.randn(6, generator=gen, dtype=f64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda *v: columns(v), vectors)
    assert torch.autograd.gradgradcheck(lambda *v: columns(v), vectors)
    # through a nonlinear use of the columns (the Legendre recursion's products), both orders
    x = torch.linspace(-0.9, 0.95, 9, dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: legendre_basis(x, 5) ** 2, (x,))
    assert torch.autograd.gradgradcheck(lambda x: legendre_basis(x, 5) ** 2, (x,))


def test_columns_with_unused_columns_in_the_gradient():
    """A column that gets no gradient (None) counts as zeros in the double backward."""
    vectors = [torch.randn(4, dtype=f64, requires_grad=True) for _ in range(3)]
    out = columns(vectors)
    (g,) = torch.autograd.grad((out[:, 0] * out[:, 1]).sum(), [vectors[0]], create_graph=True)
    torch.testing.assert_close(g, vectors[1].detach())
    (gg,) = torch.autograd.grad(g.sum(), [vectors[1]])
    torch.testing.assert_close(gg, torch.ones(4, dtype=f64))


def test_columns_plain_under_flop_counter_and_errors():
    vectors = [torch.randn(4) for _ in range(3)]
    with FlopCounterMode(display=False):
        assert torch.equal(columns(vectors), torch.stack(vectors, dim=1))
    with pytest.raises(ValueError, match="no vectors"):
        columns([])
    with pytest.raises(ValueError, match="one length"):
        columns([torch.zeros(3), torch.zeros(4)])


def test_silu_first_second_and_third_derivatives_match_autograd():
    gen = torch.Generator().manual_seed(2)
    x = (4 * torch.randn(40, generator=gen, dtype=f64)).requires_grad_()
    assert torch.equal(silu(x), torch.nn.functional.silu(x))
    assert torch.autograd.gradcheck(silu, (x,))
    assert torch.autograd.gradgradcheck(silu, (x,))
    # the derivative as a function of (g, x), and its own derivatives (the conservative step's double backward)
    g = torch.randn(40, generator=gen, dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(activation._SiLUGrad.apply, (g, x))
    assert torch.autograd.gradgradcheck(activation._SiLUGrad.apply, (g, x))
    # against autograd of the plain expression: forces-like derivative, then a loss on it, both orders
    w = torch.randn(40, generator=gen, dtype=f64, requires_grad=True)
    results = []
    for f in (silu, torch.nn.functional.silu):
        (d,) = torch.autograd.grad(f(x * w).sum(), x, create_graph=True)
        results.append((d, *torch.autograd.grad((d**2).sum(), (x, w))))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_silu_is_plain_without_gradients_or_under_counters():
    x = torch.randn(5, requires_grad=True)
    with FlopCounterMode(display=False):
        assert silu(x).grad_fn.name() == "SiluBackward0"
    assert silu(x.detach()).grad_fn is None
    assert silu(x).grad_fn.name() == "_SiLUBackward"


def test_small_products_take_functional_linear_and_agree_with_onednn(monkeypatch):
    """Under blocks.SMALL_ROWS rows the product is F.linear (no oneDNN Function); values and two
    derivatives agree with the oneDNN path to fp32 round-off."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(64, 64, generator=gen, requires_grad=True)
    calls = []
    original = dense._Linear.apply
    monkeypatch.setattr(dense._Linear, "apply", lambda *a: calls.append(1) or original(*a))

    def run(rows):
        x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(4), requires_grad=True)
        y = silu(blocks.linear(x, w))
        first = torch.autograd.grad((y**2).sum(), [x, w], create_graph=True)
        return [y, *first, *torch.autograd.grad(sum((f**2).sum() for f in first), [x, w])]

    rows = blocks.SMALL_ROWS - 1
    small = run(rows)
    assert not calls
    monkeypatch.setattr(blocks, "SMALL_ROWS", 0)
    onednn = run(rows)  # the same input through oneDNN
    if dense.takes_onednn(torch.zeros(1, 64), w):
        assert calls
    for a, b in zip(small, onednn):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
