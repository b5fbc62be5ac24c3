"""eSEN (zoo.models.esen.model): the zoo's property suite plus eSEN-specific checks.

Symmetry tolerance: zoo.testing.FP32_RTOL (2e-5 of the largest |value|, float32).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule
from e3nn import o3

from datapipe import keys
from zoo.registry import build, count_parameters
from zoo.models.esen.so2 import EdgeFrame, frame_layout
from zoo.testing import (
    ForceFieldTests,
    assert_invariant_energy_equivariant_forces,
    evaluate,
    perturbed,
    random_rotation,
)


@pytest.mark.slow  # the fast lane runs the shared suite on the MPNN (tests/zoo/test_mpnn.py)
class TestESEN(ForceFieldTests):
    """Default eSEN (lmax 2, mmax 2) at width 16."""

    model_name = "esen"
    width = 16
    overrides: ClassVar[dict] = {"num_layers": 2}
    equivariant = True
    reflections = False


def make(direct_forces=True, dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    model = build("esen", 8, direct_forces=direct_forces, num_layers=2, **overrides).to(dtype)
    model.set_normalization(None, 1.0)
    return model.eval()


@pytest.mark.parametrize("lmax,mmax", [pytest.param(4, 4, marks=pytest.mark.slow), pytest.param(4, 2, marks=pytest.mark.slow),
                                       (2, 1), (3, 0)])
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "conservative"])
def test_rotation_translation_other_lmax_mmax(lmax, mmax, direct):
    model = make(direct, lmax=lmax, mmax=mmax)
    atoms = perturbed(molecule("CH3CH2OH"), 2)
    for seed in range(2):
        assert_invariant_energy_equivariant_forces(model, atoms, random_rotation(seed))
    moved = atoms.copy()
    moved.positions += np.array([-4.0, 2.5, 9.0])
    base, shifted = evaluate(model, [atoms]), evaluate(model, [moved])
    torch.testing.assert_close(
        shifted[keys.FORCES], base[keys.FORCES], rtol=0, atol=1e-4 * float(base[keys.FORCES].abs().max())
    )


def test_not_claimed_reflection_invariant():
    """Spherical tensors without parity: a mirror image is a different input (documented)."""
    model = make(True)
    atoms = perturbed(molecule("CH3CH2OH"), 2)
    mirrored = atoms.copy()
    mirrored.positions = -atoms.positions
    a, b = evaluate(model, [atoms])[keys.FORCES], evaluate(model, [mirrored])[keys.FORCES]
    assert float((b + a).abs().max()) > 1e-6 * float(a.abs().max())


@pytest.mark.parametrize("axis", [(0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1), (1, 0, 0), (0, 1e-7, 1)])
def test_axis_aligned_edges_have_finite_gradients(axis):
    """Edges exactly along ±y (the frame pole), ±z and x: conservative forces and parameter
    gradients (a double backward, as in training) stay finite and equivariant."""
    model = make(False, dtype=torch.float64).train()
    direction = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    atoms = Atoms("COH", positions=[[0, 0, 0], 1.2 * direction, -1.0 * direction], info={"charge": 0, "spin": 2})
    out = evaluate(model, [atoms])
    forces = out[keys.FORCES]
    assert torch.isfinite(forces).all() and float(forces.abs().max()) > 0
    # collinear molecule: forces lie along the axis
    lateral = forces - (forces @ torch.as_tensor(direction)).unsqueeze(-1) * torch.as_tensor(direction)
    assert float(lateral.abs().max()) < 1e-9 * float(forces.abs().max()) + 1e-12
    (out[keys.ENERGY].sum() + forces.pow(2).sum()).backward()
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), f"non-finite gradient in {name}"


def test_lone_atom_and_edgeless_batch():
    for direct in (True, False):
        model = make(direct)
        lone = Atoms("O", positions=[[0, 0, 0]], info={"charge": -1, "spin": 2})
        out = evaluate(model, [lone])
        assert out[keys.ENERGY].shape == (1,) and torch.isfinite(out[keys.ENERGY]).all()
        assert torch.equal(out[keys.FORCES], torch.zeros(1, 3))  # no neighbours: no direction
        apart = Atoms("HH", positions=[[0, 0, 0], [0, 0, 20.0]])
        out = evaluate(model, [apart, lone])
        assert torch.isfinite(out[keys.ENERGY]).all() and torch.equal(out[keys.FORCES], torch.zeros(3, 3))


@pytest.mark.parametrize("lmax,mmax", [(2, 2), (4, 2)])
def test_wigner_rows_rotate_spherical_harmonics(lmax, mmax):
    """``D(R) Y(v) = Y(R v)`` (the definition of the Wigner-D matrix, in e3nn's basis) for edge
    directions including the frame poles ±y, and ``R n = e_y``; float64."""
    frame = EdgeFrame(lmax, mmax)
    n = torch.randn(64, 3, dtype=torch.float64)
    n = torch.cat(
        [n, torch.tensor([[0.0, 1, 0], [0, -1, 0], [1, 0, 0], [0, 0, -1], [0, -1e-12, 1]], dtype=torch.float64)]
    )
    n = n / n.norm(dim=-1, keepdim=True)
    rot = frame.rotation_to_y(n)  # [E, 3, 3]
    ey = torch.tensor([0.0, 1, 0], dtype=torch.float64).expand(len(n), 3)
    torch.testing.assert_close((rot @ n[:, :, None]).squeeze(-1), ey)
    torch.testing.assert_close(torch.linalg.det(rot), torch.ones(len(n), dtype=torch.float64))
    v = torch.randn(len(n), 3, dtype=torch.float64)
    ls = list(range(lmax + 1))
    keep = [l * l + l + m for l, m in frame_layout(lmax, mmax)]
    expected = o3.spherical_harmonics(ls, (rot @ v[:, :, None]).squeeze(-1), normalize=True)[:, keep]
    actual = (frame(n) @ o3.spherical_harmonics(ls, v, normalize=True)[:, :, None]).squeeze(-1)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-10)


def test_builds_on_meta_and_counts():
    with torch.device("meta"):
        model = build("esen", 1024, lmax=4)
    assert all(p.is_meta for p in model.parameters())
    assert count_parameters("esen", 32) < count_parameters("esen", 64) < count_parameters("esen", 64, lmax=4)
    real = build("esen", 16)
    assert sum(p.numel() for p in real.parameters()) == count_parameters("esen", 16)
    with pytest.raises(ValueError, match="mmax"):
        build("esen", 16, lmax=2, mmax=3)
