"""eSEN's faster formulations of issue 12 (zoo.models.esen.edges) against the plain ones, float64.

Outputs, gradients and (for conservative forces) second derivatives must be bit-identical to the
formulation they replace (gather_pair), or equal to float64 round-off where a kernel sums the same
products in another order (edge_matmul). Speed is measured in benchmarks/bench_vs_fairchem.py, not here.
"""

from __future__ import annotations

import pytest
import torch

from zoo.models.esen import edges
from zoo.models.esen.edges import edge_matmul, gather_pair


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


@pytest.mark.parametrize("m,k,n", [(9, 9, 7), (7, 9, 9), (9, 9, 3), (3, 9, 9)])  # both orientations
@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)])
def test_edge_matmul_equals_plain_in_value_gradient_and_second_derivative(m, k, n, needs):
    """edge_matmul (the per-edge Wigner rotations, issue 12) against ``a @ b``, float64: the same
    products summed in another order, so equal to round-off at every derivative order."""
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(13, m, k, dtype=torch.float64, generator=gen).requires_grad_(needs[0])
    b = torch.randn(13, k, n, dtype=torch.float64, generator=gen).requires_grad_(needs[1])
    weight = torch.randn(13, m, n, dtype=torch.float64, generator=gen)
    inputs = [t for t in (a, b) if t.requires_grad]
    results = []
    for product in (edge_matmul, torch.matmul):
        out = product(a, b)  # [E, M, N]
        energy = (torch.tanh(out) * weight).sum()
        grads = torch.autograd.grad(energy, inputs, create_graph=True)
        second = torch.autograd.grad(sum((g * g.detach()).sum() for g in grads), inputs)
        results.append((out.detach(), *(g.detach() for g in grads), *second))
    for new, old in zip(*results):
        torch.testing.assert_close(new, old, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "conservative"])
def test_edge_matmul_model_trains_like_plain_products_in_float64(monkeypatch, direct):
    """The whole model with edge_matmul against ``a @ b`` for its rotations, float64: energies,
    forces and the parameter gradients of a force loss (second derivatives when conservative)."""
    from ase.build import molecule

    from datapipe import keys
    from datapipe.graph import batch_from_atoms
    from zoo.models.esen import model as esen_model
    from zoo.registry import build
    from zoo.testing import perturbed

    batch = batch_from_atoms([perturbed(molecule("CH3CH2OH"), 1), perturbed(molecule("C6H6"), 2)], cutoff=6.0)
    torch.manual_seed(0)
    model = build("esen", 8, direct_forces=direct, num_layers=2).double().train()
    runs = []
    for product in (edge_matmul, torch.matmul):
        monkeypatch.setattr(esen_model, "edge_matmul", product)
        out = model(batch)
        loss = out[keys.ENERGY].abs().mean() + out[keys.FORCES].norm(dim=-1).mean()
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        runs.append((out[keys.ENERGY].detach(), out[keys.FORCES].detach(), grads))
    for new, old in zip(runs[0][:2], runs[1][:2]):
        torch.testing.assert_close(new, old, rtol=1e-10, atol=1e-10)
    for g, h in zip(runs[0][2], runs[1][2]):
        assert (g is None) == (h is None)
        if h is not None:
            torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-10)


def test_edge_matmul_is_the_plain_product_with_onednn_off():
    """``--cpu-matmul blas`` (torch.backends.mkldnn off) keeps earlier releases' products bit for bit."""
    a, b = torch.randn(3, 9, 9, requires_grad=True), torch.randn(3, 9, 4)
    assert edge_matmul(a, b).grad_fn.name() == "_EdgeMatmulBackward"
    with torch.backends.mkldnn.flags(enabled=False):
        out = edge_matmul(a, b)
    assert out.grad_fn.name() == "UnsafeViewBackward0"  # matmul's own graph, not the Function
    assert torch.equal(out, a @ b)


def test_edge_matmul_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\[E, M, K\]"):
        edge_matmul(torch.zeros(2, 3, 4), torch.zeros(2, 5, 6))


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
