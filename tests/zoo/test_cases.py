"""The failing cases handed to us in ../shared/cases, run on every architecture of the zoo.

Each case states its right behaviour in ../shared/cases/README.md; each test below checks it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ase.io import read

from datapipe import keys
from datapipe.graph import batch_from_atoms
from zoo.registry import MODELS, build

CASES = Path(__file__).resolve().parents[2].parent / "shared" / "cases"
pytestmark = pytest.mark.skipif(not CASES.is_dir(), reason=f"shared cases not found at {CASES}")


def model_for(name: str, direct_forces: bool):
    torch.manual_seed(0)
    model = build(name, min(MODELS[name].widths), direct_forces=direct_forces)
    model.set_normalization(None, 1.0)
    return model.eval()


def load(case: str, model) -> list:
    atoms = read(CASES / case, ":")
    for index, a in enumerate(atoms):
        a.info["structure_id"] = f"{case}:{index}"
    return atoms


def run(model, atoms_list):
    cutoff = model.data_cutoff
    return model(batch_from_atoms(atoms_list, cutoff=cutoff))


@pytest.fixture(params=[n if n == "mpnn" else pytest.param(n, marks=pytest.mark.slow) for n in sorted(MODELS)])
def name(request):
    return request.param


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "conservative"])
def test_c01_last_structure_without_edges(name, direct):
    model = model_for(name, direct)
    atoms = load("C01-last-structure-without-edges.extxyz", model)
    out = run(model, atoms)
    assert out[keys.ENERGY].shape == (3,), "benzene, water and Na+ each get an energy"
    assert torch.isfinite(out[keys.ENERGY]).all() and torch.isfinite(out[keys.FORCES]).all()
    if not direct:
        assert torch.equal(out[keys.FORCES][-1], torch.zeros(3, dtype=out[keys.FORCES].dtype))


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "conservative"])
def test_c02_atom_beyond_cutoff(name, direct):
    model = model_for(name, direct).train()
    atoms = load("C02-atom-beyond-cutoff.extxyz", model)
    batch = batch_from_atoms(atoms, cutoff=6.0)
    out = model(batch)
    loss = (out[keys.ENERGY] - batch[keys.ENERGY]).abs().sum() / 4 + (
        out[keys.FORCES] - batch[keys.FORCES]
    ).norm(dim=-1).mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(out[keys.FORCES][-1]).all(), "the far atom gets no NaN"
    for pname, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), f"non-finite gradient in {pname}"


def test_c03_coincident_atoms_raise(name):
    model = model_for(name, True)
    atoms = load("C03-coincident-atoms.extxyz", model)
    with pytest.raises(ValueError, match=r"C03-coincident-atoms\.extxyz:0.*coincident"):
        run(model, atoms)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "conservative"])
def test_c04_mixed_sizes_alone_equals_batched(name, direct):
    model = model_for(name, direct)
    atoms = load("C04-mixed-sizes.extxyz", model)
    together = run(model, atoms)
    alone = [run(model, [a]) for a in atoms]
    energy = torch.cat([a[keys.ENERGY] for a in alone])
    forces = torch.cat([a[keys.FORCES] for a in alone])
    scale_e = float(energy.detach().abs().max()) + 1e-12
    scale_f = float(forces.detach().abs().max()) + 1e-12
    assert float((together[keys.ENERGY] - energy).abs().max()) <= 1e-5 * scale_e
    assert float((together[keys.FORCES] - forces).abs().max()) <= 1e-4 * scale_f


def test_c05_dummy_atom_raises(name):
    model = model_for(name, True)
    atoms = load("C05-dummy-atom-Z0.extxyz", model)
    with pytest.raises(ValueError, match=r"C05-dummy-atom-Z0\.extxyz:0.*unsupported element Z=0"):
        run(model, atoms)
