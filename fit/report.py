"""Run the requested fits on a run table and write fit.json, report.md and the plots.

``fit.json`` schema (all numbers in the data's own units; C in FLOPs)::

    {
      "source": str, "notes": [str], "warnings": [str], "law": "frontier|nd|isoflop|all",
      "groups": {
        GROUP: {                       # "all" when there is no group column
          "n_points": int, "k": float, "k_spread": float,   # k = median C/(N·D), spread max/min
          "n_models": int,               # distinct N (model sizes) among the rows
          "warnings": [str],             # what the data cannot support (e.g. a one-model frontier)
          "frontier": {"converged", "message", "gamma_c", "F_c", "L_inf", "l_inf_free",
                       "n_points" (frontier checkpoints fitted), "n_owners_total",
                       "compute_window": [lo|null, hi|null], "objective" (Σ squared log residuals),
                       "intervals": {PARAM: {"se", "lo", "hi", "level", "n"}},
                       "free": {same keys, L_inf fitted}  # only with --l-inf-free},
          "nd": {"converged", "message", "E", "A", "B", "alpha", "beta", "a", "b", "gamma_c", "G",
                 "log_A", "log_B", "log_E", "n_points", "objective" (summed Huber loss),
                 "huber_delta", "n_starts", "n_starts_converged", "intervals": {...},
                 "bootstrap": {"n", "n_ok", "level"},
                 "allocation": [{"C", "k", "N_opt", "D_opt", "L_opt", "D_per_N", "intervals"}]},
          "isoflop": {"converged", "message", "mode", "a", "b", "n_levels", "levels": [{"C", "N_opt"}],
                      "intervals", "objective"},
          "errors": {LAW: message}     # a law that could not be fitted to this group
        }
      }
    }

A fit that did not converge carries ``"converged": false`` and its ``message`` and no numbers;
the report and the plots say so where its numbers would be.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fit import frontier as fr
from fit import isoflop as iso
from fit import sumlaw as sl
from fit.allocation import allocation_table, estimate_k
from fit.data import RunTable
from fit.sumlaw import FitError


def run_fits(table: RunTable, *, law="all", budgets=(), c_min=None, c_max=None, l_inf_free=False,
             n_bootstrap=1000, level=0.95, seed=0) -> dict:
    """Fit the requested laws to every group of ``table``.

    Returns
    -------
    dict
        ``{"groups": {name: {...}}, "_objects": {name: {"frontier", "nd", "isoflop", "table"}}}``;
        ``_objects`` holds the fit objects for plotting and is dropped from fit.json.
    """
    laws = {"frontier", "nd", "isoflop"} if law == "all" else {law}
    out = {"groups": {}, "_objects": {}}
    for name in table.groups():
        t = table.subset(name)
        k, spread = estimate_k(t.N, t.D, t.C)
        n_models = int(np.unique(t.N).size)
        g = {"n_points": int(t.N.size), "k": k, "k_spread": spread, "n_models": n_models, "errors": {},
             "warnings": []}
        if n_models < 2 and laws & {"frontier", "isoflop"}:
            g["warnings"].append(
                f"{name}: every row comes from one model size (N = {t.N[0]:.4g}); its 'frontier' is that run's own "
                "learning curve, not a frontier across models, and its γ_c is not comparable to a scaling "
                "study's — train at least two widths")
        objs = {"table": t}
        if "frontier" in laws:
            try:
                f = fr.fit_frontier(t.C, t.L, c_min=c_min, c_max=c_max, n_bootstrap=n_bootstrap, level=level, seed=seed)
                g["frontier"] = fr.summary_dict(f)
                objs["frontier"] = f
                if l_inf_free:
                    f2 = fr.fit_frontier(t.C, t.L, c_min=c_min, c_max=c_max, l_inf_free=True,
                                         n_bootstrap=n_bootstrap, level=level, seed=seed)
                    g["frontier"]["free"] = fr.summary_dict(f2)
                    objs["frontier_free"] = f2
            except FitError as err:
                g["errors"]["frontier"] = str(err)
        if "nd" in laws:
            try:
                f = sl.fit_sum_law(t.N, t.D, t.L, n_bootstrap=n_bootstrap, level=level, seed=seed)
                g["nd"] = sl.summary_dict(f)
                objs["nd"] = f
                if f.converged:
                    cs = list(budgets) or list(np.geomspace(t.C.min(), t.C.max(), 3))
                    g["nd"]["allocation"] = allocation_table(f, cs, k, level)
            except FitError as err:
                g["errors"]["nd"] = str(err)
        if "isoflop" in laws:
            try:
                f = iso.fit_isoflop(t.N, t.C, t.L, level=level)
                g["isoflop"] = iso.summary_dict(f)
                objs["isoflop"] = f
            except FitError as err:
                g["errors"]["isoflop"] = str(err)
        out["groups"][name] = g
        out["_objects"][name] = objs
    return out


def _fmt(v, iv=None):
    if v is None:
        return "—"
    s = f"{v:.4g}"
    if iv:
        s += f" [{iv['lo']:.4g}, {iv['hi']:.4g}]"
    return s


def _fmt_constant(n: dict, p: str) -> str:
    """A law constant (E, A, B); as exp(log p) where it is outside float64's range (A = e^1580)."""
    lp = n.get(f"log_{p}")
    if lp is not None and not (1e-300 < n[p] < 1e300):
        iv = n["intervals"].get(f"log_{p}")
        return f"exp({_fmt(lp, iv)})"
    return _fmt(n[p], n["intervals"].get(p))


def summary_rows(result: dict) -> list[tuple[str, str, str, str]]:
    """(group, law, quantity, value [interval]) rows for the terminal table and report."""
    rows = []
    for name, g in result["groups"].items():
        f = g.get("frontier")
        if f:
            if f["converged"]:
                for p in ("gamma_c", "F_c"):
                    rows.append((name, "frontier (L∞=0)", p, _fmt(f[p], f["intervals"].get(p))))
                rows.append((name, "frontier (L∞=0)", "points (frontier/owners)", f"{f['n_points']}/{f['n_owners_total']}"))
            else:
                rows.append((name, "frontier", "FAILED", f["message"]))
            fr2 = f.get("free")
            if fr2:
                if fr2["converged"]:
                    for p in ("gamma_c", "F_c", "L_inf"):
                        rows.append((name, "frontier (L∞ free)", p, _fmt(fr2[p], fr2["intervals"].get(p))))
                else:
                    rows.append((name, "frontier (L∞ free)", "FAILED", fr2["message"]))
        n = g.get("nd")
        if n:
            if n["converged"]:
                for p in ("E", "A", "B"):
                    rows.append((name, "L(N,D)", p, _fmt_constant(n, p)))
                for p in ("alpha", "beta", "a", "b", "gamma_c"):
                    rows.append((name, "L(N,D)", p, _fmt(n[p], n["intervals"].get(p))))
                rows.append((name, "L(N,D)", "points / Huber objective", f"{n['n_points']} / {n['objective']:.4g}"))
                for a in n.get("allocation", []):
                    ivs = a.get("intervals", {})
                    rows.append((name, f"optimal @ C={a['C']:.3g}", "N*, D*, L*",
                                 f"{_fmt(a['N_opt'], ivs.get('N_opt'))}, {_fmt(a['D_opt'], ivs.get('D_opt'))}, "
                                 f"{_fmt(a['L_opt'], ivs.get('L_opt'))}"))
            else:
                rows.append((name, "L(N,D)", "NOT CONVERGED", n["message"]))
        i = g.get("isoflop")
        if i:
            if i["converged"]:
                rows.append((name, "isoFLOP", "a (N_opt ∝ C^a)", _fmt(i["a"], i["intervals"]["a"])))
            else:
                rows.append((name, "isoFLOP", "FAILED", i["message"]))
        for law, msg in g.get("errors", {}).items():
            rows.append((name, law, "ERROR", msg))
    return rows


def all_warnings(result: dict, table_warnings: list | tuple = ()) -> list[str]:
    """The table's warnings, then each group's and each failed fit's, as one list of lines."""
    lines = list(table_warnings)
    for name, g in result["groups"].items():
        lines += g.get("warnings", [])
        for law in ("frontier", "nd", "isoflop"):
            fit = g.get(law)
            if fit is not None and not fit.get("converged", True):
                lines.append(f"{name}: the {law} fit failed: {fit['message']}")
        lines += [f"{name}: the {law} fit could not be made: {msg}" for law, msg in g.get("errors", {}).items()]
    return lines


def write_outputs(result: dict, out_dir: Path, *, source: str, notes: list, law: str, loss_label: str,
                  data_unit: str, table_warnings: list | tuple = ()) -> list[Path]:
    """Write fit.json, report.md and PNG plots into ``out_dir``; returns the written paths."""
    from fit import plots  # matplotlib only when writing

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    objs = result["_objects"]
    warnings = all_warnings(result, table_warnings)
    doc = {"source": str(source), "notes": notes, "warnings": warnings, "law": law, "groups": result["groups"]}
    paths = [out_dir / "fit.json"]
    paths[0].write_text(json.dumps(doc, indent=2, default=float))
    tables = {k: v["table"] for k, v in objs.items()}
    figs = []
    fronts = {k: v.get("frontier") for k, v in objs.items()}
    failures = {name: {**g.get("errors", {}), **{law: g[law]["message"] for law in ("frontier", "nd")
                                                  if law in g and not g[law]["converged"]}}
                for name, g in result["groups"].items()}
    if law in ("frontier", "all"):
        figs.append(plots.plot_frontier(tables, fronts, out_dir / "frontier.png", loss_label,
                                        failures=failures, warnings=warnings))
    nds = {k: v.get("nd") for k, v in objs.items()}
    for name, f in nds.items():
        if f is not None and f.converged:
            k = result["groups"][name]["k"]
            safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)
            figs.append(plots.plot_nd(tables[name], f, k, out_dir / f"nd_{safe}.png", name, loss_label, data_unit))
    for name, v in objs.items():
        f = v.get("isoflop")
        if f is not None and f.levels:
            safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)
            figs.append(plots.plot_isoflop(f, out_dir / f"isoflop_{safe}.png", name, loss_label))
    if law in ("frontier", "nd", "all"):
        figs.append(plots.plot_residuals(tables, nds, fronts, out_dir / "residuals.png", failures=failures))
    md = [f"# Scaling-law fit of `{source}`", "", *[f"- {n}" for n in notes], ""]
    if warnings:
        md += ["**Warnings**", "", *[f"- **{w}**" for w in warnings], ""]
    md += ["| group | law | quantity | estimate [95% percentile interval] |", "|---|---|---|---|"]
    md += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in summary_rows(result)]
    md += ["", "Intervals: bootstrap percentile intervals over points (frontier: over frontier checkpoints;",
           "isoFLOP: t-interval of the regression slope). Allocation uses C = k·N·D with k per group:", ""]
    md += [f"- {n}: k = {g['k']:.4g} (max/min of C/(N·D) over rows: {g['k_spread']:.3g})" for n, g in result["groups"].items()]
    md += ["", *[f"![{p.stem}]({p.name})" for p in figs], ""]
    (out_dir / "report.md").write_text("\n".join(md))
    return paths + [out_dir / "report.md"] + figs
