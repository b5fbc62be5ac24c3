"""The study's run table: one row per checkpoint, written as ``OUT/runs.csv`` (what ``zoo fit`` reads).

Columns
-------
``architecture, width, run, step, final`` — which checkpoint (``final``: the run's last);
``N`` — trainable parameters; ``D`` — atoms seen; ``C`` — training compute in the paper's
convention ``C = 3κ·N·D`` (FLOPs) with κ the run's measured forward FLOPs per atom and parameter
(``throughput.kappa`` of its final checkpoint, so C ∝ D within a run); ``C_measured`` — the
FLOPs the launcher counted for the steps taken (forward + backward + optimizer); ``kappa``;
``L`` — the validation force loss (mean per-atom L2 norm of the force error in units of the
training force RMS: the paper's ``f_loss``, the quantity its γ_c are fitted to); ``loss`` — the
training objective on the validation set (per-atom energy MAE + force term, normalised units);
``energy_loss, force_loss, energy_mae_mev_per_atom, force_mae_mev_per_A, force_l2_mae_mev_per_A,
zero_force_mae_mev_per_A`` — validation metrics; ``val_structures, val_atoms``; ``samples_seen``;
``wall_time_s``; ``data_hash, val_data_hash`` — the data's identity; ``checkpoint`` — the
checkpoint directory relative to ``OUT`` (weights + metadata, what a publisher packs).

Every row must come from the same training and validation data (one ``data_hash`` and one
``val_data_hash``), else :func:`collect` raises: losses of different data are not comparable.
"""

from __future__ import annotations

import csv
from pathlib import Path

from zoo.hub.metadata import read as read_metadata

COLUMNS = ("architecture", "width", "run", "step", "final", "N", "D", "C", "C_measured", "kappa", "L", "loss",
           "energy_loss", "force_loss", "energy_mae_mev_per_atom", "force_mae_mev_per_A", "force_l2_mae_mev_per_A",
           "zero_force_mae_mev_per_A", "val_structures", "val_atoms", "samples_seen", "wall_time_s", "data_hash",
           "val_data_hash", "checkpoint")


def checkpoints_of(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories of a run, in step order (``.partial`` ones are skipped)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(d for d in folder.glob("step-*")
                  if d.is_dir() and not d.name.endswith(".partial") and (d / "metadata.json").is_file())


def collect(run_dirs: list[Path], out: Path) -> list[dict]:
    """Rows of every complete checkpoint of ``run_dirs`` (paths in ``checkpoint`` relative to ``out``).

    Raises
    ------
    ValueError
        if checkpoints disagree on the training or validation data, or a run's final checkpoint
        records no κ (it cannot be put on the C = 3κND axis).
    """
    rows = []
    for run_dir in run_dirs:
        metas = [(d, read_metadata(d)) for d in checkpoints_of(run_dir)]
        if not metas:
            continue
        kappa = metas[-1][1].get("throughput", {}).get("kappa")
        if kappa is None:
            raise ValueError(f"{metas[-1][0]}: no measured kappa in throughput; cannot compute C = 3κND")
        for directory, meta in metas:
            val = meta["validation"]
            rows.append({
                "architecture": meta["architecture"], "width": meta["width"], "run": Path(run_dir).name,
                "step": meta["step"], "final": meta["step"] >= meta["steps_total"], "N": meta["N"],
                "D": meta["atoms_seen"], "C": 3.0 * kappa * meta["N"] * meta["atoms_seen"],
                "C_measured": meta.get("flops"), "kappa": kappa, "L": val["force_loss"], "loss": val["loss"],
                **{k: val.get(k) for k in ("energy_loss", "force_loss", "energy_mae_mev_per_atom", "force_mae_mev_per_A",
                                           "force_l2_mae_mev_per_A", "zero_force_mae_mev_per_A")},
                "val_structures": val.get("structures"), "val_atoms": val.get("atoms"),
                "samples_seen": meta["samples_seen"], "wall_time_s": meta.get("wall_time_s"),
                "data_hash": meta["data_hash"], "val_data_hash": meta["config"].get("val_data_hash"),
                "checkpoint": str(directory.resolve().relative_to(Path(out).resolve())),
            })
    for key in ("data_hash", "val_data_hash"):
        seen = {r[key] for r in rows}
        if len(seen) > 1:
            raise ValueError(f"the study's checkpoints disagree on {key} ({len(seen)} values): "
                             "runs trained or validated on different data are not comparable")
    return rows


def write_csv(rows: list[dict], path: Path) -> Path:
    """Write the run table (columns :data:`COLUMNS`, floats with full precision)."""
    path = Path(path)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
    return path
