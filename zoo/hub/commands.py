"""``zoo list``, ``zoo download`` and ``zoo publish``: the hub's command line (registered by :mod:`zoo.cli`).

Registries: the releases shipped in the package, ``SYMSCALE_REGISTRY`` (files/URLs separated by
``os.pathsep``) and any ``--registry FILE|URL`` (repeatable). Cache: ``SYMSCALE_CACHE`` or
``~/.cache/symscale/models``. Offline: ``HF_HUB_OFFLINE=1`` or ``SYMSCALE_OFFLINE=1``.
"""

from __future__ import annotations

from pathlib import Path

import typer

REGISTRY_HELP = "extra release manifest (file, release folder or http(s) URL), repeatable"


def _fail(err: Exception) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(1)


def list_command(
    registry: list[str] = typer.Option(None, "--registry", help=REGISTRY_HELP),
) -> None:
    """Every model of every registry: name, architecture, width, N, D, C, validation force MAE, cached."""
    from rich.console import Console
    from rich.table import Table

    from zoo.hub.fetch import cache_root, is_cached
    from zoo.hub.release import ManifestError, load_registry

    try:
        models = load_registry(registry)
    except (ManifestError, FileNotFoundError, ConnectionError) as err:
        _fail(err)
    table = Table(title=f"symscale models (cache: {cache_root()})")
    for column, justify in (("name", "left"), ("release", "left"), ("architecture", "left"), ("width", "right"),
                            ("N", "right"), ("D (atoms)", "right"), ("C (FLOPs)", "right"),
                            ("val force MAE (meV/Å)", "right"), ("cached", "center")):
        table.add_column(column, justify=justify)
    for name, e in sorted(models.items()):
        mae = e.validation.get("force_mae_mev_per_A")
        table.add_row(name, e.release, e.architecture, str(e.width), f"{e.N:,}", f"{e.D:,}",
                      "–" if e.C is None else f"{e.C:.3g}", "–" if mae is None else f"{mae:.1f}",
                      "yes" if is_cached(e) else "no")
    Console(width=160).print(table)


def download_command(
    names: list[str] = typer.Argument(None, help="model names (`zoo list`)"),
    all_models: bool = typer.Option(False, "--all", help="every model of every registry"),
    force: bool = typer.Option(False, "--force", help="fetch again even if the cached copy verifies"),
    registry: list[str] = typer.Option(None, "--registry", help=REGISTRY_HELP),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
) -> None:
    """Fetch models into the cache, each file checked against its manifest SHA-256 (resumes partial files)."""
    from zoo.hub.fetch import download
    from zoo.hub.release import ManifestError, load_registry

    try:
        models = load_registry(registry)
        wanted = sorted(models) if all_models else list(names or [])
        if not wanted:
            raise ValueError("name at least one model, or --all (`zoo list` shows them)")
        unknown = [n for n in wanted if n not in models]
        if unknown:
            raise KeyError(f"unknown model(s) {unknown}; known: {sorted(models)}")
        for name in wanted:
            path = download(models[name], force=force, quiet=quiet)
            typer.echo(f"{name}: {path} (verified)")
    except (ManifestError, FileNotFoundError, ConnectionError, KeyError, ValueError) as err:
        _fail(err)


def publish_command(
    run_dirs: list[Path] = typer.Argument(..., help="finished run directories (or checkpoint directories)"),
    out: Path = typer.Option(..., "--out", help="release folder to write (must not hold a manifest yet)"),
    release: str = typer.Option(None, "--release", help="release name (default: the --out folder's name)"),
    select: str = typer.Option("final", "--select", help="final | frontier | all"),
    description: str = typer.Option("", "--description", help="first paragraph of the model card"),
    split: str = typer.Option(None, "--split", help="name of the validation split the metrics are on"),
    plots: Path = typer.Option(None, "--plots", help="a `zoo fit` output folder whose PNG figures go into the card"),
    to_hub: str = typer.Option(None, "--to-hub", metavar="ORG/REPO",
                               help="also upload to the Hugging Face Hub (log in first: `huggingface-cli login` "
                                    "or set HF_TOKEN); writes manifest.hub.json pinned to the commit"),
) -> None:
    """Make a release (checkpoints, manifest.json, README.md model card) from finished runs."""
    from zoo.hub.checkpoint import CorruptCheckpointError
    from zoo.hub.publish import publish, push_to_hub
    from zoo.hub.release import ManifestError

    try:
        manifest = publish(run_dirs, out, release or out.name, select=select, description=description, split=split,
                           plots=plots)
    except (ManifestError, FileNotFoundError, FileExistsError, ValueError, CorruptCheckpointError) as err:
        _fail(err)
    typer.echo(f"wrote {manifest} and {manifest.parent / 'README.md'}")
    if to_hub:
        hub_manifest = push_to_hub(out, to_hub)
        typer.echo(f"uploaded to {to_hub}; register it with `zoo list --registry {hub_manifest}`")


def register(app: typer.Typer) -> None:
    """Add the hub's commands to the ``zoo`` app."""
    app.command("list")(list_command)
    app.command("download")(download_command)
    app.command("publish")(publish_command)
