"""The ASE calculator loads a checkpoint and reproduces the model's energy and forces."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import molecule

from datapipe import keys
from zoo.hub.calculator import ZooCalculator
from zoo.hub.checkpoint import save_checkpoint
from zoo.hub.metadata import REQUIRED_KEYS
from zoo.registry import build
from zoo.testing import evaluate, perturbed


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "conservative"])
def test_calculator_matches_model_after_checkpoint_round_trip(tmp_path, direct):
    torch.manual_seed(0)
    model = build("mpnn", 64, direct_forces=direct)
    references = [0.0] * 101
    references[1], references[6], references[8] = -13.6, -1030.0, -2040.0
    model.set_normalization(references, 1.7)
    model.eval()
    meta = {key: 0 for key in REQUIRED_KEYS}
    meta.update(architecture="mpnn", width=64, config={}, validation={}, flops=None)
    save_checkpoint(tmp_path / "ckpt", model, meta)
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "ckpt").iterdir()}
    assert modes["model.safetensors"] == modes["metadata.json"], f"a checkpoint's files share one mode: {modes}"

    atoms = perturbed(molecule("CH3CH2OH"), 0, charge=1, spin=2)
    expected = evaluate(model, [atoms])
    atoms.calc = ZooCalculator(tmp_path / "ckpt")
    energy = atoms.get_potential_energy()
    assert energy == pytest.approx(float(expected[keys.ENERGY]), rel=1e-6)
    np.testing.assert_allclose(atoms.get_forces(), expected[keys.FORCES].detach().numpy(), rtol=1e-5, atol=1e-6)
    assert energy < -3000, "element references are applied"


def test_calculator_refuses_periodic_systems():
    torch.manual_seed(0)
    model = build("mpnn", 64)
    atoms = molecule("H2O")
    atoms.pbc = True
    atoms.cell = [10, 10, 10]
    atoms.calc = ZooCalculator(model)
    with pytest.raises(ValueError, match="non-periodic"):
        atoms.get_potential_energy()


def _calculator_and_model(direct: bool):
    torch.manual_seed(0)
    model = build("mpnn", 16, direct_forces=direct)
    model.set_normalization(None, 1.0)
    model.eval()
    return ZooCalculator(model), model


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "conservative"])
def test_new_charge_or_spin_on_the_same_atoms_gives_a_fresh_result(direct):
    """ASE's cache compares positions, numbers, cell, pbc, magmoms and charges — not atoms.info.
    Ethanol has 26 electrons: singlet, triplet (charge 0) and doublet cation (charge +1) are valid."""
    calculator, model = _calculator_and_model(direct)
    atoms = perturbed(molecule("CH3CH2OH"), 0, charge=0, spin=1)
    atoms.calc = calculator
    energies = {}
    for charge, spin in [(0, 1), (1, 2), (0, 3), (0, 1)]:
        atoms.info.update(charge=charge, spin=spin)
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        expected = evaluate(model, [atoms])
        assert energy == pytest.approx(float(expected[keys.ENERGY]), rel=1e-6), (charge, spin)
        np.testing.assert_allclose(forces, expected[keys.FORCES].detach().numpy(), rtol=1e-5, atol=1e-6)
        energies.setdefault((charge, spin), energy)
    assert len({round(e, 9) for e in energies.values()}) == 3, f"charge/spin did not change the energy: {energies}"
    atoms.info["spin"] = np.int64(3)  # numpy scalars as written by some readers compare as numbers
    assert atoms.get_potential_energy() == pytest.approx(energies[(0, 3)], rel=1e-9)


@pytest.mark.parametrize(("charge", "spin", "message"), [
    (0.5, 1, "charge 0.5 is not an integer"),
    (0, 1.5, "multiplicity 1.5 is not an integer"),
    (0, 2, "multiplicity 2 does not match 26 electrons"),
    (1, 1, "multiplicity 1 does not match 25 electrons"),
    (0, 0, "multiplicity 0 < 1"),
])
def test_calculator_refuses_invalid_charge_or_spin(charge, spin, message):
    calculator, _ = _calculator_and_model(True)
    atoms = perturbed(molecule("CH3CH2OH"), 0, charge=0, spin=1)
    atoms.info.update(charge=charge, spin=spin, structure_id="my-ethanol")
    atoms.calc = calculator
    with pytest.raises(ValueError, match=f"my-ethanol.*{message}"):
        atoms.get_potential_energy()
