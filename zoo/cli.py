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


def _register_study() -> None:
    from zoo.study.cli import study_command

    app.command("study")(study_command)


_register_study()


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
    structures: int = typer.Option(8, "--structures", help="reference batch: the first N structures of the "
                                   "validation sample (memory grows with it; compare κ at equal N)"),
) -> None:
    """Parameters, forward FLOPs per atom and per edge, κ and step FLOPs of MODEL at WIDTH.

    Counted with fvcore on a reference batch (zoo.flops.report), no training; FMA = 2 FLOPs.
    The model is traced on the meta device (shapes only: seconds at any width, the same count)
    unless its forward needs tensor values (then a full trace). The full trace holds one
    forward's activations: see the README for the memory of large widths.
    """
    import json

    from zoo.flops.report import model_report
    from zoo.flops.trace import compute_3knd
    from zoo.registry import get_spec

    from zoo.registry import MODELS

    if model not in MODELS:
        raise typer.BadParameter(f"unknown model {model!r}; known: {', '.join(sorted(MODELS))}", param_hint="--model")
    for value, flag in [(w, "--width") for w in width or []] + [(structures, "--structures")]:
        if value < 1:
            raise typer.BadParameter(f"{value}: must be >= 1", param_hint=flag)
    widths = width or [get_spec(model).default_width]
    rows = [model_report(model, w, direct_forces=not conservative, structures=structures) for w in widths]
    for row in rows:
        if atoms is not None:
            n = row["parameters"] if params is None else params
            row["compute_3knd_flops"] = compute_3knd(row["kappa"], n, atoms)
    if json_out:
        typer.echo(json.dumps(rows, indent=1))
        return
    typer.echo(f"reference batch: {rows[0]['reference']} ({rows[0]['structures']} structures, "
               f"{rows[0]['atoms']} atoms); FMA = 2 FLOPs; trace: {', '.join(sorted({r['trace'] for r in rows}))}")
    typer.echo(f"paper κ = {rows[0]['paper_kappa']} (arXiv 2510.09768 Table 1: its own lmax, depth and graphs; "
               f"κ grows with lmax, layers and edges per atom, so this model's κ below differs)")
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


@app.command("plan")
def plan_command(
    model: str = typer.Option(..., "--model", help="architecture"),
    width: int = typer.Option(..., "--width", help="model width"),
    gpus: int = typer.Option(..., "--gpus", help="ranks (world size)"),
    gpu_memory: str = typer.Option("80GB", "--gpu-memory", help="memory per rank, e.g. 80GB, 141GB, 24GiB"),
    atoms_per_batch: int = typer.Option(128, "--atoms-per-batch", help="atoms per rank and step"),
    conservative: bool = typer.Option(False, "--conservative", help="forces as -dE/dx (double backward)"),
    precision: str = typer.Option("bf16", "--precision", help="bf16 or fp32"),
    json_out: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Per-rank memory of every engine configuration (weights, gradients, optimizer state,
    measured activations, buffers), what fits, and the recommended configuration."""
    import json

    from zoo.plan import make_plan, parse_memory, render

    if precision not in ("bf16", "fp32"):
        raise typer.BadParameter("--precision must be bf16 or fp32")
    result = make_plan(model, width, gpus, parse_memory(gpu_memory), atoms_per_batch, conservative, precision)
    if json_out:
        best = result["recommended"]
        result = {**result, "plans": [p.to_json() for p in result["plans"]],
                  "recommended": None if best is None else best.to_json()}
        typer.echo(json.dumps(result, indent=1))
        return
    typer.echo(render(result))


if __name__ == "__main__":
    app()
