"""The study's report: fits on ``runs.csv`` (the ``zoo fit`` machinery), the paper beside ours, plots.

Every number in ``report.md`` comes from ``OUT/fit/fit.json``, which :func:`fit_runs` computes
from ``OUT/runs.csv`` exactly as the command printed in the report does
(:data:`FIT_ARGS`): anyone can recompute the report from the CSV alone.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from zoo.study.presets import ARCHITECTURES, PAPER_A, PAPER_B, PAPER_GAMMA_C, Preset

#: the ``zoo fit`` options of the study (the report prints them as a command)
FIT_ARGS = {"loss_col": "L", "group_col": "architecture", "data_unit": "atoms", "seed": 0}


def fit_command_line(csv_name: str, out_dir: str, n_bootstrap: int) -> str:
    """The shell command that recomputes ``fit.json`` from the CSV."""
    return (f"zoo fit {csv_name} --out {out_dir} --loss-col {FIT_ARGS['loss_col']} --group-col "
            f"{FIT_ARGS['group_col']} --data-unit {FIT_ARGS['data_unit']} --bootstrap {n_bootstrap} "
            f"--seed {FIT_ARGS['seed']}")


def fit_runs(csv_path: Path, out_dir: Path, n_bootstrap: int) -> dict:
    """Fit the frontier, L(N, D) and isoFLOP laws per architecture to ``csv_path``; writes
    ``out_dir/{fit.json, report.md, *.png}`` and returns the fit.json document."""
    from fit.data import load_table
    from fit.report import run_fits, write_outputs

    table = load_table(csv_path, loss_col=FIT_ARGS["loss_col"], group_col=FIT_ARGS["group_col"])
    result = run_fits(table, n_bootstrap=n_bootstrap, seed=FIT_ARGS["seed"])
    write_outputs(result, out_dir, source=str(csv_path), notes=table.notes, law="all",
                  loss_label=FIT_ARGS["loss_col"], data_unit=FIT_ARGS["data_unit"])
    return json.loads((Path(out_dir) / "fit.json").read_text())


def _iv(block: dict | None, key: str) -> str:
    """``value [lo, hi]`` of a converged fit's parameter, or why there is none."""
    if not block:
        return "not fitted"
    if not block.get("converged"):
        return "not converged¹"
    value, iv = block.get(key), block.get("intervals", {}).get(key)
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.3g}" + (f" [{iv['lo']:.3g}, {iv['hi']:.3g}]" if iv else "")


def ordering_verdict(fit: dict) -> tuple[str, list[tuple[str, float]]]:
    """Whether γ_c keeps the paper's order eSEN > GemNet-OC > MC-EGNN > MPNN on the point estimates,
    and whether the bootstrap intervals of neighbours overlap (then the order is not resolved)."""
    gammas, intervals = [], {}
    for arch in ARCHITECTURES:
        f = fit["groups"].get(arch, {}).get("frontier")
        if f and f.get("converged"):
            gammas.append((arch, f["gamma_c"]))
            intervals[arch] = f["intervals"].get("gamma_c")
    if len(gammas) < len(ARCHITECTURES):
        missing = sorted(set(ARCHITECTURES) - {a for a, _ in gammas})
        return f"cannot be judged: no converged frontier fit for {', '.join(missing)}", gammas
    ours = [a for a, _ in sorted(gammas, key=lambda x: x[1])]
    holds = ours == list(ARCHITECTURES)
    overlaps = []
    for lo, hi in zip(ARCHITECTURES, ARCHITECTURES[1:]):
        a, b = intervals.get(lo), intervals.get(hi)
        if a and b and a["hi"] >= b["lo"]:
            overlaps.append(f"{lo}/{hi}")
    text = ("**holds** on the point estimates" if holds else
            "**does not hold**: ours, smallest to largest γ_c, is " + " < ".join(ours))
    if overlaps:
        text += f"; the 95 % intervals of neighbours overlap ({', '.join(overlaps)}), so the order is not resolved"
    return text, gammas


def write_report(out: Path, preset: Preset, rows: list[dict], fit: dict, ladder: dict, data: dict,
                 n_bootstrap: int, wall_s: float | None) -> Path:
    """Write ``OUT/report.md`` (and ``OUT/learning_curves.png``); returns its path."""
    out = Path(out)
    curves = plot_learning_curves(rows, out / "learning_curves.png")
    finals = [r for r in rows if r["final"]]
    verdict, _ = ordering_verdict(fit)
    md = [f"# Mini scaling study: preset `{preset.name}`", "", preset.description + ".", ""]
    md += ["## Setup", "",
           f"- Training data: `{data['train']}` ({data['train_structures']:,} structures, {data['train_atoms']:,} atoms,"
           f" data hash `{data['train_hash'][:16]}`); force RMS σ = {data['force_rms']:.4f} eV/Å and one set of element"
           " references, shared by every run.",
           f"- Validation: the first {data['val_structures']:,} structures of `{preset.val}` ({data['val_atoms']:,} atoms,"
           f" hash `{data['val_hash'][:16]}`), the same set at every checkpoint of every run.",
           f"- Grid: {len(finals)} runs (" + "; ".join(f"{a}: widths {', '.join(map(str, w))}" for a, w in
                                                  _widths(finals).items()) + "), one epoch over"
           f" D_max = {ladder['atoms'][-1]:,} atoms each, {preset.atoms_per_batch} atoms per step × {preset.ranks}"
           f" rank(s), seed {preset.seed}; model overrides {preset.model_args or 'none'}.",
           f"- Data ladder: checkpoints at steps {ladder['checkpoint_steps']} of {ladder['steps']}, i.e. D = "
           + ", ".join(f"{d:,}" for d in ladder["atoms"]) + " atoms; the same batches in every run (plan "
           f"`{(ladder['plan_id'] or '')[:12]}`), each D a prefix of the next.",
           "- L = validation force loss (mean per-atom L2 force error / σ, the paper's f_loss); C = 3κ·N·D with κ"
           " measured per run; schedule-free AdamW, μP-transferred LR (registry defaults)."]
    run_s = sum(r["wall_time_s"] or 0.0 for r in finals)
    md.append(f"- Training time: Σ over runs of each run's wall time (in process, resumes included) = {run_s:,.0f} s"
              + (f"; this `zoo study` invocation took {wall_s:,.0f} s before the fits." if wall_s is not None else "."))
    md += ["", "## Runs (final checkpoints)", "",
           "| architecture | width | N | D | C (FLOPs) | L | force MAE (meV/Å) | energy MAE (meV/atom) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in finals:
        md.append(f"| {r['architecture']} | {r['width']} | {r['N']:,} | {r['D']:,} | {r['C']:.3g} | {r['L']:.4f} | "
                  f"{r['force_mae_mev_per_A']:.1f} | {r['energy_mae_mev_per_atom']:.2f} |")
    zero = finals[0]["zero_force_mae_mev_per_A"] if finals else float("nan")
    md += ["", f"Zero-force baseline on the validation set: {zero:.1f} meV/Å.", ""]
    md += ["## Scaling laws, ours beside the paper's (arXiv 2510.09768)", "",
           "| architecture | γ_c ours [95 % CI] | γ_c paper | α | β | a = β/(α+β) | b | a (isoFLOP) |",
           "|---|---|---:|---|---|---|---|---|"]
    for arch in ARCHITECTURES:
        g = fit["groups"].get(arch, {})
        nd, iso = g.get("nd"), g.get("isoflop")
        md.append(f"| {arch} | {_iv(g.get('frontier'), 'gamma_c')} | {PAPER_GAMMA_C[arch]} | {_iv(nd, 'alpha')} | "
                  f"{_iv(nd, 'beta')} | {_iv(nd, 'a')} | {_iv(nd, 'b')} | {_iv(iso, 'a')} |")
    md += ["", f"Paper: a ≈ {PAPER_A}, b ≈ {PAPER_B}. Paper's γ_c order: eSEN > GemNet-OC > MC-EGNN > MPNN.",
           f"On this study the order {verdict}.", ""]
    unconverged = [f"{a} {law}: {g[law]['message']}" for a, g in fit["groups"].items() for law in ("nd", "isoflop")
                   if g.get(law) and not g[law].get("converged")]
    if unconverged:
        md += ["¹ " + "; ".join(unconverged), ""]
    errors = {a: g["errors"] for a, g in fit["groups"].items() if g.get("errors")}
    if errors:
        md += ["Fits that could not be made: " + "; ".join(f"{a} {law}: {m}" for a, e in errors.items()
                                                          for law, m in e.items()), ""]
    md += ["## Plots", "", "![learning curves](learning_curves.png)", "",
           "Validation force loss against atoms seen, one line per run (colour: architecture; darker: wider).", ""]
    for name, caption in (("frontier", "Compute frontier per architecture: every checkpoint (dots) and the fit "
                                       "L(C) = F_c·C^(−γ_c) through the frontier points"),
                          ("residuals", "Residuals of the L(N, D) and frontier fits")):
        if (out / "fit" / f"{name}.png").is_file():
            md += [f"![{name}](fit/{name}.png)", "", caption + ".", ""]
    for png in sorted((out / "fit").glob("nd_*.png")) + sorted((out / "fit").glob("isoflop_*.png")):
        md += [f"![{png.stem}](fit/{png.name})", ""]
    md += ["## Recompute", "", "Every number above is in `fit/fit.json`, computed from `runs.csv` alone by:", "",
           "```", fit_command_line("runs.csv", "fit", n_bootstrap), "```", "",
           "(`fit/report.md` lists every fitted parameter with its interval.) `runs.csv` has one row per checkpoint;"
           " `checkpoint` is each checkpoint's directory (weights + metadata) relative to this folder.", ""]
    if preset.name == "quick":
        md += ["_The quick preset is a smoke test: 500 atoms and tiny widths. Its exponents are noise and"
               " say nothing about the paper's claims._", ""]
    path = out / "report.md"
    path.write_text("\n".join(md))
    _ = curves
    return path


def _widths(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(r["architecture"], []).append(r["width"])
    return {a: sorted(w) for a, w in out.items()}


def plot_learning_curves(rows: list[dict], path: Path) -> Path:
    """Validation force loss L against atoms seen D for every run (log-log), coloured by architecture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cmaps = dict(zip(ARCHITECTURES, ("Greys", "Blues", "Greens", "Reds")))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    by_run: dict = {}
    for r in rows:
        by_run.setdefault((r["architecture"], r["width"]), []).append(r)
    for arch in ARCHITECTURES:
        widths = sorted(w for a, w in by_run if a == arch)
        for i, w in enumerate(widths):
            pts = sorted(by_run[(arch, w)], key=lambda r: r["D"])
            colour = plt.get_cmap(cmaps[arch])(0.45 + 0.5 * (i + 1) / max(len(widths), 1))
            label = f"{arch} w{w} (N={pts[0]['N']:,})"
            axes[0].plot([p["D"] for p in pts], [p["L"] for p in pts], "o-", color=colour, label=label, ms=3)
            axes[1].plot([p["C"] for p in pts], [p["L"] for p in pts], "o-", color=colour, ms=3)
    for ax, xlabel in zip(axes, ("atoms seen D", "training compute C = 3κND (FLOPs)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation force loss L (units of force RMS)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title("learning curves")
    axes[1].set_title("loss against compute")
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
