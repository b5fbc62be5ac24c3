"""Property tests shipped with the zoo, for every architecture (as NequIP ships its model mixins).

Subclass :class:`ForceFieldTests` in a pytest file and name the model::

    class TestMyModel(ForceFieldTests):
        model_name = "esen"
        width = 16
        overrides = {"lmax": 2}
        equivariant = True      # energy invariant / forces equivariant under rotations
        reflections = False     # also under improper rotations (E(3) rather than SO(3))

Every ``test_*`` method then runs for that model: symmetry (rotation, translation, permutation,
reflection), batching invariance, conservative forces against finite differences, smoothness
as an atom crosses each cutoff, charge and spin entering the model, and the edge cases that
public reports show force fields getting wrong (a lone ion last in a batch, an atom beyond the
cutoff, coincident atoms, unsupported elements, a 300-atom molecule beside a 5-atom one), and
that an atom with no neighbour within the cutoff feels exactly zero force (direct heads included).

The assertion helpers (:func:`assert_invariant_energy_equivariant_forces`, …) can be used on
their own for a model outside the registry.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule

from datapipe import keys
from datapipe.graph import batch_from_atoms
from zoo.models.precision import geometry_dtype
from zoo.models.symmetry import random_rotations
from zoo.registry import build

#: fp32 tolerance of the symmetry tests, relative to the largest |value| compared.
FP32_RTOL = 2e-5


def random_rotation(seed: int, proper: bool = True) -> np.ndarray:
    """A Haar-random 3×3 rotation (det +1) or, with ``proper=False``, a rotoreflection (det −1).

    Drawn by :func:`zoo.models.symmetry.random_rotations` from a generator seeded with ``seed``.
    """
    rotation = random_rotations(1, torch.Generator().manual_seed(seed))[0].numpy()
    return rotation if proper else -rotation


def perturbed(atoms: Atoms, seed: int, scale: float = 0.05, charge: int = 0, spin: int = 1) -> Atoms:
    """A copy of ``atoms`` with Gaussian displacements (Å) that break its point symmetry."""
    atoms = atoms.copy()
    atoms.positions += np.random.default_rng(seed).normal(scale=scale, size=atoms.positions.shape)
    atoms.info.update(charge=charge, spin=spin)
    return atoms


def evaluate(model, atoms_list, cutoff: float | None = None) -> dict[str, torch.Tensor]:
    """Energies ``[B]`` (eV) and forces ``[N, 3]`` (eV/Å) of ``atoms_list`` in one batch, on the model's device."""
    cutoff = cutoff if cutoff is not None else model.data_cutoff
    parameter = next(model.parameters())
    dtype = geometry_dtype(parameter.dtype)  # positions never below fp32 (bf16 models)
    return model(batch_from_atoms(atoms_list, cutoff=cutoff, dtype=dtype).to(parameter.device))


def _scale(*tensors: torch.Tensor) -> float:
    return max(float(t.detach().abs().max()) for t in tensors if t.numel()) + 1e-12


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rtol: float = FP32_RTOL, what: str = "") -> None:
    """``|actual − expected| ≤ rtol · max|expected|`` element-wise (fp32-aware comparison)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    error = float((actual - expected).abs().max()) if actual.numel() else 0.0
    bound = rtol * _scale(expected)
    assert error <= bound, f"{what}: max error {error:.3g} > {bound:.3g} (rtol {rtol} of max |value|)"


def assert_invariant_energy_equivariant_forces(model, atoms: Atoms, rotation: np.ndarray, rtol: float = FP32_RTOL):
    """E(R·x) = E(x) and F(R·x) = R·F(x) for one structure and one orthogonal matrix ``R``."""
    rotated = atoms.copy()
    rotated.positions = atoms.positions @ rotation.T
    base, turned = evaluate(model, [atoms]), evaluate(model, [rotated])
    r = torch.as_tensor(rotation, dtype=base[keys.FORCES].dtype)
    assert_close_scaled(turned[keys.ENERGY], base[keys.ENERGY], rtol, "energy")
    assert_close_scaled(turned[keys.FORCES], base[keys.FORCES] @ r.T, rtol, "forces")


def rotation_error(model, atoms: Atoms, rotation: np.ndarray) -> float:
    """max |F(R·x) − R·F(x)| / max |F(x)|: zero for an equivariant model."""
    rotated = atoms.copy()
    rotated.positions = atoms.positions @ rotation.T
    base, turned = evaluate(model, [atoms]), evaluate(model, [rotated])
    r = torch.as_tensor(rotation, dtype=base[keys.FORCES].dtype, device=base[keys.FORCES].device)
    diff = (turned[keys.FORCES] - base[keys.FORCES] @ r.T).detach().abs().max()
    return float(diff) / _scale(base[keys.FORCES])


def precision_report(model, atoms_list: list[Atoms], rotation: np.ndarray) -> dict:
    """How far the bf16 policy (:mod:`zoo.models.precision`) moves ``model`` from fp32.

    A copy of the fp32 ``model`` gets bf16 parameters as DeepSpeed and FSDP2 give them
    (:func:`zoo.models.precision.cast_parameters`); both evaluate ``atoms_list``. Returns
    ``energy_per_atom`` (max |ΔE| / atoms, eV/atom), ``forces`` (max |ΔF| / max |F_fp32|), and the
    rotation error (:func:`rotation_error` on ``atoms_list[0]``) of each, ``rotation_fp32`` and
    ``rotation_bf16``.
    """
    import copy

    from zoo.models.precision import cast_parameters

    low = cast_parameters(copy.deepcopy(model), torch.bfloat16)
    full, half = evaluate(model, atoms_list), evaluate(low, atoms_list)
    atoms = torch.tensor([len(a) for a in atoms_list], dtype=torch.float64, device=full[keys.ENERGY].device)
    d_energy = (half[keys.ENERGY].detach().double() - full[keys.ENERGY].detach().double()).abs() / atoms
    d_forces = (half[keys.FORCES].detach().double() - full[keys.FORCES].detach().double()).abs().max()
    return {"energy_per_atom": float(d_energy.max()), "forces": float(d_forces) / _scale(full[keys.FORCES]),
            "rotation_fp32": rotation_error(model, atoms_list[0], rotation),
            "rotation_bf16": rotation_error(low, atoms_list[0], rotation),
            "dtypes": (str(half[keys.ENERGY].dtype), str(half[keys.FORCES].dtype))}


class ForceFieldTests:
    """Mixin of property tests; subclass it with ``model_name``, ``width`` and flags."""

    model_name: str = ""
    width: int = 16
    overrides: dict = {}
    equivariant: bool = True
    reflections: bool = False
    #: tolerance for conservative forces vs central finite differences (float64)
    fd_rtol: float = 1e-5

    # -- fixtures --------------------------------------------------------------------------------
    def make(self, direct_forces: bool = True, dtype=torch.float32, seed: int = 0):
        torch.manual_seed(seed)
        model = build(self.model_name, self.width, direct_forces=direct_forces, **self.overrides).to(dtype)
        model.set_normalization(None, 1.0)
        return model.eval()

    @pytest.fixture(params=[True, False], ids=["direct", "conservative"])
    def model(self, request):
        return self.make(direct_forces=request.param)

    @staticmethod
    def molecules() -> list[Atoms]:
        return [perturbed(molecule("C6H6"), 1), perturbed(molecule("CH3CH2OH"), 2), perturbed(molecule("H2O"), 3)]

    # -- symmetry --------------------------------------------------------------------------------
    def test_outputs_are_not_trivial(self, model):
        out = evaluate(model, self.molecules())
        assert torch.isfinite(out[keys.ENERGY]).all() and torch.isfinite(out[keys.FORCES]).all()
        assert float(out[keys.FORCES].detach().abs().max()) > 1e-6, "forces are all zero: symmetry tests would be vacuous"
        assert float(out[keys.ENERGY].detach().std()) > 1e-6, "energy does not depend on the structure"

    def test_translation_invariance(self, model):
        atoms = self.molecules()[1]
        moved = atoms.copy()
        moved.positions += np.array([3.1, -7.4, 12.0])
        base, shifted = evaluate(model, [atoms]), evaluate(model, [moved])
        assert_close_scaled(shifted[keys.ENERGY], base[keys.ENERGY], 1e-4, "energy")
        assert_close_scaled(shifted[keys.FORCES], base[keys.FORCES], 1e-4, "forces")

    def test_rotation(self, model):
        atoms = self.molecules()[1]
        if self.equivariant:
            for seed in range(3):
                assert_invariant_energy_equivariant_forces(model, atoms, random_rotation(seed))
        else:
            errors = [rotation_error(model, atoms, random_rotation(seed)) for seed in range(3)]
            assert min(errors) > 1e-4, f"a model without rotational constraint looks equivariant: {errors}"

    def test_reflection(self, model):
        if not (self.equivariant and self.reflections):
            pytest.skip("model is not claimed to be invariant under reflections")
        assert_invariant_energy_equivariant_forces(model, self.molecules()[1], random_rotation(7, proper=False))

    def test_permutation(self, model):
        atoms = self.molecules()[1]
        order = np.random.default_rng(0).permutation(len(atoms))
        base, permuted = evaluate(model, [atoms]), evaluate(model, [atoms[order]])
        assert_close_scaled(permuted[keys.ENERGY], base[keys.ENERGY], 1e-5, "energy")
        assert_close_scaled(permuted[keys.FORCES], base[keys.FORCES][torch.as_tensor(order)], 1e-5, "forces")

    # -- batching ---------------------------------------------------------------------------------
    def test_batching_invariance(self, model):
        mols = self.molecules()
        together = evaluate(model, mols)
        start = 0
        for index, atoms in enumerate(mols):
            alone = evaluate(model, [atoms])
            n = len(atoms)
            assert_close_scaled(together[keys.ENERGY][index : index + 1], alone[keys.ENERGY], 1e-5, "energy")
            assert_close_scaled(together[keys.FORCES][start : start + n], alone[keys.FORCES], 1e-5, "forces")
            start += n

    def test_large_next_to_small(self, model):
        cluster = water_cluster(100, seed=5)  # 300 atoms
        small = perturbed(molecule("CH4"), 6)
        together = evaluate(model, [cluster, small])
        alone = [evaluate(model, [a]) for a in (cluster, small)]
        assert_close_scaled(together[keys.ENERGY], torch.cat([a[keys.ENERGY] for a in alone]), 1e-5, "energy")
        assert_close_scaled(together[keys.FORCES], torch.cat([a[keys.FORCES] for a in alone]), 1e-4, "forces")

    # -- conservative forces and smoothness -------------------------------------------------------
    def test_conservative_forces_match_finite_differences(self):
        model = self.make(direct_forces=False, dtype=torch.float64)
        atoms = self.molecules()[2]
        forces = evaluate(model, [atoms])[keys.FORCES].detach().double()
        h = 1e-4
        numerical = torch.zeros_like(forces)
        for atom in range(len(atoms)):
            for axis in range(3):
                plus, minus = atoms.copy(), atoms.copy()
                plus.positions[atom, axis] += h
                minus.positions[atom, axis] -= h
                e_plus = float(evaluate(model, [plus])[keys.ENERGY])
                e_minus = float(evaluate(model, [minus])[keys.ENERGY])
                numerical[atom, axis] = -(e_plus - e_minus) / (2 * h)
        assert_close_scaled(forces, numerical, self.fd_rtol, "forces vs finite differences")

    def test_smooth_across_cutoff(self):
        """A C–O pair pulled across each graph cutoff: no step in energy (ΔE equals the trapezoid
        integral of the force), no jump in force; across the outermost cutoff the energy is flat
        and the force vanishes (inside a longer-range graph the pair still interacts at an inner one)."""
        model = self.make(direct_forces=False, dtype=torch.float64)
        data_cutoff = model.data_cutoff + 1.0

        def pair(r: float):
            return evaluate(model, [Atoms("CO", positions=[[0, 0, 0], [r, 0.0, 0.0]])], cutoff=data_cutoff)

        outer = model.data_cutoff
        energies = [float(pair(r)[keys.ENERGY]) for r in np.linspace(outer - 0.02, outer + 0.02, 9)]
        steps = np.abs(np.diff(energies))
        assert steps.max() < 1e-6 * max(1.0, abs(energies[0])), f"energy not flat across {outer} Å: {steps}"
        assert float(pair(outer - 0.0025)[keys.FORCES].abs().max()) < 1e-4, f"force not ~0 just inside {outer} Å"
        h = 1e-4
        for cutoff in model.graph_cutoffs:
            inside, outside = pair(cutoff - h), pair(cutoff + h)
            f_in, f_out = float(inside[keys.FORCES][1, 0]), float(outside[keys.FORCES][1, 0])
            step = float(outside[keys.ENERGY] - inside[keys.ENERGY]) + (f_in + f_out) * h  # dE/dr = −F_x(O)
            assert abs(step) < 1e-8, f"energy step {step} at the {cutoff} Å cutoff"
            assert abs(f_out - f_in) < 1e-3, f"force jump {f_out - f_in} at the {cutoff} Å cutoff"

    def test_conservative_forces_are_never_silently_zero(self, monkeypatch):
        """A gradient autograd did not compute is an error where the batch has edges (zeros there would
        be wrong forces that look right); without edges the energy does not depend on positions."""
        model = self.make(direct_forces=False)
        mols, lone = self.molecules()[:1], [Atoms("C", positions=[[0, 0, 0]], info={"spin": 3})]
        with torch.no_grad():
            with pytest.raises(RuntimeError, match="gradients are disabled.*Refusing to return zero forces"):
                evaluate(model, mols)
            assert torch.equal(evaluate(model, lone)[keys.FORCES], torch.zeros(1, 3))
        interact = model.interact

        def detached(*args, **kwargs):  # what a graph break or a traced forward can do
            energy, forces = interact(*args, **kwargs)
            return energy.detach(), forces

        monkeypatch.setattr(model, "interact", detached)
        with pytest.raises(RuntimeError, match="no path from the energy to the positions"):
            evaluate(model, mols)

    # -- charge, spin ------------------------------------------------------------------------------
    def test_charge_and_spin_enter_the_model(self):
        model = self.make()
        atoms = self.molecules()[2]
        base = float(evaluate(model, [atoms])[keys.ENERGY])
        cation = atoms.copy()
        cation.info.update(charge=1, spin=2)
        assert abs(float(evaluate(model, [cation])[keys.ENERGY]) - base) > 1e-6

    # -- edge cases --------------------------------------------------------------------------------
    def test_single_atom(self, model):
        out = evaluate(model, [Atoms("C", positions=[[0, 0, 0]])])
        assert out[keys.ENERGY].shape == (1,) and torch.isfinite(out[keys.ENERGY]).all()
        assert torch.isfinite(out[keys.FORCES]).all()
        if not model.direct_forces:
            assert torch.equal(out[keys.FORCES], torch.zeros_like(out[keys.FORCES]))

    def test_structure_without_edges_last_in_batch(self, model):
        ion = Atoms("Na", positions=[[0, 0, 0]], info={"charge": 1, "spin": 1})
        mols = self.molecules()[:2] + [ion]
        out = evaluate(model, mols)
        assert out[keys.ENERGY].shape == (3,), "every structure gets its own energy"
        assert torch.isfinite(out[keys.ENERGY]).all() and torch.isfinite(out[keys.FORCES]).all()
        if not model.direct_forces:
            assert torch.equal(out[keys.FORCES][-1], torch.zeros(3, dtype=out[keys.FORCES].dtype))

    def test_isolated_atom_feels_no_force(self, model):
        """An atom with no neighbour within the cutoff feels exactly zero force, in both force modes:
        alone, as a lone ion between molecules in one batch, and far from a molecule in its own
        structure (a direct head must not turn a bias or a charge/spin embedding into a force)."""
        far = max(model.data_cutoff, model.cutoff) + 2.0
        lone = Atoms("C", positions=[[0, 0, 0]], info={"charge": 0, "spin": 3})
        ion = Atoms("Na", positions=[[0, 0, 0]], info={"charge": 1, "spin": 1})
        water = perturbed(molecule("H2O"), 8)
        stray = water + Atoms("O", positions=[[far + 1.0, 0, 0]])
        stray.info.update(charge=-1, spin=2)  # 19 electrons
        benzene = self.molecules()[0]
        for batch in ([lone], [benzene, lone, ion, stray], [stray]):
            forces = evaluate(model, batch)[keys.FORCES].detach()
            ends = np.cumsum([len(a) for a in batch])
            isolated = [int(end) - 1 for a, end in zip(batch, ends) if a is not benzene]
            zero = torch.zeros(len(isolated), 3, dtype=forces.dtype)
            assert torch.equal(forces[isolated], zero), f"isolated atoms feel {forces[isolated].tolist()}"
        assert float(evaluate(model, [benzene])[keys.FORCES].abs().max()) > 0, "forces vanish everywhere"

    def test_atom_beyond_cutoff_gives_finite_gradients(self, model):
        water = perturbed(molecule("H2O"), 4, spin=2)
        far = water + Atoms("H", positions=[[max(7.0, model.cutoff + 1.0) + 1.5, 0, 0]])
        far.info.update(charge=0, spin=2)
        model.train()
        out = evaluate(model, [far])
        loss = out[keys.ENERGY].sum() + out[keys.FORCES].pow(2).sum()
        loss.backward()
        assert torch.isfinite(loss)
        for name, p in model.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), f"non-finite gradient in {name}"

    def test_coincident_atoms_raise_clear_error(self, model):
        h2 = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0]], info={"structure_id": "coincident-H2"})
        with pytest.raises(ValueError, match="coincident-H2.*coincident"):
            evaluate(model, [h2])

    @pytest.mark.parametrize("z", [0, 200])
    def test_unsupported_element_raises(self, z):
        atoms = Atoms(numbers=[z, 1], positions=[[0, 0, 0], [0, 0, 0.74]], info={"structure_id": "odd"})
        with pytest.raises(ValueError, match=f"odd.*unsupported element Z={z}"):
            evaluate(self.make(), [atoms])


def water_cluster(n_molecules: int, seed: int = 0, spacing: float = 3.1) -> Atoms:
    """``n_molecules`` randomly oriented waters on a jittered cubic grid (``spacing`` Å apart)."""
    rng = np.random.default_rng(seed)
    water = molecule("H2O")
    side = math.ceil(n_molecules ** (1 / 3))
    cluster = Atoms()
    for index in range(n_molecules):
        grid = np.array([index % side, (index // side) % side, index // side**2], dtype=float)
        w = water.copy()
        w.positions = w.positions @ random_rotation(int(rng.integers(1 << 30))).T + grid * spacing
        w.positions += rng.normal(scale=0.05, size=(1, 3))
        cluster += w
    cluster.info.update(charge=0, spin=1)
    return cluster
