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

if __name__ == "__main__":
    app()
