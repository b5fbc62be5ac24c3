"""What a study will cost, before it runs: N, κ, FLOPs and time per run (``zoo study --dry-run``).

Per run: N is counted on the meta device; κ (forward FLOPs per atom and parameter) and the step
FLOPs per atom (forward + backward + optimizer) are counted by :func:`zoo.flops.report.model_report`
on its reference batch; C = 3κ·N·D_max is the paper's convention. At most four widths per
architecture are traced, none above :data:`MAX_TRACE_PARAMS` parameters (building those costs
memory and minutes); the others interpolate κ in log N between traced widths or hold the largest
traced one's (κ varies slowly once N is large; the table marks them).

Time on CPU: seconds per atom ≈ ``o + f / R`` with ``f`` the step FLOPs per atom, ``R`` the
effective FLOP/s of one CPU core and ``o`` a per-atom overhead (graph building, scatters, the
loader), per architecture (:data:`CPU_SPEED`, measured by :func:`calibrate` on finished runs), plus
a fixed start-up and validation cost per run. Time on GPUs: step FLOPs / (GPUs × the preset's
assumed achieved FLOP/s per GPU).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from zoo.study.plan import RunSpec
from zoo.study.presets import Preset

MAX_TRACE_PARAMS = 12_000_000

#: R, compute-bound FLOP/s of one core of the 2-core development machine: eSEN at width 64 trains at
#: ≈ 2.3e8 step FLOPs per atom, the whole sample split (8e13 FLOPs) in ≈ 1 h on 2 idle cores
#: (launcher/config.py, DEFAULT_MAX_ATOMS), i.e. ≈ 1.1e10 FLOP/s per core
CPU_CORE_FLOPS = 1.1e10
#: ``{architecture: (R FLOP/s, o s/atom)}``: o fitted by :func:`calibrate` to the quick study of
#: 2026-12-01 (widths 4–16, 64 atoms per step) on the shared machine at load average ≈ 11 on 2 cores,
#: so an upper bound for an idle machine; ``--calibrate DIR`` refits it to a study of your own
CPU_SPEED = {"mpnn": (CPU_CORE_FLOPS, 2.4e-3), "mc-egnn": (CPU_CORE_FLOPS, 4.1e-3),
             "gemnet-oc": (CPU_CORE_FLOPS, 4.5e-2), "esen": (CPU_CORE_FLOPS, 7.1e-3)}
#: seconds per run outside training steps (interpreter and DeepSpeed start-up, FLOP trace, pre-training
#: hook, validations, checkpoints): the quick study's wall time per run minus its training time, median
CPU_RUN_OVERHEAD_S = 65.0


def run_costs(preset: Preset, runs: list[RunSpec], d_max: int, max_traces: int = 4) -> list[dict]:
    """One dict per run: architecture, width, N, kappa, traced, step_flops_per_atom, C (3κND_max),
    step_flops (step FLOPs over D_max).

    Per architecture at most ``max_traces`` widths with N ≤ :data:`MAX_TRACE_PARAMS` are traced
    (spread over the ladder in log N); the other runs interpolate κ and the step/forward ratio
    linearly in log N between traced widths and hold them constant beyond (``traced`` False).
    """
    from zoo.flops.report import model_report
    from zoo.study.plan import parameters_of

    sizes = {r.name: parameters_of(r.architecture, r.width, **r.model_args) for r in runs}
    out = []
    for arch in dict.fromkeys(r.architecture for r in runs):
        ladder = sorted((r for r in runs if r.architecture == arch), key=lambda r: sizes[r.name])
        small = [r for r in ladder if sizes[r.name] <= MAX_TRACE_PARAMS] or ladder[:1]
        picks = {small[round(i)].name for i in np.linspace(0, len(small) - 1, min(max_traces, len(small)))}
        traced = {}
        for r in ladder:
            if r.name in picks:
                rep = model_report(arch, r.width, **r.model_args)
                traced[np.log(sizes[r.name])] = (rep["kappa"], rep["step_over_forward"])
        xs = sorted(traced)
        for r in ladder:
            n = sizes[r.name]
            kappa = float(np.interp(np.log(n), xs, [traced[x][0] for x in xs]))
            ratio = float(np.interp(np.log(n), xs, [traced[x][1] for x in xs]))
            step_per_atom = ratio * kappa * n
            out.append({"run": r.name, "architecture": arch, "width": r.width, "N": n, "kappa": kappa,
                        "traced": r.name in picks, "step_flops_per_atom": step_per_atom, "C": 3.0 * kappa * n * d_max,
                        "step_flops": step_per_atom * d_max})
    order = {r.name: i for i, r in enumerate(runs)}
    return sorted(out, key=lambda c: order[c["run"]])


def cpu_seconds(cost: dict, d_max: int, speed: dict | None = None) -> float:
    """Estimated wall seconds of one single-rank CPU run (training + :data:`CPU_RUN_OVERHEAD_S`)."""
    rate, overhead = (speed or CPU_SPEED)[cost["architecture"]]
    return d_max * (overhead + cost["step_flops_per_atom"] / rate) + CPU_RUN_OVERHEAD_S


def schedule_seconds(durations: list[float], parallel: int) -> float:
    """Makespan of running ``durations`` longest first on ``parallel`` slots (greedy list scheduling)."""
    slots = [0.0] * max(1, parallel)
    for d in sorted(durations, reverse=True):
        slots[slots.index(min(slots))] += d
    return max(slots)


def calibrate(study_dir: Path, rate: float = CPU_CORE_FLOPS) -> dict:
    """Per-atom overhead ``o`` per architecture from a finished study, with ``R = rate`` fixed:
    ``o`` = median over its runs of (train seconds per atom − step FLOPs per atom / R), ≥ 0.

    Small widths are overhead-bound, so their timings pin ``o`` but not ``R``; ``R`` is the
    documented compute-bound rate (:data:`CPU_CORE_FLOPS`). Reads each run's last
    ``metadata.json``. Returns ``{architecture: (R, o)}``; raises ``ValueError`` if ``study_dir``
    holds no finished run.
    """
    from zoo.study.collect import checkpoints_of

    points: dict = {}
    for run_dir in sorted((Path(study_dir) / "runs").glob("*")):
        ckpts = checkpoints_of(run_dir)
        if not ckpts:
            continue
        meta = json.loads((ckpts[-1] / "metadata.json").read_text())
        thr = meta.get("throughput", {})
        if not thr.get("train_time_s") or not meta.get("flops"):
            continue
        atoms = meta["atoms_seen"]
        points.setdefault(meta["architecture"], []).append(thr["train_time_s"] / atoms - meta["flops"] / atoms / rate)
    if not points:
        raise ValueError(f"{study_dir}: no finished run with throughput to calibrate from")
    return {arch: (rate, max(0.0, float(np.median(v)))) for arch, v in points.items()}


def dry_run_text(preset: Preset, costs: list[dict], ladder: dict, speed: dict | None = None) -> str:
    """The plan as text: runs, N, κ, C, and the time (CPU) or GPU-hours (cluster) estimate."""
    d_max = ladder["atoms"][-1]
    lines = [f"preset {preset.name}: {preset.description}",
             f"{len(costs)} runs × one epoch of D_max = {d_max:,} atoms; {preset.atoms_per_batch} atoms/step × "
             f"{preset.ranks} rank(s); {preset.parallel} run(s) at a time",
             f"data ladder ({'exact, from the shard plan' if ladder['exact'] else 'fractions of D_max'}): "
             f"checkpoints at steps {ladder['checkpoint_steps']} of {ladder['steps']}: D = "
             + ", ".join(f"{d:.3g}" for d in ladder["atoms"]),
             "",
             f"{'run':18} {'N':>13} {'kappa':>7} {'step FLOP/atom':>15} {'C=3kND_max':>12} "
             + ("{:>10}".format("GPU-h") if preset.gpu_flops else "{:>10}".format("CPU s"))]
    total, durations = 0.0, []
    for c in costs:
        if preset.gpu_flops:
            value = c["step_flops"] / preset.gpu_flops / 3600.0
            total += value
        else:
            value = cpu_seconds(c, d_max, speed)
            durations.append(value)
        mark = "" if c["traced"] else "*"
        lines.append(f"{c['run']:18} {c['N']:13,d} {c['kappa']:7.2f}{mark:1} {c['step_flops_per_atom']:15.3g} "
                     f"{c['C']:12.3g} {value:10.3g}")
    lines.append("")
    if any(not c["traced"] for c in costs):
        lines.append(f"* κ interpolated in log N between traced widths, or the largest traced one's beyond "
                     f"(traced: at most 4 widths per architecture, N ≤ {MAX_TRACE_PARAMS:,})")
    lines.append(f"total compute Σ C = {sum(c['C'] for c in costs):.3g} FLOPs (3κND); step FLOPs "
                 f"{sum(c['step_flops'] for c in costs):.3g}")
    if preset.gpu_flops:
        lines.append(f"estimated {total:,.0f} GPU-hours ({total / preset.ranks:,.0f} h wall per run slot of "
                     f"{preset.ranks} GPUs, runs one after another: {total / preset.ranks / 24:,.1f} days); "
                     + preset.throughput_note)
    else:
        wall = schedule_seconds(durations, preset.parallel)
        lines.append(f"estimated wall time {wall / 3600:.2f} h on {preset.parallel} core(s), idle machine "
                     f"(serial sum {sum(durations) / 3600:.2f} h); s/atom = o + f/R per architecture "
                     f"{ {a: (f'{r:.3g} FLOP/s', f'{o:.2g} s') for a, (r, o) in (speed or CPU_SPEED).items()} } "
                     f"+ {CPU_RUN_OVERHEAD_S:.0f} s per run")
    return "\n".join(lines)
