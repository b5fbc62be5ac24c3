"""eSEN's faster formulations of issue 12 (zoo.models.esen.edges) against the plain ones, float64.

Outputs, gradients and (for conservative forces) second derivatives must be bit-identical to the
formulation they replace. Speed is measured in benchmarks/bench_vs_fairchem.py, not here.
"""

from __future__ import annotations

import pytest
import torch

from zoo.models.esen import edges
from zoo.models.esen.edges import gather_pair


def plain_pair(x, source, target):
    """The formulation gather_pair replaces."""
    return torch.cat([x.index_select(0, source), x.index_select(0, target)], dim=-1)


@pytest.mark.parametrize("chunk_bytes", [edges._CHUNK_BYTES, 200])  # one chunk, and many
def test_gather_pair_equals_plain_in_value_gradient_and_second_derivative(monkeypatch, chunk_bytes):
    monkeypatch.setattr(edges, "_CHUNK_BYTES", chunk_bytes)
    gen = torch.Generator().manual_seed(0)
    n, k, c, e = 7, 9, 5, 40
    x = torch.randn(n, k, c, dtype=torch.float64, generator=gen, requires_grad=True)
    source, target = torch.randint(0, n, (e,), generator=gen), torch.randint(0, n - 1, (e,), generator=gen)
    weight = torch.randn(e, k, 2 * c, dtype=torch.float64, generator=gen)
    results = []
    for pair_of in (gather_pair, plain_pair):
        pair = pair_of(x, source, target)  # [E, K, 2C]
        energy = (torch.tanh(pair) * weight).sum()
        (grad,) = torch.autograd.grad(energy, x, create_graph=True)  # through the scatter
        (second,) = torch.autograd.grad((grad * grad.detach()).sum(), x)  # through the double backward
        results.append((pair.detach(), grad.detach(), second))
    for new, old in zip(*results):
        assert torch.equal(new, old)


def test_gather_pair_refuses_flat_features():
    with pytest.raises(ValueError, match=r"\[N, K, C\]"):
        gather_pair(torch.zeros(3, 4), torch.tensor([0]), torch.tensor([1]))
