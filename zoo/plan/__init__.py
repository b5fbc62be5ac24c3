"""``zoo plan``: per-rank memory of every engine configuration before a run starts.

:func:`make_plan` measures the model's activations (:mod:`zoo.plan.activations`) and applies
the per-rank memory model (:mod:`zoo.plan.memory`); :func:`render` prints it. The launcher calls
:func:`check` with its own configuration before the first step.
"""

from __future__ import annotations

import torch

from zoo.plan.memory import Plan, parse_memory, plan_all, plan_one, recommend

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


def render(result: dict) -> str:
    """The plan as a text table (GiB per rank) with the recommendation."""
    g = 2**30
    a = result["activations"]
    lines = [f"{result['model']} width {result['width']}: N = {result['N']:,}, {result['gpus']} ranks × "
             f"{result['memory'] / g:.0f} GiB, {result['atoms_per_batch']} atoms/rank, {result['precision']}, "
             f"{'conservative' if result['conservative'] else 'direct'} forces",
             f"activations {a['per_atom'] / 2**20:.2f} MiB/atom fp32 ({a['per_atom_checkpointed'] / 2**20:.2f} with "
             f"checkpointing; {a['edges_per_atom']:.1f} edges/atom; {a['method']})",
             f"{'configuration':70} {'weights':>8} {'grads':>8} {'optim':>8} {'activ':>8} {'buffers':>8} "
             f"{'total':>8}  fits"]
    for p in result["plans"]:
        fits = "yes" if p.fits else "no"
        if not p.allowed:
            fits += " (not exact for conservative forces)"
        lines.append(f"{p.flags():70} {p.weights / g:8.2f} {p.gradients / g:8.2f} {p.optimizer / g:8.2f} "
                     f"{p.activations / g:8.2f} {p.buffers / g:8.2f} {p.total / g:8.2f}  {fits}")
    best = result["recommended"]
    lines.append(f"recommended: {best.flags()} ({best.total / g:.1f} GiB per rank)" if best is not None else
                 "nothing fits: more ranks, fewer atoms per batch, or a smaller width")
    return "\n".join(lines)


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
