"""``zoo plan``: per-rank memory of every engine configuration before a run starts.

:func:`make_plan` measures the model's activations (:mod:`zoo.plan.activations`) and applies
the per-rank memory model (:mod:`zoo.plan.memory`); :func:`render` prints it. The launcher calls
:func:`check` with its own configuration before the first step.
"""

from __future__ import annotations

import torch

from zoo.plan.memory import RUNTIME_BYTES, Plan, parse_memory, plan_all, plan_one, recommend

__all__ = ["make_plan", "render", "check", "parse_memory", "Plan"]


def model_sizes(name: str, width: int, direct_forces: bool, **overrides) -> tuple[int, int]:
    """``(N, largest repeated block's parameters)``, built on the meta device."""
    from zoo.registry import build

    with torch.device("meta"):
        model = build(name, width=width, direct_forces=direct_forces, **overrides)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    largest = max((sum(p.numel() for p in b.parameters()) for b in model.repeated_blocks()), default=n)
    return n, largest


def make_plan(name: str, width: int, gpus: int, memory: float, atoms: int, conservative: bool = False,
              precision: str = "bf16", structures=None, **overrides) -> dict:
    """Every configuration's per-rank memory for ``name`` at ``width`` on ``gpus`` ranks of
    ``memory`` bytes with ``atoms`` atoms per rank and step; ``structures`` (ase.Atoms) set the
    graph density of the activation measurement (default: :func:`zoo.flops.report.reference_structures`)."""
    from zoo.flops.report import reference_structures
    from zoo.plan.activations import activations_per_atom

    if structures is None:
        structures = reference_structures()[0][:8]
    n, largest = model_sizes(name, width, not conservative, **overrides)
    activations = activations_per_atom(name, width, not conservative, structures, **overrides)
    plans = plan_all(n, largest, gpus, precision, activations, atoms, memory, conservative)
    best = recommend(plans)
    return {"model": name, "width": width, "N": n, "largest_block": largest, "gpus": gpus, "memory": memory,
            "atoms_per_batch": atoms, "conservative": conservative, "precision": precision,
            "activations": activations, "plans": plans, "recommended": best}


def render(result: dict, width: int = 220) -> str:
    """The plan as a table of GiB (2³⁰ bytes) per rank, with the recommendation.

    The memory per rank in the header is what ``--gpu-memory`` gave (``80GB`` = 10⁹-byte GB,
    shown as 74.5 GiB); a configuration fits when its total stays under 90 % of it. The runtime
    column is the fixed framework share (:data:`zoo.plan.memory.RUNTIME_BYTES`).
    """
    from rich.console import Console
    from rich.table import Table

    g = 2**30
    a = result["activations"]
    header = (f"{result['model']} width {result['width']}: N = {result['N']:,}, {result['gpus']} ranks × "
              f"{result['memory'] / g:.1f} GiB, {result['atoms_per_batch']} atoms/rank, {result['precision']}, "
              f"{'conservative' if result['conservative'] else 'direct'} forces\n"
              f"activations {a['per_atom'] / 2**20:.2f} MiB/atom fp32 ({a['per_atom_checkpointed'] / 2**20:.2f} with "
              f"checkpointing; {a['edges_per_atom']:.1f} edges/atom; {a['method']})")
    table = Table(box=None, pad_edge=False, title_justify="left")
    table.add_column("configuration", no_wrap=True)
    for column in ("weights", "grads", "optimizer", "activations", "buffers", "runtime", "total"):
        table.add_column(f"{column} GiB", justify="right", no_wrap=True)
    table.add_column("fits")
    for p in result["plans"]:
        fits = "yes" if p.fits else "no"
        if not p.allowed:
            fits += " (not exact for conservative forces)"
        table.add_row(p.flags(), *(f"{v / g:.2f}" for v in (p.weights, p.gradients, p.optimizer, p.activations,
                                                              p.buffers, RUNTIME_BYTES, p.total)), fits)
    best = result["recommended"]
    footer = (f"recommended: {best.flags()} ({best.total / g:.1f} GiB per rank)" if best is not None else
              "nothing fits: more ranks, fewer atoms per batch, or a smaller width")
    console = Console(width=width, record=True, file=__import__("io").StringIO(), color_system=None)
    console.print(table)
    return "\n".join([header, console.export_text().rstrip(), footer])


def check(name: str, width: int, overrides: dict, engine: str, stage, checkpointing: bool, offload: str,
          gpus: int, memory: float, atoms: int, conservative: bool, precision: str) -> tuple[Plan, dict]:
    """The launcher's start-up check: ``(this configuration's plan, the full plan)``; raises
    ``MemoryError`` naming the recommended flags when the configuration cannot fit."""
    result = make_plan(name, width, gpus, memory, atoms, conservative, precision, **overrides)
    a = result["activations"]
    mine = plan_one(engine, stage, result["N"], result["largest_block"], gpus, precision,
                    a["per_atom_checkpointed" if checkpointing else "per_atom"], atoms, checkpointing, offload, memory)
    if not mine.fits:
        best = result["recommended"]
        advice = (f"use {best.flags()} ({best.total / 2**30:.1f} GiB)" if best is not None
                  else "nothing fits on these ranks: more ranks, fewer --atoms-per-batch, or a smaller width")
        raise MemoryError(f"{mine.flags()} needs ≈{mine.total / 2**30:.1f} GiB per rank, more than "
                          f"{memory / 2**30:.1f} GiB × {0.9:.0%} usable; {advice}")
    return mine, result
