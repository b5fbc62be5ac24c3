"""FLOP counting: fvcore handles cover every operator, the step count agrees with FlopCounterMode."""

from __future__ import annotations

from pathlib import Path

import ase.io
import pytest
import torch
from ase import Atoms
from ase.build import molecule
from e3nn import o3
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from datapipe import keys
from datapipe.graph import batch_from_atoms
from zoo.models.base import ForceField
from zoo.models.common import BesselBasis, ChargeSpinEmbedding, PolynomialEnvelope, mlp, scatter_sum
from zoo.flops.handles import OP_COSTS, ZERO_COST, einsum_fmas
from zoo.flops.peaks import lookup_peak, measure_peak, mfu, peak_flops
from zoo.flops.counter import StepFlopCounter
from zoo.flops.trace import count_parameters, count_step, kappa
from zoo.registry import MODELS, build
from zoo.testing import water_cluster

CASES = Path(__file__).resolve().parents[2].parent / "shared" / "cases"
needs_cases = pytest.mark.skipif(not CASES.is_dir(), reason=f"shared cases not found at {CASES}")


class TinyEquivariant(ForceField):
    """A small e3nn model: spherical harmonics, o3.Linear, a tensor product, index_add, embeddings."""

    def __init__(self, width: int = 8, direct_forces: bool = True) -> None:
        super().__init__(cutoff=5.0, direct_forces=direct_forces)
        self.embed = nn.Embedding(self.max_atomic_number + 1, width)
        self.charge_spin = ChargeSpinEmbedding(width)
        self.rbf, self.envelope = BesselBasis(5.0, 8), PolynomialEnvelope(5.0)
        self.radial = mlp([8, width, width])
        self.irreps_sh = o3.Irreps.spherical_harmonics(2)
        hidden = o3.Irreps(f"{width}x0e+{width}x1o+{width}x2e")
        self.lift = o3.Linear(o3.Irreps(f"{width}x0e"), hidden)
        self.tp = o3.FullyConnectedTensorProduct(hidden, self.irreps_sh, o3.Irreps(f"{width}x0e+{width}x1o"))
        self.head = mlp([width, width, 1])
        self.force_head = o3.Linear(o3.Irreps(f"{width}x0e+{width}x1o"), o3.Irreps("1x1o"))

    def interact(self, atomic_numbers, positions, edge_index, edge_vectors, batch, charge, spin, num_graphs):
        source, target, n = edge_index[0], edge_index[1], atomic_numbers.shape[0]
        h = self.embed(atomic_numbers) + self.charge_spin(charge, spin)[batch]  # [N, W]
        d = edge_vectors.norm(dim=-1)  # [E]
        sh = o3.spherical_harmonics(self.irreps_sh, edge_vectors, normalize=True)  # [E, 9]
        w = self.radial(self.rbf(d)) * self.envelope(d).unsqueeze(-1)  # [E, W]
        x = self.lift(scatter_sum(h[source] * w, target, n))  # [N, 9W]
        y = scatter_sum(self.tp(x[source], sh), target, n)  # [N, 4W]
        energy = self.head(torch.nn.functional.silu(y[:, : h.shape[1]]) + h).squeeze(-1)  # [N]
        return energy, (self.force_head(y) if self.direct_forces else None)


def last_structure_without_edges() -> list[Atoms]:
    """Benzene, water, then a lone Na⁺ (no edges): the layout of the handed-in case C01, built here
    (ASE's benzene and water are C01's geometries) so that the FLOP tests need nothing from ../shared."""
    ion = Atoms("Na", positions=[[0.0, 0.0, 0.0]])
    ion.info.update(charge=1, spin=1)
    return [molecule("C6H6"), molecule("H2O"), ion]


def small_batch(cutoff: float, structures: list[Atoms] | None = None):
    atoms = (structures or last_structure_without_edges()) + [water_cluster(6)]
    return batch_from_atoms(atoms, cutoff=cutoff)


def flop_counter_mode_step(model, batch) -> int:
    """Matmul FLOPs of one real training step (forward with forces, paper loss, backward)."""
    model.train()
    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:
        out = model(batch)
        atoms = batch[keys.NATOMS].to(out[keys.ENERGY].dtype)
        loss = ((out[keys.ENERGY] - out[keys.ENERGY].detach() - 1.0) / atoms).abs().mean()
        loss = loss + (out[keys.FORCES] - 0.5).norm(dim=-1).mean()
        loss.backward()
    return counter.get_total_flops()


def step_agreement(model, batch) -> tuple:
    flops = count_step(model, batch)
    reference = flop_counter_mode_step(model, batch)
    return flops, reference


# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "conservative"])
def test_e3nn_model_fully_counted_and_matches_flop_counter_mode(direct):
    torch.manual_seed(0)
    model = TinyEquivariant(8, direct_forces=direct)
    batch = small_batch(model.cutoff)
    flops, reference = step_agreement(model, batch)
    assert flops.unsupported == {}
    # o3.Linear and the tensor product are contractions; spherical harmonics are elementwise
    assert flops.by_operator["tensordot"] > 0 and flops.by_operator["einsum"] > 0
    assert flops.by_operator["mul"] > 0 and flops.by_operator["pow"] > 0 and flops.by_operator["index_add"] > 0
    assert flops.forward > flops.matmul_forward
    assert flops.matmul_step == pytest.approx(reference, rel=0.05)
    if direct:
        assert flops.force_backward == 0
    else:
        assert flops.force_backward > 0.5 * flops.matmul_forward


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "conservative"])
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("esen", "gemnet-oc") else n
                                  for n in sorted(MODELS)])
def test_zoo_model_step_matches_flop_counter_mode(name, direct):
    """Every operator has a handle (fvcore's unsupported list is empty); the step's matmul FLOPs
    (forward + force backward + double backward) agree with FlopCounterMode within 5 %."""
    torch.manual_seed(0)
    model = build(name, width=MODELS[name].widths[0], direct_forces=direct)
    batch = small_batch(model.data_cutoff)
    flops, reference = step_agreement(model, batch)
    assert flops.unsupported == {}, f"{name}: operators without a FLOP handle: {flops.unsupported}"
    assert flops.matmul_step == pytest.approx(reference, rel=0.05)
    ratio = flops.total / flops.forward
    assert (2.0 < ratio < 3.5) if direct else (4.0 < ratio < 7.5), ratio
    assert 0 < kappa(flops, count_parameters(model)) < 1000


@needs_cases
def test_handed_in_case_c01_is_fully_counted():
    """The handed-in file itself (a structure without edges last in the batch), conservative forces."""
    torch.manual_seed(0)
    model = build("mpnn", width=MODELS["mpnn"].widths[0], direct_forces=False)
    batch = small_batch(model.data_cutoff, ase.io.read(CASES / "C01-last-structure-without-edges.extxyz", ":"))
    flops, reference = step_agreement(model, batch)
    assert flops.unsupported == {}
    assert flops.matmul_step == pytest.approx(reference, rel=0.05)


def test_unknown_operator_is_reported_not_skipped():
    class Odd(TinyEquivariant):
        def interact(self, *args):
            energy, forces = super().interact(*args)
            return torch.special.bessel_j0(energy), forces

    flops = count_step(Odd(4), small_batch(5.0))
    assert "aten::special_bessel_j0" in flops.unsupported


def test_zero_cost_ops_are_listed_with_zero_flops():
    for op in ("view", "reshape", "index_select", "embedding", "cat", "zeros", "expand"):
        assert f"aten::{op}" in OP_COSTS
        assert OP_COSTS[f"aten::{op}"].forward([], []) == 0
    assert "reshape" in ZERO_COST


@pytest.mark.parametrize(
    "equation, shapes",
    [("ab,bc->ac", [[7, 5], [5, 3]]), ("zui,zvi->zuv", [[4, 3, 5], [4, 2, 5]]), ("cb,ca->cba", [[6, 1], [6, 4]]),
     ("dbc,dba->dca", [[6, 1, 4], [6, 1, 3]]), ("abc,cd,de->abe", [[3, 4, 5], [5, 6], [6, 7]])],
)
def test_einsum_count_matches_torch_execution(equation, shapes):
    tensors = [torch.randn(s) for s in shapes]
    with FlopCounterMode(display=False) as counter:
        torch.einsum(equation, *tensors)
    fmas, _ = einsum_fmas(equation, shapes)
    assert 2 * fmas == counter.get_total_flops()


def test_step_flop_counter_fit_cache_and_error():
    torch.manual_seed(0)
    model = build("mpnn", width=32)
    counter = StepFlopCounter(model, budget=0.0)
    batches = [batch_from_atoms([water_cluster(n, seed=n)] * (1 + n % 3), cutoff=model.cutoff) for n in range(2, 14)]
    exact = [count_step(model, b).total for b in batches]
    got = [counter.step_flops(b) for b in batches]
    assert counter.exact_counts == counter.min_exact < len(batches)
    assert got[: counter.min_exact] == exact[: counter.min_exact]
    for g, e in zip(got[counter.min_exact:], exact[counter.min_exact:]):
        assert g == pytest.approx(e, rel=0.01)
    assert counter.step_flops(batches[0]) == exact[0]  # cached
    verifying = StepFlopCounter(model, budget=1.0, min_exact=counter.min_exact)
    assert [verifying.step_flops(b) for b in batches] == exact
    assert verifying.max_fit_error < 0.01


def test_peaks_and_mfu():
    assert lookup_peak("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert lookup_peak("NVIDIA H100 PCIe", "bf16") == 756e12
    assert lookup_peak("NVIDIA A100-SXM4-80GB", "fp32") == 19.5e12
    assert lookup_peak("Some Unknown GPU", "bf16") is None
    peak, source = peak_flops("cpu")
    assert peak == measure_peak("cpu") > 1e8 and source.startswith("measured")
    assert mfu(peak / 4, "cpu") == pytest.approx(0.25)


def test_cli_reports_kappa():
    from typer.testing import CliRunner

    from zoo.cli import app

    result = CliRunner().invoke(app, ["flops", "--model", "mpnn", "--width", "16", "--atoms", "1e9"])
    assert result.exit_code == 0, result.output
    assert "kappa" in result.output and "mpnn" in result.output and "2.33" in result.output
