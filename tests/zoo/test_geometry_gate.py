"""The geometry gate (zoo.models.geometry_gate): the trainer's backward of a conservative step stops at the
positions-only tensors, and every parameter gradient and force stays the same, bit for bit."""

from __future__ import annotations

import contextlib

import pytest
import torch
from ase.build import molecule
from torch.utils.flop_counter import FlopCounterMode

from datapipe import keys
from zoo.models.gemnet_oc import sparse
from zoo.models.geometry_gate import geometric, gradient_wanted, marked, position_gradients, taking_position_gradients
from zoo.registry import build
from zoo.testing import evaluate, perturbed

f64 = torch.float64


def test_gate_passes_inside_position_gradients_and_drops_outside():
    x = torch.randn(5, dtype=f64, requires_grad=True)
    y = geometric(x.exp())
    assert marked(y) and torch.equal(y, x.exp())
    assert not gradient_wanted(y) and not taking_position_gradients()
    with position_gradients(), position_gradients():  # re-entrant
        assert gradient_wanted(y) and taking_position_gradients()
        (g,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
    assert not taking_position_gradients()
    torch.testing.assert_close(g, 2 * x.exp() ** 2)
    # the double backward outside: the second-order path through the mark is dropped, the rest stays
    w = torch.randn(5, dtype=f64, requires_grad=True)
    with position_gradients():
        (g,) = torch.autograd.grad((geometric(x * 1.0) * w).sum(), x, create_graph=True)  # g = w
    (g * g).sum().backward()
    torch.testing.assert_close(w.grad, 2 * w.detach())
    assert x.grad is None


def test_gate_steps_aside_without_gradients_or_where_ops_are_recorded():
    x = torch.randn(3)
    assert geometric(x) is x and not marked(x)
    x = torch.randn(3, requires_grad=True)
    with FlopCounterMode(display=False):
        assert geometric(x) is x
    assert not marked(None) and gradient_wanted(x)


def _gemnet_step(model, atoms, through: bool):
    """Conservative training step; ``through``: every gradient let through the marks (the step as before)."""
    model.zero_grad(set_to_none=True)
    with position_gradients() if through else contextlib.nullcontext():
        out = evaluate(model, atoms)
        loss = out[keys.ENERGY].abs().mean() + out[keys.FORCES].norm(dim=-1).mean()
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out[keys.FORCES].detach(), grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gemnet_conservative_step_unchanged_and_fewer_sampled_dots(dtype, monkeypatch):
    torch.manual_seed(0)
    model = build("gemnet-oc", 8, direct_forces=False, num_blocks=2).to(dtype)
    model.set_normalization(None, 1.0)
    model.train()
    atoms = [perturbed(molecule("CH3CH2OH"), 1), perturbed(molecule("C6H6"), 2)]
    calls = []
    forward = sparse._Sampled.forward

    def counted(ctx, u, v, plan):
        calls.append(plan.out.numel())
        return forward(ctx, u, v, plan)

    monkeypatch.setattr(sparse._Sampled, "forward", staticmethod(counted))
    forces_all, grads_all = _gemnet_step(model, atoms, through=True)
    sampled_all, calls[:] = len(calls), []
    forces, grads = _gemnet_step(model, atoms, through=False)
    assert torch.equal(forces, forces_all)
    assert grads.keys() == grads_all.keys() and len(grads) == len(list(model.parameters()))
    for name, g in grads.items():
        assert torch.equal(g, grads_all[name]), name
    # the five sums of a geometric basis per block (three triplet sums, two quadruplet stages) take one
    # sampled dot product each (the forces) instead of three; the atom-to-atom sum's learned basis all three
    assert sampled_all - len(calls) == 2 * 5 * 2
