"""``zoo study``: the mini scaling study in one resumable command (data → runs → fits → report).

Steps: convert the data once (:func:`zoo.study.plan.prepare_data`) → the grid of runs, resumable
(:func:`zoo.study.runner.run_grid`) → ``runs.csv`` (:mod:`zoo.study.collect`) → fits and
``report.md`` (:mod:`zoo.study.report`). Output folder ``OUT``::

    OUT/study.json      preset, widths, data ladder (a second study in OUT must be the same preset)
    OUT/runs.txt        one run name per line (the SLURM array's index → run; docker/slurm_study.sh)
    OUT/data/           train shards, the fixed validation set
    OUT/runs/<run>/     each run's launcher directory (config, metrics.jsonl, checkpoints/)
    OUT/logs/<run>.log  each run's output
    OUT/runs.csv        one row per checkpoint; OUT/fit/ the `zoo fit` output; OUT/report.md
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer


def study_command(
    preset: str = typer.Option(..., "--preset", help="quick | cpu | paper (zoo/study/presets.py)"),
    out: Optional[Path] = typer.Option(None, "--out", help="study folder (default: runs/study-<preset>)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the runs, FLOPs and time estimate; train nothing"),
    only: Optional[str] = typer.Option(None, "--only", help="run just this run (e.g. esen-w8; for SLURM arrays), no fit"),
    parallel: Optional[int] = typer.Option(None, "--parallel", help="runs side by side (default: the preset's)"),
    prepare_only: bool = typer.Option(False, "--prepare-only", help="convert the data and write runs.txt, then stop"),
    calibrate: Optional[Path] = typer.Option(None, "--calibrate", help="with --dry-run: CPU speeds fitted to this finished study"),
    n_bootstrap: int = typer.Option(1000, "--bootstrap", help="bootstrap refits for the intervals"),
) -> None:
    """Train the grid (architectures × widths, single epoch, checkpoints = data ladder), then fit and report.

    Finished runs are skipped, interrupted ones resumed: rerun the same command after a crash or Ctrl-C.
    """
    from rich.console import Console

    from zoo.study.plan import REPO, data_ladder, prepare_data, runs_of
    from zoo.study.presets import get_preset

    console = Console(highlight=False)
    try:
        spec = get_preset(preset)
    except KeyError as err:
        console.print(f"[red]error:[/] {err.args[0]}")
        raise typer.Exit(2) from err
    out = (out or REPO / "runs" / f"study-{preset}").resolve()
    runs = runs_of(spec, out)
    if only is not None:
        runs = [r for r in runs if r.name == only]
        if not runs:
            console.print(f"[red]error:[/] no run {only!r} in preset {preset} (see {out / 'runs.txt'})")
            raise typer.Exit(2)
    _check_same_study(out, spec, console)
    if dry_run:
        _dry_run(spec, out, runs, calibrate, console)
        return
    started = time.time()
    train_dir, val_dir = prepare_data(spec, out)
    ladder = data_ladder(spec, train_dir)
    _write(out / "study.json", json.dumps({"preset": asdict(spec), "runs": [r.name for r in runs_of(spec, out)],
                                          "ladder": ladder}, indent=1, default=str) + "\n")
    _write(out / "runs.txt", "".join(r.name + "\n" for r in runs_of(spec, out)))
    if prepare_only:
        console.print(f"data ready in {out / 'data'}; {len(runs_of(spec, out))} runs listed in {out / 'runs.txt'}")
        return
    slots = _train(spec, runs, train_dir, val_dir, ladder, parallel, console)
    failed = [s.run.name for s in slots if s.state != "done"]
    if failed:
        console.print(f"[red]{len(failed)} run(s) did not finish: {', '.join(failed)}[/]; their logs are in "
                      f"{out / 'logs'}; rerun the same command to resume them")
        raise typer.Exit(1)
    if only is not None:
        return
    _fit_and_report(spec, out, ladder, train_dir, val_dir, n_bootstrap, time.time() - started, console)


def _write(path: Path, text: str) -> None:
    """Write atomically (array tasks of one study write the same files at once)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _check_same_study(out: Path, spec, console) -> None:
    saved = out / "study.json"
    if saved.is_file():
        name = json.loads(saved.read_text())["preset"]["name"]
        if name != spec.name:
            console.print(f"[red]error:[/] {out} holds a study of preset {name!r}, not {spec.name!r}; use another --out")
            raise typer.Exit(2)


def _dry_run(spec, out: Path, runs, calibrate: Path | None, console) -> None:
    from zoo.study.estimate import calibrate as fit_speed
    from zoo.study.estimate import dry_run_text, run_costs
    from zoo.study.plan import data_ladder, train_command

    train_dir = out / "data" / "train"
    ladder = data_ladder(spec, train_dir if (train_dir / "index.json").is_file() else None)
    speed = fit_speed(calibrate) if calibrate else None
    console.print(dry_run_text(spec, run_costs(spec, runs, ladder["atoms"][-1]), ladder, speed), soft_wrap=True)
    console.print("\ncommand of the first run: " + " ".join(train_command(spec, runs[0], train_dir, out / "data" / "val",
                                                                          resume=False)), soft_wrap=True)


def _train(spec, runs, train_dir, val_dir, ladder, parallel, console):
    from zoo.study.estimate import cpu_seconds, run_costs
    from zoo.study.plan import train_command
    from zoo.study.runner import run_grid

    # longest first by the dry run's time estimate (the makespan it prints assumes this order): FLOPs
    # alone put GemNet-OC, whose step is dominated by per-atom overhead, last and left a long tail
    seconds = {c["run"]: cpu_seconds(c, ladder["atoms"][-1]) for c in run_costs(spec, runs, ladder["atoms"][-1])}

    def cost(run):
        return seconds[run.name]

    try:
        return run_grid(runs, lambda run, resume: train_command(spec, run, train_dir, val_dir, resume),
                        parallel or spec.parallel, ladder["atoms"][-1], console, cost=cost)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _fit_and_report(spec, out: Path, ladder, train_dir, val_dir, n_bootstrap, wall_s, console) -> None:
    from datapipe.index import ShardIndex
    from zoo.study.collect import collect, write_csv
    from zoo.study.report import fit_command_line, fit_runs, write_report

    rows = collect([r.run_dir for r in runs_of_all(spec, out)], out)
    csv_path = write_csv(rows, out / "runs.csv")
    console.print(f"{len(rows)} checkpoints → {csv_path}; fitting ({n_bootstrap} bootstrap refits)…")
    fit = fit_runs(csv_path, out / "fit", n_bootstrap)
    train, val = ShardIndex.load(train_dir), ShardIndex.load(val_dir)
    data = {"train": str(spec.train), "train_structures": train.n_structures, "train_atoms": train.n_atoms,
            "train_hash": train.data_hash, "force_rms": train.force_rms, "val_structures": val.n_structures,
            "val_atoms": val.n_atoms, "val_hash": val.data_hash}
    path = write_report(out, spec, rows, fit, ladder, data, n_bootstrap, wall_s)
    console.print(f"report: {path}\nrecompute the fits: cd {out} && {fit_command_line('runs.csv', 'fit', n_bootstrap)}")


def runs_of_all(spec, out: Path):
    """All runs of the study (``--only`` narrows what is trained, never what is reported)."""
    from zoo.study.plan import runs_of

    return runs_of(spec, out)
