"""The faster formulations of issue 12 against the plain ones they replace, in float64.

eSEN's blocks cut edge tensors with ``split`` (one ``cat`` in backward) instead of slicing them
(each slice's backward zero-fills a gradient of the full size), and its two SO(2) convolutions
pass blocks per ``|m|`` without a cat/split; GemNet-OC gathers with ``index_select`` and pads
with ``index_copy``. The references below are the previous formulations, written out; outputs
and gradients must agree to float64 round-off. Speed is measured in benchmarks/, not here.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from zoo.models.common import gather
from zoo.models.esen.so2 import EquivariantRMSNorm, SO2Convolution, SO3Linear, gate
from zoo.models.gemnet_oc.blocks import aggregate_outer
from zoo.models.gemnet_oc.graph import inner_index

TOL = dict(rtol=1e-12, atol=1e-12)


def sliced_so2(conv: SO2Convolution, x, radial=None, gates=None):
    """SO2Convolution.forward as it was before issue 12: slices of the edge tensor, one cat."""
    e = x.shape[0]
    if radial is not None:
        radial = radial.split([n * conv.cin for n in conv.sizes], dim=-1)
    if gates is not None:
        g = torch.sigmoid(gates).reshape(e, conv.lmax, conv.cin)
    n0 = conv.sizes[0]
    x0 = x[:, :n0]
    if gates is not None:
        x0 = torch.cat([nn.functional.silu(x0[:, :1]), x0[:, 1:] * g], dim=1)
    x0 = x0.reshape(e, n0 * conv.cin)
    if radial is not None:
        x0 = x0 * radial[0]
    y0 = conv.fc_m0(x0)
    outputs, start = [y0[:, : n0 * conv.cout]], n0
    for index, n in enumerate(conv.sizes[1:]):
        m = index + 1
        pair = x[:, start : start + 2 * n]
        if gates is not None:
            pair = (pair.reshape(e, 2, n, conv.cin) * g[:, None, m - 1 :]).reshape(e, 2 * n * conv.cin)
        else:
            pair = pair.reshape(e, 2 * n * conv.cin)
        if radial is not None:
            pair = (pair.reshape(e, 2, n * conv.cin) * radial[m][:, None]).reshape(e, 2 * n * conv.cin)
        w1, w2 = conv.weight_m[index]
        weight = torch.cat([torch.cat([w1, -w2], 1), torch.cat([w2, w1], 1)], 0)
        outputs.append(pair @ weight.T)
        start += 2 * n
    return torch.cat(outputs, dim=1).reshape(e, start, conv.cout), y0[:, n0 * conv.cout :]


def grads(outputs, inputs):
    """Gradients of a fixed random projection of ``outputs`` with respect to ``inputs``."""
    gen = torch.Generator().manual_seed(7)
    total = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outputs)
    return torch.autograd.grad(total, inputs)


@pytest.mark.parametrize("lmax,mmax", [(2, 2), (4, 4), (4, 2), (3, 0)])
def test_so2_message_pair_matches_sliced_reference(lmax, mmax):
    """conv1 (radial, extra gate scalars) → conv2 (fused gate) as in eSEN's message block."""
    torch.manual_seed(0)
    cin, hidden, cout, e = 6, 5, 4, 11
    conv1 = SO2Convolution(cin, hidden, lmax, mmax, extra_scalars=lmax * hidden).double()
    conv2 = SO2Convolution(hidden, cout, lmax, mmax).double()
    k = conv1.sizes[0] + 2 * sum(conv1.sizes[1:])
    x = torch.randn(e, k, cin, dtype=torch.float64, requires_grad=True)
    radial = torch.randn(e, conv1.radial_size, dtype=torch.float64, requires_grad=True)
    params = [*conv1.parameters(), *conv2.parameters()]

    blocks, gates = conv1(x, radial=radial, blocks_out=True)
    new, _ = conv2(blocks, gates=gates)
    hidden_ref, gates_ref = sliced_so2(conv1, x, radial=radial)
    ref, _ = sliced_so2(conv2, hidden_ref, gates=gates_ref)

    torch.testing.assert_close(new, ref, **TOL)
    for a, b in zip(grads([new], [x, radial, *params]), grads([ref], [x, radial, *params])):
        torch.testing.assert_close(a, b, **TOL)


def test_norm_linear_gate_match_sliced_reference():
    torch.manual_seed(1)
    lmax, c, n = 3, 6, 9
    norm, linear = EquivariantRMSNorm(lmax, c).double(), SO3Linear(c, c, lmax).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(n, (lmax + 1) ** 2, c, dtype=torch.float64, requires_grad=True)
    gates = torch.randn(n, lmax * c, dtype=torch.float64, requires_grad=True)
    degrees = torch.tensor([l for l in range(lmax + 1) for _ in range(2 * l + 1)])

    def reference(x):
        balance = torch.cat([torch.full((2 * l + 1,), 1.0 / ((2 * l + 1) * (lmax + 1))) for l in range(lmax + 1)])
        scalar = x[:, :1] - x[:, :1].mean(dim=-1, keepdim=True)
        y = torch.cat([scalar, x[:, 1:]], dim=1)
        ms = (y.pow(2) * balance.double()[:, None]).sum(dim=1).mean(dim=-1)
        y = y * torch.rsqrt(ms + norm.eps)[:, None, None]
        y = y * norm.weight.repeat_interleave(torch.tensor([2 * l + 1 for l in range(lmax + 1)]), dim=0)
        y = torch.cat([y[:, :1] + norm.bias, y[:, 1:]], dim=1)
        y = torch.cat([lin(y[:, l * l : (l + 1) ** 2]) for l, lin in enumerate(linear.linears)], dim=1)
        g = torch.sigmoid(gates).reshape(n, lmax, c)[:, degrees[1:] - 1]
        return torch.cat([nn.functional.silu(y[:, :1]), y[:, 1:] * g], dim=1)

    new = gate(linear(norm(x)), gates, degrees)
    ref = reference(x)
    inputs = [x, gates, *norm.parameters(), *linear.parameters()]
    torch.testing.assert_close(new, ref, **TOL)
    for a, b in zip(grads([new], inputs), grads([ref], inputs)):
        torch.testing.assert_close(a, b, **TOL)


def test_gemnet_gather_and_aggregate_match_indexing_reference():
    torch.manual_seed(2)
    size, t, k, c = 7, 40, 5, 3
    index = torch.sort(torch.randint(0, size - 1, (t,))).values  # the last output gets nothing
    basis = torch.randn(t, k, dtype=torch.float64, requires_grad=True)
    rows = torch.randn(12, c, dtype=torch.float64, requires_grad=True)
    pick = torch.randint(0, 12, (t,))

    def reference(basis, rows):
        x = rows[pick]
        inner = inner_index(index, size)
        kmax = int(inner.max()) + 1
        basis_pad = basis.new_zeros(size, kmax, k).index_put((index, inner), basis)
        x_pad = x.new_zeros(size, kmax, c).index_put((index, inner), x)
        return basis_pad.transpose(1, 2) @ x_pad

    new = aggregate_outer(basis, gather(rows, pick), index, size)
    ref = reference(basis, rows)
    torch.testing.assert_close(new, ref, **TOL)
    # and the sum it stands for, written out
    outer = basis[:, :, None] * rows[pick][:, None, :]
    torch.testing.assert_close(new, torch.zeros(size, k, c, dtype=torch.float64).index_add(0, index, outer), **TOL)
    for a, b in zip(grads([new], [basis, rows]), grads([ref], [basis, rows])):
        torch.testing.assert_close(a, b, **TOL)
    assert math.isfinite(float(new.sum()))
