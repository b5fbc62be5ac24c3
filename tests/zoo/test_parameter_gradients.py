"""zoo.models.parameter_gradients: the trainer's backward of a conservative step reaches the parameters only,
with every parameter gradient and force unchanged, bit for bit; GemNet-OC's sparse sums skip the basis
gradients nobody reads."""

from __future__ import annotations

import pytest
import torch
from ase.build import molecule
from torch.utils.flop_counter import FlopCounterMode

import zoo.models.base
from datapipe import keys
from zoo.models.gemnet_oc import sparse
from zoo.models.parameter_gradients import parameter_gradients_only
from zoo.registry import build
from zoo.testing import evaluate, perturbed

f64 = torch.float64


def test_gradients_of_gradients_pass_through():
    """A ``create_graph`` backward through the Function: second derivatives as without it."""
    w = torch.tensor([0.7, -1.3], dtype=f64, requires_grad=True)
    x = torch.tensor([2.0, 0.5], dtype=f64, requires_grad=True)

    def run():
        (dx,) = torch.autograd.grad((w**3 * x.sin()).sum(), x, create_graph=True)  # a force-like output
        return (w**2 * x).sum(), dx

    expected = []
    for wrap in (False, True):
        energy, dx = parameter_gradients_only(run, [w]) if wrap else run()
        (g,) = torch.autograd.grad(energy + (dx**2).sum(), w, create_graph=True)
        (gg,) = torch.autograd.grad(g.sum(), w)
        expected.append((g.detach(), gg))
    for a, b in zip(*expected):
        assert torch.equal(a, b)


def test_steps_aside_without_gradients_or_where_ops_are_recorded():
    w = torch.ones(2, requires_grad=True)
    run = lambda: (w * 2,)  # noqa: E731
    for context in (torch.no_grad(), FlopCounterMode(display=False)):
        with context:
            (y,) = parameter_gradients_only(run, [w])
            assert y.grad_fn is None or "Parameter" not in type(y.grad_fn).__name__
    (y,) = parameter_gradients_only(run, [torch.ones(2)])  # no parameter requires a gradient
    assert type(y.grad_fn).__name__ == "MulBackward0"
    (y,) = parameter_gradients_only(run, [w])
    assert type(y.grad_fn).__name__ == "_ParameterGradientsBackward"


def _step(model, atoms, plain: bool, monkeypatch):
    """Conservative training step; ``plain``: the trainer's backward as before (through the positions too)."""
    with monkeypatch.context() as patch:
        if plain:
            patch.setattr(zoo.models.base, "parameter_gradients_only", lambda run, parameters: run())
        model.zero_grad(set_to_none=True)
        out = evaluate(model, atoms)
        loss = out[keys.ENERGY].abs().mean() + out[keys.FORCES].norm(dim=-1).mean()
        loss.backward()
    return out[keys.FORCES].detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["gemnet-oc", "esen", "mpnn"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_conservative_step_is_unchanged(name, dtype, monkeypatch):
    torch.manual_seed(0)
    overrides = {"num_blocks": 2} if name == "gemnet-oc" else {}
    model = build(name, 8, direct_forces=False, **overrides).to(dtype)
    model.set_normalization(None, 1.0)
    model.train()
    atoms = [perturbed(molecule("CH3CH2OH"), 1), perturbed(molecule("C6H6"), 2)]
    forces_plain, grads_plain = _step(model, atoms, True, monkeypatch)
    forces, grads = _step(model, atoms, False, monkeypatch)
    assert torch.equal(forces, forces_plain)
    assert grads.keys() == grads_plain.keys() and grads
    for key, g in grads.items():
        assert torch.equal(g, grads_plain[key]), key


def test_gemnet_sums_skip_the_basis_gradients(monkeypatch):
    """Of the three sampled dot products ``S`` per sum of a geometric basis (the forces, then the basis
    gradients of the forward sum and of the forces' sum in the trainer's backward), one remains; the
    atom-to-atom sum's learned radial basis keeps all three."""
    torch.manual_seed(0)
    model = build("gemnet-oc", 8, direct_forces=False, num_blocks=2)
    model.set_normalization(None, 1.0)
    model.train()
    atoms = [perturbed(molecule("CH3CH2OH"), 1)]
    calls = []
    forward = sparse._Sampled.forward

    def counted(ctx, u, v, plan):
        calls.append(plan.out.numel())
        return forward(ctx, u, v, plan)

    monkeypatch.setattr(sparse._Sampled, "forward", staticmethod(counted))
    _step(model, atoms, True, monkeypatch)
    before, calls[:] = list(calls), []
    _step(model, atoms, False, monkeypatch)
    # five sums of a geometric basis per block (three triplet sums, two quadruplet stages), two blocks
    assert len(before) - len(calls) == 2 * 5 * 2, (before, calls)
