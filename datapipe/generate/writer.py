"""Writing the generated sample as OMol25-style ``.aselmdb`` files, its summary, and the CLI.

Companion of :mod:`datapipe.generate.molecules` (which builds and labels the structures). Each row is an
``ase.Atoms`` (non-periodic) with a ``SinglePointCalculator`` holding the energy (eV) and forces
(eV/Å); ``row.data`` holds ``charge`` (e), ``spin`` (multiplicity 2S+1), ``source`` and the
molecule's identity, so ``atoms = row.toatoms(); atoms.info.update(row.data)`` (fairchem's
``AseDBDataset`` reading) gives OMol25's ``atoms.info["charge"]`` / ``atoms.info["spin"]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np

from datapipe.generate.molecules import (
    ALLOWED_Z,
    BOHR_ANGSTROM,
    HARTREE_EV,
    SOURCE,
    GenerateConfig,
    generate,
    is_validation,
    load_candidates,
    select_order,
)

SUMMARY_NAME = "generation.json"


def row_data(mol_result, k: int, structure) -> dict:
    """``row.data`` of one structure (OMol25 keeps charge and spin here; we add the molecule id)."""

    cand = mol_result.candidate
    return {
        "charge": int(structure.charge),
        "spin": int(structure.spin),
        "source": SOURCE,
        "nci_index": int(cand.nci_index),
        "nci_id": str(cand.nci_id),
        "smiles": cand.smiles,
        "data_id": f"nci{cand.nci_index}-{k}",
        "conformer": int(structure.conformer),
        "sigma": float(structure.sigma),
    }


def write_split(results: list, split_dir: Path, rows_per_file: int) -> list[dict]:
    """Write the structures of ``results`` into ``split_dir/data0000.aselmdb``, ``data0001``, ...

    Each file is written in one LMDB transaction (no free pages left behind) and closed before
    the next is opened (ase-db-backends refuses to open one file twice in a process).

    Returns
    -------
    list of dict
        Per file: ``name``, ``rows``, ``atoms``, ``bytes``.
    """
    import ase.db
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    split_dir.mkdir(parents=True, exist_ok=True)
    rows = [(r, k, s) for r in results for k, s in enumerate(r.structures)]
    files = []
    for f, start in enumerate(range(0, len(rows), rows_per_file)):
        path = split_dir / f"data{f:04d}.aselmdb"
        chunk = rows[start : start + rows_per_file]
        db = ase.db.connect(str(path), append=False)
        with db:
            for r, k, s in chunk:
                atoms = Atoms(numbers=s.numbers, positions=s.positions, pbc=False)
                atoms.calc = SinglePointCalculator(atoms, energy=s.energy, forces=s.forces)
                db.write(atoms, data=row_data(r, k, s))
        db.close()
        Path(f"{path}-lock").unlink(missing_ok=True)  # LMDB's lock file; readers open lock-free
        n_atoms = sum(len(s.numbers) for _, _, s in chunk)
        files.append({"name": path.name, "rows": len(chunk), "atoms": n_atoms, "bytes": path.stat().st_size})
    return files


def versions() -> dict:
    """Versions of everything that can change the labels or the files."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("rdkit", "tblite", "ase", "ase-db-backends", "numpy", "lmdb"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def split_summary(results: list, files: list[dict]) -> dict:
    """Counts of one split: molecules, structures, atoms, elements, charges, spins, force RMS."""
    elements, charges, spins = Counter(), Counter(), Counter()
    sq, n_f = 0.0, 0
    for r in results:
        for s in r.structures:
            elements.update(int(z) for z in s.numbers)
            charges[int(s.charge)] += 1
            spins[int(s.spin)] += 1
            sq += float(np.sum(s.forces**2))
            n_f += s.forces.size
    return {
        "molecules": len(results),
        "structures": sum(len(r.structures) for r in results),
        "atoms": sum(len(s.numbers) for r in results for s in r.structures),
        "max_atoms": max((len(s.numbers) for r in results for s in r.structures), default=0),
        "element_counts": {str(z): n for z, n in sorted(elements.items())},
        "charge_counts": {str(c): n for c, n in sorted(charges.items())},
        "spin_counts": {str(c): n for c, n in sorted(spins.items())},
        "force_rms_ev_per_a": (sq / n_f) ** 0.5 if n_f else None,
        "nci_indices": sorted(int(r.candidate.nci_index) for r in results),
        "files": files,
    }


def parse_args(argv=None) -> argparse.Namespace:

    d = GenerateConfig()
    p = argparse.ArgumentParser(prog="python -m datapipe.generate", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="output directory (gets train/ and val/)")
    p.add_argument("--molecules", type=int, default=1600, help="molecules with >=1 labelled structure")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--structures-per-molecule", type=int, default=d.structures_per_molecule)
    p.add_argument("--conformers", type=int, default=d.n_conformers)
    p.add_argument("--sigma-min", type=float, default=d.sigma_min, help="Å")
    p.add_argument("--sigma-max", type=float, default=d.sigma_max, help="Å")
    p.add_argument("--max-atoms", type=int, default=d.max_atoms)
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--rows-per-file", type=int, default=1000, help="structures per .aselmdb file")
    p.add_argument("--overwrite", action="store_true", help="replace existing .aselmdb files in --out")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """CLI: select, generate, split, write, and record ``generation.json`` beside the data."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # before tblite's OpenMP runtime starts
    args = parse_args(argv)

    cfg = GenerateConfig(
        seed=args.seed,
        n_conformers=args.conformers,
        structures_per_molecule=args.structures_per_molecule,
        sigma_min=args.sigma_min,
        sigma_max=args.sigma_max,
        max_atoms=args.max_atoms,
        val_fraction=args.val_fraction,
    )
    existing = sorted(args.out.glob("*/*.aselmdb"))
    if existing and not args.overwrite:
        raise SystemExit(f"{args.out} already holds {len(existing)} .aselmdb files; pass --overwrite")
    for path in existing:
        path.unlink()

    t0 = time.time()
    candidates, rejected = load_candidates(cfg.max_atoms)
    multi = sum(c.n_fragments > 1 for c in candidates)
    print(f"[generate] {len(candidates)} eligible NCI molecules ({multi} multi-fragment, largest kept); "
          f"rejected {dict(rejected)}", flush=True)
    ordered = select_order(candidates, cfg.seed)
    results, report = generate(ordered, args.molecules, cfg, args.workers,
                               log=lambda m: print(m, flush=True))
    t_label = time.time() - t0

    splits = {"train": [], "val": []}
    for r in results:
        in_val = is_validation(cfg.seed, r.candidate.nci_index, cfg.val_fraction)
        splits["val" if in_val else "train"].append(r)
    summary = {
        "command": "python -m datapipe.generate " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "config": asdict(cfg),
        "versions": versions(),
        "units": {"energy": "eV", "forces": "eV/Å", "positions": "Å", "charge": "e", "spin": "2S+1",
                  "hartree_ev": HARTREE_EV, "bohr_angstrom": BOHR_ANGSTROM},
        "elements_allowed": list(ALLOWED_Z),
        "nci_eligible": len(candidates),
        "nci_eligible_multi_fragment": multi,
        "nci_rejected": dict(rejected),
        **report,
        "splits": {},
    }
    for name, res in splits.items():
        files = write_split(res, args.out / name, args.rows_per_file)
        summary["splits"][name] = split_summary(res, files)
    summary["wall_time_s"] = round(time.time() - t0, 1)
    summary["label_time_s"] = round(t_label, 1)
    summary["workers"] = args.workers
    summary["rows_per_file"] = args.rows_per_file
    (args.out / SUMMARY_NAME).write_text(json.dumps(summary, indent=1) + "\n")
    for name, s in summary["splits"].items():
        print(f"[generate] {name}: {s['molecules']} molecules, {s['structures']} structures, "
              f"{s['atoms']} atoms, {len(s['files'])} files, largest "
              f"{max((f['bytes'] for f in s['files']), default=0) / 1e6:.1f} MB", flush=True)
    print(f"[generate] skipped {report['structures_skipped']}, failed molecules "
          f"{report['molecules_failed']}, wall {summary['wall_time_s']} s", flush=True)
    return summary
