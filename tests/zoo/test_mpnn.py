"""MPNN (unconstrained baseline) and the symmetry-loss helpers of ``zoo.models.symmetry``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import molecule

from datapipe import keys
from datapipe.graph import batch_from_atoms
from zoo.registry import MODELS, build, count_parameters
from zoo.models.symmetry import random_rotations, rotated_copies, with_rotated_copies
from zoo.testing import ForceFieldTests, perturbed, random_rotation, rotation_error


class TestMPNN(ForceFieldTests):
    """The shared property suite; rotations only checked to *break* the symmetry."""

    model_name = "mpnn"
    width = 16
    equivariant = False


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "conservative"])
def test_rotation_error_is_large(direct):
    """Not equivariant: report the relative force error under rotations (printed with -s)."""
    torch.manual_seed(0)
    model = build("mpnn", 32, direct_forces=direct).eval()
    atoms = perturbed(molecule("CH3CH2OH"), 2)
    errors = [rotation_error(model, atoms, random_rotation(seed)) for seed in range(3)]
    print(f"mpnn width 32 {'direct' if direct else 'conservative'}: rotation error {np.round(errors, 4)}")
    assert min(errors) > 1e-3


def test_parameter_count_scales_quadratically():
    n = {w: count_parameters("mpnn", w) for w in (128, 256, 4096)}
    # within 15 % of the paper's MPNN (arXiv 2510.09768 checkpoints: 222,916 / 839,044 / 202,168,324)
    for w, paper in ((128, 222_916), (256, 839_044), (4096, 202_168_324)):
        assert abs(n[w] / paper - 1) < 0.15, (w, n[w], paper)
    assert 3.7 < n[256] / n[128] < 4.0


def test_constructs_on_meta_device():
    with torch.device("meta"):
        model = build("mpnn", max(MODELS["mpnn"].widths))
    assert all(p.is_meta for p in model.parameters())


def test_conservative_model_has_no_force_head():
    assert build("mpnn", 8, direct_forces=False).force_head is None
    assert count_parameters("mpnn", 8, direct_forces=False) < count_parameters("mpnn", 8)


# -- zoo.models.symmetry -----------------------------------------------------------------------------------
def test_random_rotations_are_proper_and_haar():
    r = random_rotations(4000, torch.Generator().manual_seed(0))  # [M, 3, 3] float64
    eye = torch.eye(3, dtype=r.dtype)
    assert torch.allclose(r @ r.transpose(1, 2), eye.expand_as(r), atol=1e-12)
    assert torch.allclose(torch.linalg.det(r), torch.ones(len(r), dtype=r.dtype), atol=1e-12)
    # Haar on SO(3): E[R] = 0, E[trace R] = 0, E[R_ab²] = 1/3, E[(trace R)²] = 1
    assert float(r.mean(0).abs().max()) < 0.05
    assert abs(float((r**2).mean(0).mean()) - 1 / 3) < 0.01
    trace = torch.diagonal(r, dim1=1, dim2=2).sum(-1)
    assert abs(float(trace.mean())) < 0.05 and abs(float((trace**2).mean()) - 1) < 0.08
    again = random_rotations(4000, torch.Generator().manual_seed(0))
    assert torch.equal(r, again), "seeded generator must reproduce the rotations"
    with pytest.raises(ValueError):
        random_rotations(-1)


def _labelled_batch():
    mols = [perturbed(molecule("CH3CH2OH"), 1), perturbed(molecule("H2O"), 2, charge=-1, spin=2)]
    batch = batch_from_atoms(mols, cutoff=6.0)
    batch[keys.FORCES] = torch.randn(batch[keys.POSITIONS].shape, generator=torch.Generator().manual_seed(3))
    batch[keys.ENERGY] = torch.tensor([-1.5, 2.0], dtype=torch.float64)
    return batch


def test_rotated_copies_rotate_positions_and_forces():
    batch = _labelled_batch()
    rotations = random_rotations(3, torch.Generator().manual_seed(1))
    copies = rotated_copies(batch, rotations)
    n, b = batch[keys.POSITIONS].shape[0], batch.num_graphs
    assert copies.num_graphs == 3 * b and copies[keys.POSITIONS].shape == (3 * n, 3)
    for k in range(3):
        r = rotations[k].float()
        block = slice(k * n, (k + 1) * n)
        torch.testing.assert_close(copies[keys.POSITIONS][block], batch[keys.POSITIONS] @ r.T)
        torch.testing.assert_close(copies[keys.FORCES][block], batch[keys.FORCES] @ r.T)
        assert torch.equal(copies[keys.ATOMIC_NUMBERS][block], batch[keys.ATOMIC_NUMBERS])
        assert torch.equal(copies[keys.BATCH][block], batch[keys.BATCH] + k * b)
        assert torch.equal(copies[keys.ENERGY][k * b : (k + 1) * b], batch[keys.ENERGY])
        assert torch.equal(copies[keys.CHARGE][k * b : (k + 1) * b], batch[keys.CHARGE])
        assert torch.equal(copies[keys.SPIN][k * b : (k + 1) * b], batch[keys.SPIN])
    # the graph is the same graph, offset per copy; edge vectors recomputed from positions agree
    e = batch[keys.EDGE_INDEX].shape[1]
    assert torch.equal(copies[keys.EDGE_INDEX][:, e : 2 * e], batch[keys.EDGE_INDEX] + n)
    src, dst = copies[keys.EDGE_INDEX]
    lengths = (copies[keys.POSITIONS][src] - copies[keys.POSITIONS][dst]).norm(dim=-1)
    s0, d0 = batch[keys.EDGE_INDEX]
    base = (batch[keys.POSITIONS][s0] - batch[keys.POSITIONS][d0]).norm(dim=-1)
    torch.testing.assert_close(lengths, base.repeat(3))
    assert copies[keys.STRUCTURE_ID] == batch[keys.STRUCTURE_ID] * 3


def test_with_rotated_copies_keeps_the_original_first():
    batch = _labelled_batch()
    out = with_rotated_copies(batch, 2, torch.Generator().manual_seed(0))
    n = batch[keys.POSITIONS].shape[0]
    assert out.num_graphs == 3 * batch.num_graphs
    assert torch.equal(out[keys.POSITIONS][:n], batch[keys.POSITIONS])
    assert not torch.allclose(out[keys.POSITIONS][n : 2 * n], batch[keys.POSITIONS])
    assert with_rotated_copies(batch, 0) is batch
    with pytest.raises(ValueError, match="orthogonal"):
        rotated_copies(batch, 2 * torch.eye(3).unsqueeze(0))


def test_rotated_copies_evaluate_like_rotated_inputs():
    """A model on the combined batch gives the same outputs as on each rotated copy alone."""
    torch.manual_seed(0)
    model = build("mpnn", 16).eval()
    batch = _labelled_batch()
    rotations = random_rotations(2, torch.Generator().manual_seed(5))
    together = model(rotated_copies(batch, rotations))
    n = batch[keys.POSITIONS].shape[0]
    for k in range(2):
        alone = model(rotated_copies(batch, rotations[k : k + 1]))
        torch.testing.assert_close(together[keys.FORCES][k * n : (k + 1) * n], alone[keys.FORCES], atol=1e-5, rtol=1e-5)
