"""The bf16 policy of :mod:`zoo.models.precision` on every architecture (width 16, CPU).

Stated tolerances (bf16 keeps 8 significant bits, relative rounding 2⁻⁹ ≈ 2e-3 per operation,
compounded over four layers; measured values in docs/precision.md):

- energies: ``max |E_bf16 − E_fp32| / atoms ≤ 0.02`` (σ = 1, so normalised units = eV/atom);
- forces: ``max |F_bf16 − F_fp32| ≤ 0.08 · max |F_fp32|``;
- rotation-equivariance error (``zoo.testing.rotation_error``) in bf16 ≤ 0.1 where fp32's is ≤ 1e-4
  (the bf16 error is the learned layers' rounding; the islands add none).
"""

from __future__ import annotations

import pytest
import torch
from ase.build import molecule
from torch import nn

from datapipe import keys
from zoo.models.precision import cast_parameters
from zoo.registry import build
from zoo.testing import evaluate, perturbed, precision_report, random_rotation, water_cluster

ARCHITECTURES = ["mpnn", "mc-egnn", "gemnet-oc", "esen"]
EQUIVARIANT = {"mpnn": False, "mc-egnn": True, "gemnet-oc": True, "esen": True}
ENERGY_PER_ATOM, FORCES, ROTATION_BF16, ROTATION_FP32 = 0.02, 0.08, 0.1, 1e-4


def make(name: str, direct: bool) -> nn.Module:
    torch.manual_seed(0)
    model = build(name, width=16, direct_forces=direct)
    model.set_normalization(None, 1.0)
    return model.eval()


def structures():
    return [water_cluster(6, seed=0), perturbed(molecule("CH3CH2OH"), 2), perturbed(molecule("C6H6"), 1)]


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "conservative"])
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_bf16_close_to_fp32_and_equivariance_bounded(name, direct):
    report = precision_report(make(name, direct), structures(), random_rotation(1))
    print(f"{name} {'direct' if direct else 'conservative'}: {report}")  # the numbers of docs/precision.md
    assert report["dtypes"] == ("torch.float64", "torch.float32"), report  # fp64 energy, fp32 forces
    assert report["energy_per_atom"] <= ENERGY_PER_ATOM, report
    assert report["forces"] <= FORCES, report
    assert report["forces"] > 0, "bf16 changed nothing: the policy did not run the learned layers in bf16"
    if EQUIVARIANT[name]:
        assert report["rotation_fp32"] <= ROTATION_FP32, report
        assert report["rotation_bf16"] <= ROTATION_BF16, report


def _record_dtypes(model: nn.Module, monkeypatch) -> dict[str, set]:
    """Forward hooks: output dtypes of every fp32 island (modules whose forward is ``@fp32_island``,
    GemNet-OC's Legendre basis, the conservative force gradient) and of every ``nn.Linear``."""
    seen: dict[str, set] = {"island": set(), "linear": set(), "islands": set()}

    def hook(kind, name):
        def record(module, args, output):
            seen[kind].add(output.dtype)
            if kind == "island":
                seen["islands"].add(type(module).__name__)
        return record

    for name, module in model.named_modules():
        if getattr(type(module).forward, "fp32_island", False):
            module.register_forward_hook(hook("island", name))
        elif isinstance(module, nn.Linear):
            module.register_forward_hook(hook("linear", name))
    import zoo.models.gemnet_oc.model as gemnet

    legendre = gemnet.legendre_basis

    def recorded_legendre(cosine, num):
        out = legendre(cosine, num)
        seen["island"].add(out.dtype)
        seen["islands"].add("legendre_basis")
        return out

    monkeypatch.setattr(gemnet, "legendre_basis", recorded_legendre)
    gradient = model.energy_gradient

    def recorded_gradient(energy, positions, edge_index):
        out = gradient(energy, positions, edge_index)
        seen["island"].update({energy.dtype, positions.dtype, out.dtype})
        seen["islands"].add("force_autograd")
        return out

    model.energy_gradient = recorded_gradient
    return seen


ISLANDS = {"mpnn": {"BesselBasis", "PolynomialEnvelope"}, "mc-egnn": {"BesselBasis", "PolynomialEnvelope"},
           "gemnet-oc": {"RadialBasis", "GaussianBasis", "PolynomialEnvelope", "legendre_basis"},
           "esen": {"EdgeFrame", "GaussianBasis", "PolynomialEnvelope"}}


@pytest.mark.parametrize("mode", ["engine", "autocast"])
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_islands_are_fp32_and_learned_layers_bf16(name, mode, monkeypatch):
    """Parameters in bf16 as the engines hold them, or fp32 parameters under CPU autocast: either
    way the radial bases, envelopes, Wigner-D / Legendre bases and the force autograd compute in
    fp32 while every linear layer outputs bf16."""
    model = make(name, direct=False)
    if mode == "engine":
        cast_parameters(model, torch.bfloat16)
    seen = _record_dtypes(model, monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        out = evaluate(model, [water_cluster(4, seed=1)])
    assert seen["islands"] >= ISLANDS[name] | {"force_autograd"}, seen
    assert seen["island"] == {torch.float32}, seen
    assert seen["linear"] == {torch.bfloat16}, seen
    assert out[keys.ENERGY].dtype == torch.float64 and out[keys.FORCES].dtype == torch.float32


def test_fp32_model_is_unchanged_by_the_policy():
    """In fp32 the islands are no-ops: fp32 evaluation equals the fp64 model to fp32 rounding."""
    model = make("esen", direct=True)
    out32 = evaluate(model, structures())
    out64 = evaluate(model.double(), structures())
    scale = float(out64[keys.FORCES].abs().max())
    assert float((out32[keys.FORCES].double() - out64[keys.FORCES]).abs().max()) <= 1e-4 * scale
