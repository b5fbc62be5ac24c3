"""Build a small, real dataset the way OMol25 is built: molecules, off-equilibrium geometries, labels.

OMol25 (Levine et al., 2025, arXiv:2505.08762) is gated and large; this generator makes a
sample in the same format from public inputs so that the project runs out of the box on real
chemistry:

1. **Molecules**: the 5,000 NCI molecules that RDKit ships (``rdkit/Data/NCI/first_5K.smi``).
   Multi-fragment SMILES (salts, solvates) keep their *largest* fragment (most atoms, first one on
   a tie). A molecule whose canonical SMILES (largest fragment) repeats an earlier line is dropped
   as a duplicate, so one molecule cannot land in both splits. Kept: elements H C N O F P S Cl Br
   only, 3..``max_atoms`` atoms including hydrogens.
   The eligible molecules are shuffled with ``seed`` and taken in that order until ``molecules``
   of them have produced at least one labelled structure.
2. **Geometries**: ``n_conformers`` ETKDGv3 conformers (Riniker & Landrum, J. Chem. Inf. Model.
   2015, 55, 2562) relaxed with MMFF94 (Halgren, J. Comput. Chem. 1996, 17, 490), then
   ``structures_per_molecule`` structures cycling through the conformers: the first of each
   conformer is the MMFF geometry itself (off the GFN2-xTB minimum, small forces), the others add
   isotropic Gaussian displacements to every Cartesian coordinate with a width drawn uniformly from
   ``[sigma_min, sigma_max]`` Å (default 0.005..0.04 Å; 0.03 Å is about the 300 K thermal
   amplitude of a C-H stretch, sqrt(k_B T / k) with k ~ 30 eV/Å^2) -- structures away from minima
   with real forces on them (force RMS ~0.5-1.8 eV/Å over that range, measured on NCI molecules).
3. **Labels**: GFN2-xTB (Bannwarth, Ehlert & Grimme, JCTC 2019, 15, 1652) single points from
   tblite: total energy in eV and forces ``-dE/dr`` in eV/Å. Total charge is the sum of RDKit
   formal charges; spin multiplicity ``2S+1`` is 1 for an even electron count and 2 for an odd one
   (``uhf = spin - 1`` unpaired electrons in tblite). A structure whose SCF fails or whose labels
   are not finite is skipped and counted by reason.
4. **Format**: ``.aselmdb`` files through ase-db-backends, as OMol25 ships them: one row per
   structure, an ``Atoms`` with a ``SinglePointCalculator`` (energy, forces), and
   ``row.data = {"charge", "spin", "source", "nci_index", "smiles", ...}`` so that fairchem's
   reading (``atoms = row.toatoms(); atoms.info.update(row.data)``) gives ``atoms.info["charge"]``
   and ``atoms.info["spin"]`` (OMol25 docs: "labels of the total charge and spin multiplicity,
   saved in the atoms.info dictionary").
5. **Split** by molecule: a molecule goes to validation when a hash of ``(seed, nci_index)`` falls
   below ``val_fraction``; no molecule is on both sides.

Every random choice is seeded per molecule from ``(seed, nci_index)``, so the result does not
depend on the number of workers or on which other molecules were selected. rdkit and tblite are
the optional extra ``symscale[generate]`` and are imported lazily.

Usage::

    python -m datapipe.generate --out data/omol25_sample --molecules 1600 --seed 0 --workers 2
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: Hartree in eV (CODATA 2018).
HARTREE_EV = 27.211386245988
#: Bohr radius in Å (CODATA 2018).
BOHR_ANGSTROM = 0.529177210903
#: Elements allowed in the sample (atomic numbers of H C N O F P S Cl Br).
ALLOWED_Z = (1, 6, 7, 8, 9, 15, 16, 17, 35)
#: ``row.data["source"]`` of every structure the generator writes.
SOURCE = "nci-first5k/etkdg-mmff-gauss/gfn2-xtb"

_MISSING = (
    "datapipe.generate needs rdkit and tblite, the optional extra: "
    "pip install 'symscale[generate]' (missing: {name})"
)


def _require(name: str):
    """Import an optional dependency or raise an ImportError that says how to install it."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(_MISSING.format(name=name)) from err


@dataclass(frozen=True)
class GenerateConfig:
    """Everything that determines the generated labels (recorded beside the data).

    Attributes
    ----------
    seed : int
        Master seed; per-molecule seeds derive from ``(seed, nci_index)``.
    n_conformers : int
        ETKDG conformers embedded per molecule.
    structures_per_molecule : int
        Structures labelled per molecule (cycling through the conformers).
    sigma_min, sigma_max : float
        Range of the Gaussian displacement width, Å.
    max_atoms : int
        Largest molecule kept, atoms including hydrogens.
    mmff_max_iters : int
        MMFF94 minimisation steps per conformer.
    val_fraction : float
        Fraction of molecules (by hash) put in the validation split.
    xtb_accuracy, xtb_max_iter, xtb_temperature : float, int, float
        tblite settings (numerical accuracy, SCF iterations, electronic temperature in K).
    """

    seed: int = 0
    n_conformers: int = 3
    structures_per_molecule: int = 10
    sigma_min: float = 0.005
    sigma_max: float = 0.04
    max_atoms: int = 40
    mmff_max_iters: int = 500
    val_fraction: float = 0.1
    xtb_accuracy: float = 1.0
    xtb_max_iter: int = 250
    xtb_temperature: float = 300.0


@dataclass
class Candidate:
    """One eligible NCI molecule: its line index in ``first_5K.smi``, NCI id and SMILES."""

    nci_index: int
    nci_id: str
    smiles: str
    n_fragments: int


@dataclass
class Structure:
    """One labelled structure (positions Å, energy eV, forces eV/Å, charge e, spin 2S+1)."""

    numbers: np.ndarray  # [n_atoms] int
    positions: np.ndarray  # [n_atoms, 3] float64, Å
    energy: float  # eV
    forces: np.ndarray  # [n_atoms, 3] float64, eV/Å
    charge: int
    spin: int
    conformer: int
    sigma: float  # Å, 0 for the unperturbed MMFF geometry


@dataclass
class MoleculeResult:
    """All structures of one molecule plus what was skipped and why."""

    candidate: Candidate
    structures: list[Structure] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # reason -> structures skipped
    failure: str | None = None  # reason the whole molecule produced nothing
    mmff_relaxed: bool = True  # False when MMFF94 lacks parameters (ETKDG geometry kept)


def nci_smiles_path() -> Path:
    """Path of RDKit's ``NCI/first_5K.smi`` (5,000 NCI molecules, one ``SMILES<TAB>id`` a line)."""
    rdconfig = _require("rdkit.RDConfig")
    return Path(rdconfig.RDDataDir) / "NCI" / "first_5K.smi"


def _stable_uniform(seed: int, nci_index: int, tag: str) -> float:
    """A number in [0, 1) from a hash of (seed, index, tag): stable across runs and platforms."""
    digest = hashlib.sha256(f"{seed}:{nci_index}:{tag}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64


def molecule_seed(seed: int, nci_index: int) -> int:
    """Per-molecule seed (< 2**31, as RDKit's ``randomSeed`` wants) from ``(seed, nci_index)``."""
    return int(_stable_uniform(seed, nci_index, "molecule") * (2**31 - 1))


def is_validation(seed: int, nci_index: int, val_fraction: float) -> bool:
    """True when the molecule belongs to the validation split (hash of ``(seed, nci_index)``)."""
    return _stable_uniform(seed, nci_index, "split") < val_fraction


def _prepare_mol(smiles: str):
    """Sanitised RDKit molecule of the largest fragment, with explicit hydrogens, and #fragments."""
    Chem = _require("rdkit.Chem")
    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        return None, 0
    frags = Chem.GetMolFrags(mol, asMols=True)
    largest = max(frags, key=lambda m: m.GetNumAtoms())  # first of the largest on a tie
    return Chem.AddHs(largest), len(frags)


def load_candidates(max_atoms: int = 40) -> tuple[list[Candidate], Counter]:
    """Read ``first_5K.smi`` and keep the molecules the sample may use.

    Parameters
    ----------
    max_atoms : int
        Largest molecule kept, atoms including hydrogens.

    Returns
    -------
    candidates : list of Candidate
        Eligible molecules in file order.
    rejected : Counter
        Molecules not eligible, by reason (``unparsable``, ``elements``, ``too_large``,
        ``too_small``, ``duplicate``).
    """
    _require("rdkit")
    from rdkit import RDLogger

    RDLogger.DisableLog("rdApp.*")
    Chem = _require("rdkit.Chem")
    candidates, rejected, seen = [], Counter(), set()
    lines = nci_smiles_path().read_text().splitlines()
    for index, line in enumerate(lines):
        parts = line.split()
        if not parts:
            continue
        smiles, nci_id = parts[0], (parts[1] if len(parts) > 1 else str(index))
        mol, n_frag = _prepare_mol(smiles)
        if mol is None:
            rejected["unparsable"] += 1
            continue
        zs = {a.GetAtomicNum() for a in mol.GetAtoms()}
        if not zs <= set(ALLOWED_Z):
            rejected["elements"] += 1
        elif mol.GetNumAtoms() > max_atoms:
            rejected["too_large"] += 1
        elif mol.GetNumAtoms() < 3:
            rejected["too_small"] += 1
        else:
            key = Chem.MolToSmiles(Chem.RemoveHs(mol))
            if key in seen:
                rejected["duplicate"] += 1
                continue
            seen.add(key)
            candidates.append(Candidate(index, nci_id, smiles, n_frag))
    return candidates, rejected


def xtb_single_point(numbers: np.ndarray, positions: np.ndarray, charge: int, spin: int, cfg: GenerateConfig):
    """GFN2-xTB energy and forces from tblite.

    Parameters
    ----------
    numbers : np.ndarray
        ``[n_atoms]`` atomic numbers.
    positions : np.ndarray
        ``[n_atoms, 3]`` Cartesian positions, Å.
    charge : int
        Total charge, e.
    spin : int
        Spin multiplicity ``2S+1``; tblite gets ``uhf = spin - 1`` unpaired electrons.
    cfg : GenerateConfig
        tblite accuracy, SCF iteration limit and electronic temperature.

    Returns
    -------
    energy : float
        Total energy, eV (Hartree x 27.211386245988).
    forces : np.ndarray
        ``[n_atoms, 3]`` forces ``-dE/dr``, eV/Å: minus the gradient in Hartree/Bohr times
        27.211386245988 / 0.529177210903.

    Raises
    ------
    tblite.exceptions.TBLiteRuntimeError
        When the SCF does not converge or the library fails.
    """
    interface = _require("tblite.interface")
    calc = interface.Calculator(
        "GFN2-xTB",
        np.asarray(numbers, dtype=np.int32),
        np.asarray(positions, dtype=np.float64) / BOHR_ANGSTROM,
        charge=float(charge),
        uhf=int(spin) - 1,
    )
    calc.set("verbosity", 0)
    calc.set("accuracy", cfg.xtb_accuracy)
    calc.set("max-iter", cfg.xtb_max_iter)
    # K -> Hartree with k_B = 3.166808578545117e-6 Eh/K (xtb's value; 300 K is tblite's default)
    calc.set("temperature", cfg.xtb_temperature * 3.166808578545117e-06)

    res = calc.singlepoint()
    energy = float(res.get("energy")) * HARTREE_EV
    forces = -np.asarray(res.get("gradient"), dtype=np.float64) * (HARTREE_EV / BOHR_ANGSTROM)
    return energy, forces


def generate_molecule(candidate: Candidate, cfg: GenerateConfig) -> MoleculeResult:
    """Conformers, perturbed geometries and GFN2-xTB labels for one molecule.

    Deterministic given ``(cfg, candidate.nci_index)``: all randomness comes from
    :func:`molecule_seed`. Failures are returned as counted reasons, never raised.

    Parameters
    ----------
    candidate : Candidate
        The molecule (see :func:`load_candidates`).
    cfg : GenerateConfig
        Generation settings.

    Returns
    -------
    MoleculeResult
        Up to ``cfg.structures_per_molecule`` structures; ``skipped`` counts structures whose SCF
        failed (``xtb_error``) or whose labels were not finite (``non_finite``); ``failure``
        names why a molecule produced nothing (``embed_failed``, ``all_structures_failed``).
    """
    _require("rdkit")
    tblite_exc = _require("tblite.exceptions")
    from rdkit.Chem import AllChem, rdDistGeom

    out = MoleculeResult(candidate)
    mol, _ = _prepare_mol(candidate.smiles)
    mseed = molecule_seed(cfg.seed, candidate.nci_index)
    params = rdDistGeom.ETKDGv3()
    params.randomSeed = mseed
    params.numThreads = 1
    conf_ids = list(rdDistGeom.EmbedMultipleConfs(mol, cfg.n_conformers, params))
    if not conf_ids:
        params.useRandomCoords = True  # RDKit's documented fallback for hard embeddings
        conf_ids = list(rdDistGeom.EmbedMultipleConfs(mol, cfg.n_conformers, params))
    if not conf_ids:
        out.failure = "embed_failed"
        return out
    out.mmff_relaxed = bool(AllChem.MMFFHasAllMoleculeParams(mol))
    if out.mmff_relaxed:  # else the ETKDG geometries are used as they are (counted in the report)
        AllChem.MMFFOptimizeMoleculeConfs(mol, numThreads=1, maxIters=cfg.mmff_max_iters)

    numbers = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
    charge = sum(a.GetFormalCharge() for a in mol.GetAtoms())
    n_electrons = int(numbers.sum()) - charge
    spin = 1 if n_electrons % 2 == 0 else 2
    rng = np.random.default_rng(mseed)
    for k in range(cfg.structures_per_molecule):
        c = k % len(conf_ids)
        base = np.array(mol.GetConformer(conf_ids[c]).GetPositions(), dtype=np.float64)
        if k < len(conf_ids):
            sigma = 0.0
            positions = base
        else:
            sigma = float(rng.uniform(cfg.sigma_min, cfg.sigma_max))
            positions = base + rng.normal(0.0, sigma, size=base.shape)
        try:
            energy, forces = xtb_single_point(numbers, positions, charge, spin, cfg)
        except tblite_exc.TBLiteRuntimeError:
            out.skipped["xtb_error"] += 1
            continue
        if not (np.isfinite(energy) and np.all(np.isfinite(forces))):
            out.skipped["non_finite"] += 1
            continue
        out.structures.append(Structure(numbers, positions, energy, forces, charge, spin, c, sigma))
    if not out.structures:
        out.failure = "all_structures_failed"
    return out


def _worker_init() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from rdkit import RDLogger

    RDLogger.DisableLog("rdApp.*")


def _run_one(args: tuple[Candidate, GenerateConfig]) -> MoleculeResult:
    return generate_molecule(*args)


def select_order(candidates: list[Candidate], seed: int) -> list[Candidate]:
    """Candidates in the seeded order in which the generator tries them."""
    perm = np.random.default_rng(seed).permutation(len(candidates))
    return [candidates[i] for i in perm]


def generate(candidates: list[Candidate], n_molecules: int, cfg: GenerateConfig, workers: int = 1, log=print):
    """Label molecules in order until ``n_molecules`` have at least one structure.

    Results are consumed in candidate order (``imap``), so the output is the same for any number
    of workers.

    Returns
    -------
    results : list of MoleculeResult
        The successful molecules, in candidate order.
    report : dict
        Molecules tried and failed by reason, structures skipped by reason.
    """
    import multiprocessing as mp

    results, failed, skipped = [], Counter(), Counter()
    tried = no_mmff = 0
    t0 = time.time()
    jobs = ((c, cfg) for c in candidates)
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    pool = ctx.Pool(workers, initializer=_worker_init) if workers > 1 else None
    it = pool.imap(_run_one, jobs, chunksize=2) if pool else map(_run_one, jobs)
    try:
        for res in it:
            tried += 1
            skipped.update({k: v for k, v in res.skipped.items() if v})
            if not res.mmff_relaxed:
                no_mmff += 1
            if res.failure:
                failed[res.failure] += 1
            else:
                results.append(res)
            if tried % 50 == 0:
                n_s = sum(len(r.structures) for r in results)
                log(f"[generate] {len(results)}/{n_molecules} molecules, {n_s} structures, "
                    f"{time.time() - t0:.0f} s")
            if len(results) >= n_molecules:
                break
    finally:
        if pool:
            pool.terminate()
            pool.join()
    if len(results) < n_molecules:
        raise RuntimeError(f"only {len(results)} molecules succeeded of {tried} tried; wanted {n_molecules}")
    report = {"molecules_tried": tried, "molecules_failed": dict(failed), "structures_skipped": dict(skipped),
              "molecules_tried_without_mmff_params": no_mmff}
    return results, report
