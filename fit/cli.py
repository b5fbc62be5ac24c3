"""``zoo fit``: scaling laws and compute-optimal allocation from a zoo directory or a CSV."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def fit_command(
    source: Path = typer.Argument(..., help="Zoo directory (checkpoints with metadata.json) or a CSV run table."),
    out: Path = typer.Option(..., "--out", help="Output directory for fit.json, report.md and PNG plots."),
    n_col: str = typer.Option("N", "--n-col", help="Column of parameter counts N."),
    d_col: str = typer.Option("D", "--d-col", help="Column of data seen D (tokens or atoms)."),
    c_col: str = typer.Option("C", "--c-col", help="Column of training FLOPs C."),
    loss_col: str = typer.Option("loss", "--loss-col", help="Column of validation loss L."),
    group_col: Optional[str] = typer.Option(None, "--group-col", help="Column to fit separately by (zoo default: architecture)."),
    where: List[str] = typer.Option([], "--where", help='Row filter "COL OP VALUE", OP in == != < <= > >=; repeatable, all must hold.'),
    flops_per_param_token: Optional[float] = typer.Option(None, "--flops-per-param-token", help="K in C = K·N·D, to derive a missing D or C."),
    law: str = typer.Option("all", "--law", help="frontier | nd | isoflop | all"),
    budget: List[float] = typer.Option([], "--budget", help="Compute budget C (FLOPs) for N*, D*; repeatable."),
    c_min: Optional[float] = typer.Option(None, "--c-min", help="Frontier compute window, lower end (FLOPs)."),
    c_max: Optional[float] = typer.Option(None, "--c-max", help="Frontier compute window, upper end (FLOPs)."),
    l_inf_free: bool = typer.Option(False, "--l-inf-free", help="Also fit the frontier with L∞ free."),
    n_bootstrap: int = typer.Option(1000, "--bootstrap", help="Bootstrap refits for intervals."),
    data_unit: str = typer.Option("data items", "--data-unit", help="Unit of D for plot labels (atoms, tokens)."),
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed."),
    split_by_data: bool = typer.Option(False, "--split-by-data", help="Rows of different training data or validation sets: fit each apart (default: refuse)."),
    mix_data: bool = typer.Option(False, "--mix-data", help="Rows of different training data or validation sets: fit them together anyway (default: refuse)."),
) -> None:
    """Fit L(C) frontier, L(N, D) and isoFLOP laws; print a table; write fit.json, report.md, plots."""
    from rich.console import Console
    from rich.table import Table

    from fit.data import load_table
    from fit.report import all_warnings, run_fits, summary_rows, write_outputs
    from fit.sumlaw import FitError

    console = Console()
    if law not in ("frontier", "nd", "isoflop", "all"):
        console.print(f"[red]error:[/red] --law must be frontier, nd, isoflop or all; got {law!r}")
        raise typer.Exit(2)
    if split_by_data and mix_data:
        console.print("[red]error:[/red] --split-by-data and --mix-data exclude each other")
        raise typer.Exit(2)
    if n_bootstrap < 0:
        console.print(f"[red]error:[/red] --bootstrap must be >= 0; got {n_bootstrap}")
        raise typer.Exit(2)
    data_mode = "split" if split_by_data else "mix" if mix_data else "refuse"
    try:
        table = load_table(source, n_col=n_col, d_col=d_col, c_col=c_col, loss_col=loss_col, group_col=group_col,
                           where=where, flops_per_param_token=flops_per_param_token, data_mode=data_mode)
        result = run_fits(table, law=law, budgets=budget, c_min=c_min, c_max=c_max, l_inf_free=l_inf_free,
                          n_bootstrap=n_bootstrap, seed=seed)
    except FitError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(1) from err
    if source.is_dir() and data_unit == "data items":
        data_unit = "atoms"
    paths = write_outputs(result, out, source=str(source), notes=table.notes, law=law, loss_label=loss_col,
                          data_unit=data_unit, table_warnings=table.warnings)
    tab = Table(title=f"scaling-law fit of {source}  (95% bootstrap intervals)")
    for col in ("group", "law", "quantity", "estimate [interval]"):
        tab.add_column(col)
    failed = False
    for row in summary_rows(result):
        style = "red" if row[2] in ("FAILED", "NOT CONVERGED", "ERROR") else None
        failed |= style is not None
        tab.add_row(*row, style=style)
    console.print(tab)
    for line in all_warnings(result, table.warnings):
        console.print(f"[yellow]warning:[/yellow] {line}")
    console.print(f"wrote {', '.join(str(p) for p in paths)}")
    if failed:
        console.print("[yellow]some fits failed or did not converge; see the red rows (no numbers are given for them)[/yellow]")
