"""The ``zoo`` command line. Each sub-command lives in its own package and is imported lazily."""

from __future__ import annotations

import typer

app = typer.Typer(help="symscale: train neural force fields at scale and fit their scaling laws.", no_args_is_help=True)


@app.callback()
def _main() -> None:
    """symscale command line."""


def _register_fit() -> None:
    from fit.cli import fit_command

    app.command("fit")(fit_command)


_register_fit()


def _register_hub() -> None:
    from zoo.hub.commands import register

    register(app)


_register_hub()


@app.command("params")
def params_command(
    model: list[str] = typer.Option(None, "--model", help="architecture(s); default: all"),
    width: list[int] = typer.Option(None, "--width", help="width(s); default: each spec's ladder"),
) -> None:
    """Trainable parameters N of each architecture over its width ladder, as a Markdown table.

    Built on the meta device: no weights are allocated, so any width is instant.
    """
    from zoo.registry import MODELS, parameter_table

    names = model or sorted(MODELS)
    typer.echo(parameter_table(names, width or None))


@app.command("flops")
def flops_command(
    model: str = typer.Option(..., "--model", help="architecture: esen, mpnn, mc-egnn, gemnet-oc"),
    width: list[int] = typer.Option(None, "--width", help="width(s); default: the spec's default width"),
    conservative: bool = typer.Option(False, "--conservative", help="forces as -dE/dx (double backward)"),
    params: float = typer.Option(None, "--params", help="with --atoms: C = 3·κ·N·D for N parameters"),
    atoms: float = typer.Option(None, "--atoms", help="D, atoms seen, for the C = 3κND convention"),
    json_out: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Parameters, forward FLOPs per atom and per edge, κ and step FLOPs of MODEL at WIDTH.

    Counted with fvcore on a reference batch (zoo.flops.report), no training; FMA = 2 FLOPs.
    """
    import json

    from zoo.flops.report import model_report
    from zoo.flops.trace import compute_3knd
    from zoo.registry import get_spec

    widths = width or [get_spec(model).default_width]
    rows = [model_report(model, w, direct_forces=not conservative) for w in widths]
    for row in rows:
        if atoms is not None:
            n = row["parameters"] if params is None else params
            row["compute_3knd_flops"] = compute_3knd(row["kappa"], n, atoms)
    if json_out:
        typer.echo(json.dumps(rows, indent=1))
        return
    typer.echo(f"reference batch: {rows[0]['reference']} ({rows[0]['structures']} structures, "
               f"{rows[0]['atoms']} atoms); FMA = 2 FLOPs; paper κ = {rows[0]['paper_kappa']}")
    typer.echo(f"{'model':10} {'width':>6} {'params N':>12} {'fwd/atom':>11} {'fwd/edge':>11} "
               f"{'kappa':>8} {'step/atom':>11} {'step/fwd':>8}" + ("  C=3kND" if atoms is not None else ""))
    for r in rows:
        line = (f"{r['model']:10} {r['width']:6d} {r['parameters']:12,d} {r['forward_flops_per_atom']:11.4g} "
                f"{r['forward_flops_per_edge']:11.4g} {r['kappa']:8.2f} {r['step_flops_per_atom']:11.4g} "
                f"{r['step_over_forward']:8.2f}")
        if atoms is not None:
            line += f"  {r['compute_3knd_flops']:.4g}"
        typer.echo(line)
        if r["unsupported"]:
            typer.echo(f"  operators without a FLOP handle: {r['unsupported']}", err=True)


if __name__ == "__main__":
    app()
