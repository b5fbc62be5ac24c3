"""κ and FLOPs of an architecture at any width, without training: behind ``zoo flops``.

The reference batch is the first structures of the embedded validation sample
``data/omol25_sample/val`` (real molecules of the project's data path) when it exists, else the
handed-in cases (``../shared/cases`` beside the repository: C04's 300-atom water cluster and methane, C01's benzene,
water and Na⁺, C02's water and far H). κ depends on the graph density of the data (edges per
atom), so compare κ on the same reference batch.
"""

from __future__ import annotations

from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]  # zoo/flops/report.py → the repository
SAMPLE_VAL = REPO / "data" / "omol25_sample" / "val"
CASES = REPO.parent / "shared" / "cases"
_CASE_FILES = ("C04-mixed-sizes.extxyz", "C01-last-structure-without-edges.extxyz", "C02-atom-beyond-cutoff.extxyz")


def reference_structures(max_structures: int = 32) -> tuple[list, str]:
    """``(list of ase.Atoms, description)`` of the reference batch (see module docstring).

    Raises ``FileNotFoundError`` when neither the sample nor the cases exist.
    """
    import ase.io

    files = sorted(SAMPLE_VAL.glob("*.aselmdb")) if SAMPLE_VAL.is_dir() else []
    if files:
        from itertools import islice

        from datapipe.sources import iter_atoms

        atoms = list(islice(iter_atoms(files[0]), max_structures))
        if atoms:
            return atoms, f"{files[0].relative_to(REPO)}: first {len(atoms)} structures"
    paths = [CASES / name for name in _CASE_FILES if (CASES / name).exists()]
    if not paths:
        raise FileNotFoundError(f"no reference data: neither {SAMPLE_VAL} nor {CASES} holds structures")
    atoms = [a for p in paths for a in ase.io.read(str(p), ":")]
    return atoms, "cases " + ", ".join(p.name.split("-")[0] for p in paths)


def model_report(name: str, width: int, direct_forces: bool = True, structures: list | None = None,
                 **overrides) -> dict:
    """FLOPs and κ of architecture ``name`` at ``width`` on the reference batch.

    Returns a dict: parameters, atoms, edges, structures, forward FLOPs (total, per atom, per
    edge), κ, the step FLOPs (and its parts), the step/forward ratio, the paper's κ, the
    reference description and the unsupported operators (empty for the zoo).
    """
    from datapipe.graph import batch_from_atoms
    from zoo.flops.trace import PAPER_KAPPA, count_parameters, count_step, kappa
    from zoo.registry import build

    torch.manual_seed(0)
    model = build(name, width=width, direct_forces=direct_forces, **overrides)
    model.train()
    source = "given structures"
    if structures is None:
        structures, source = reference_structures()
    batch = batch_from_atoms(structures, cutoff=model.data_cutoff)
    flops = count_step(model, batch)
    n = count_parameters(model)
    return {
        "model": name,
        "width": width,
        "direct_forces": direct_forces,
        "parameters": n,
        "reference": source,
        "structures": flops.graphs,
        "atoms": flops.atoms,
        "edges": flops.edges,
        "forward_flops": flops.forward,
        "forward_flops_per_atom": flops.forward / flops.atoms,
        "forward_flops_per_edge": flops.forward / max(flops.edges, 1),
        "kappa": kappa(flops, n),
        "paper_kappa": PAPER_KAPPA.get(name),
        "step_flops": flops.total,
        "step_flops_per_atom": flops.total / flops.atoms,
        "step_over_forward": flops.total / flops.forward,
        "force_backward_flops": flops.force_backward,
        "backward_flops": flops.backward,
        "matmul_share_of_forward": flops.matmul_forward / flops.forward,
        "unsupported": flops.unsupported,
        "top_operators": dict(list(flops.by_operator.items())[:8]),
    }
