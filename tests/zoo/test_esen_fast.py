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


@pytest.mark.parametrize("lmax,mmax", [(2, 2), (4, 4), (3, 1)])
def test_gauss_products_equal_block_matrix_in_float64(lmax, mmax):
    """The opt-in Gauss product (3 matmuls per |m| > 0) against the default block matrix."""
    from zoo.models.esen.so2 import SO2Convolution

    torch.manual_seed(0)
    plain = SO2Convolution(6, 5, lmax, mmax, extra_scalars=lmax * 5).double()
    gauss = SO2Convolution(6, 5, lmax, mmax, extra_scalars=lmax * 5, gauss_products=True).double()
    gauss.load_state_dict(plain.state_dict())  # the same parameters: the option is numerics only
    k = plain.sizes[0] + 2 * sum(plain.sizes[1:])
    x = torch.randn(11, k, 6, dtype=torch.float64, requires_grad=True)
    radial = torch.randn(11, plain.radial_size, dtype=torch.float64, requires_grad=True)
    outs = [conv(x, radial=radial) for conv in (plain, gauss)]
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    gen = torch.Generator().manual_seed(3)
    probe = torch.randn(outs[0][0].shape, dtype=torch.float64, generator=gen)
    grads = [torch.autograd.grad((out[0] * probe).sum(), [x, radial, *conv.parameters()])
             for out, conv in zip(outs, (plain, gauss))]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "conservative"])
def test_gauss_products_model_equivariant_and_close_to_default(direct):
    from ase.build import molecule

    from datapipe import keys
    from zoo.registry import build
    from zoo.testing import assert_invariant_energy_equivariant_forces, evaluate, perturbed, random_rotation

    atoms = perturbed(molecule("CH3CH2OH"), 2)
    models = []
    for gauss in (False, True):
        torch.manual_seed(0)
        model = build("esen", 8, direct_forces=direct, num_layers=2, gauss_products=gauss).double().eval()
        model.set_normalization(None, 1.0)
        models.append(model)
    assert_invariant_energy_equivariant_forces(models[1], atoms, random_rotation(0))
    plain, gauss = evaluate(models[0], [atoms]), evaluate(models[1], [atoms])
    for key in (keys.ENERGY, keys.FORCES):
        torch.testing.assert_close(gauss[key], plain[key], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "conservative"])
def test_flop_counters_see_the_plain_gather(direct):
    """The launcher counts every step's FLOPs (a jit trace and a dispatch mode): both must see
    index_select + cat, not the opaque Function (``make train`` once stopped at its first step with
    'operators without a FLOP handle: prim::PythonOp._GatherPair'). A fast-lane guard for the slow
    FLOP agreement tests of tests/zoo/test_flops.py."""
    from ase.build import molecule
    from torch.utils.flop_counter import FlopCounterMode

    from datapipe.graph import batch_from_atoms
    from zoo.flops.trace import count_step
    from zoo.registry import build

    torch.manual_seed(0)
    model = build("esen", 8, direct_forces=direct, num_layers=1)
    batch = batch_from_atoms([molecule("CH3CH2OH"), molecule("C6H6")], cutoff=model.data_cutoff)
    flops = count_step(model, batch, direct)
    assert flops.unsupported == {}, flops.unsupported
    assert flops.total > flops.forward > 0
    with FlopCounterMode(display=False) as mode:
        x = torch.randn(5, 4, 3, requires_grad=True)
        pair = gather_pair(x, torch.tensor([0, 1]), torch.tensor([2, 3]))
    assert pair.grad_fn.name() == "CatBackward0"  # plain ops under a dispatch mode
    assert mode.get_total_flops() == 0


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "conservative"])
def test_onednn_products_train_like_the_blas_to_fp32_round_off(direct):
    """zoo.models.dense (fp32 products in oneDNN, not the BLAS): a fixed-seed fp32 training run of
    five Adam steps gives the same losses, forces and parameter gradients to fp32 round-off."""
    from ase.build import molecule

    from datapipe import keys
    from datapipe.graph import batch_from_atoms
    from zoo.registry import build
    from zoo.testing import perturbed

    batch = batch_from_atoms([perturbed(molecule("CH3CH2OH"), 1), perturbed(molecule("C6H6"), 2)], cutoff=6.0)
    runs = []
    for onednn in (True, False):
        torch.manual_seed(0)
        model = build("esen", 16, direct_forces=direct, num_layers=2).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        losses = []
        with torch.backends.mkldnn.flags(enabled=onednn):
            for _ in range(5):
                out = model(batch)
                loss = out[keys.ENERGY].abs().mean() + out[keys.FORCES].norm(dim=-1).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.detach())
        grads = [p.grad for p in model.parameters()]
        runs.append((torch.stack(losses), out[keys.FORCES].detach(), grads))
    (losses, forces, grads), (blas_losses, blas_forces, blas_grads) = runs
    torch.testing.assert_close(losses, blas_losses, rtol=1e-5, atol=0)
    torch.testing.assert_close(forces, blas_forces, rtol=0, atol=1e-4 * float(blas_forces.abs().max()))
    for g, h in zip(grads, blas_grads):
        assert (g is None) == (h is None)  # (the unused direct-force head of a conservative model)
        if h is not None:
            torch.testing.assert_close(g, h, rtol=0, atol=1e-4 * float(h.abs().max()) + 1e-12)
