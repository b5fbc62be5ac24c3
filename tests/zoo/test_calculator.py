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
