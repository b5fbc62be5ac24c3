"""MC-EGNN: the shared property suite (E(3): rotations and reflections) and model-specific checks."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from ase.build import molecule

from datapipe import keys
from zoo.registry import MODELS, build, count_parameters
from zoo.testing import (
    ForceFieldTests,
    assert_invariant_energy_equivariant_forces,
    evaluate,
    perturbed,
    random_rotation,
    water_cluster,
)


@pytest.mark.slow  # the fast lane runs the shared suite on the MPNN (tests/zoo/test_mpnn.py)
class TestMCEGNN(ForceFieldTests):
    model_name = "mc-egnn"
    width = 16
    overrides: ClassVar[dict] = {"num_layers": 3}  # 3 of the 7 default layers keep the suite fast
    equivariant = True
    reflections = True


@pytest.mark.slow
def test_default_depth_is_equivariant_under_e3():
    """The default 7-layer model, several rotations and a rotoreflection, direct and conservative."""
    atoms = perturbed(molecule("CH3CH2OH"), 9, charge=1, spin=2)
    for direct in (True, False):
        torch.manual_seed(1)
        model = build("mc-egnn", 32, direct_forces=direct).eval()
        for seed in range(2):
            assert_invariant_energy_equivariant_forces(model, atoms, random_rotation(seed))
        assert_invariant_energy_equivariant_forces(model, atoms, random_rotation(3, proper=False))


def test_vector_channels_follow_width():
    assert build("mc-egnn", 16).vector_channels == 4
    assert build("mc-egnn", 96).vector_channels == 12
    assert build("mc-egnn", 96, vector_channels=3).vector_channels == 3


def test_direct_forces_stay_bounded_as_neighbours_grow():
    """The 1/(1+n_i) scaling of the vector update: forces of a dense cluster stay O(1) per atom."""
    torch.manual_seed(0)
    model = build("mc-egnn", 32, num_layers=3).eval()
    model.set_normalization(None, 1.0)
    small = evaluate(model, [perturbed(molecule("H2O"), 0)])[keys.FORCES].detach()
    dense = evaluate(model, [water_cluster(27, seed=1, spacing=2.6)])[keys.FORCES].detach()
    rms_small, rms_dense = float(small.pow(2).mean().sqrt()), float(dense.pow(2).mean().sqrt())
    assert rms_dense < 5 * rms_small, (rms_small, rms_dense)


def test_parameter_count_scales_quadratically():
    n = {w: count_parameters("mc-egnn", w) for w in (96, 160, 896)}
    # same order of magnitude as the paper's MC-EGNN (1,055,050 / 2,745,453 / 78,480,670)
    for w, paper in ((96, 1_055_050), (160, 2_745_453), (896, 78_480_670)):
        assert 0.3 < n[w] / paper < 1.5, (w, n[w], paper)
    assert 50 < n[896] / 896**2 < 60


def test_constructs_on_meta_device():
    with torch.device("meta"):
        model = build("mc-egnn", max(MODELS["mc-egnn"].widths))
    assert all(p.is_meta for p in model.parameters())
    assert build("mc-egnn", 16, direct_forces=False).force_head is None
