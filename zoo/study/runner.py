"""Running the study's grid: skip finished runs, resume interrupted ones, show a live table.

Each run is a subprocess of ``launcher/train.py`` (one process, or ``torchrun`` with the preset's
ranks), its output appended to ``OUT/logs/<run>.log``. At most ``parallel`` runs go at once
(longest first, by the planned step FLOPs). A run's state comes from its directory alone:

- **done** — its latest complete checkpoint is the last step (``metadata.json``: step = steps_total);
- **resume** — it has a complete checkpoint before the end: restarted with ``--resume RUN_DIR``;
- **waiting** — nothing usable yet: a stale directory (no complete checkpoint) is removed and the
  run starts afresh.

Ctrl-C (SIGINT) or SIGTERM stops the study: every running run's process group gets SIGTERM
(then SIGKILL after 30 s); the next ``zoo study`` with the same ``--out`` resumes them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from zoo.study.plan import REPO, RunSpec


def checkpoint_status(run_dir: Path) -> dict:
    """``{"state": "done"|"resume"|"waiting", "step", "steps"}`` of a run directory (see module doc)."""
    folder = Path(run_dir) / "checkpoints"
    done = sorted(d for d in folder.glob("step-*") if d.is_dir() and not d.name.endswith(".partial")
                  and (d / "metadata.json").is_file()) if folder.is_dir() else []
    if not done:
        return {"state": "waiting", "step": 0, "steps": None}
    meta = json.loads((done[-1] / "metadata.json").read_text())
    step, steps = int(meta["step"]), int(meta["steps_total"])
    return {"state": "done" if step >= steps else "resume", "step": step, "steps": steps}


def live_metrics(run_dir: Path) -> dict:
    """The run's progress from ``metrics.jsonl``: step, steps, loss (training, normalised units),
    atoms/s, atoms seen and the last validation loss; ``{}`` before its first record."""
    path = Path(run_dir) / "metrics.jsonl"
    out: dict = {}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written
        kind = rec.get("kind")
        if kind in ("start", "resume"):
            out["steps"] = rec.get("steps")
            out["step"] = rec.get("step", 0)
        elif kind == "train":
            out.update(step=rec["step"], loss=rec.get("mean_loss"), atoms_per_s=rec.get("atoms_per_s"),
                       atoms_seen=rec.get("atoms_seen"))
        elif kind == "val":
            out["val_loss"] = rec.get("loss")
    return out


@dataclass
class Slot:
    """A run and, while it runs, its process."""

    run: RunSpec
    state: str = "waiting"  # waiting | running | done | failed
    process: subprocess.Popen | None = None
    started: float | None = None
    returncode: int | None = None
    resumed: bool = False
    info: dict = field(default_factory=dict)


def _render(slots: list[Slot], total_atoms: int, started: float):
    from rich.table import Table

    counts = {s: sum(x.state == s for x in slots) for s in ("done", "running", "waiting", "failed")}
    table = Table(title=f"zoo study: {counts['done']} done, {counts['running']} running, {counts['waiting']} waiting"
                        + (f", {counts['failed']} failed" if counts["failed"] else "")
                        + f"  ({time.time() - started:,.0f} s)")
    for col in ("run", "state", "step", "train loss", "val loss", "atoms/s", "time left"):
        table.add_column(col, justify="left" if col in ("run", "state") else "right")
    colour = {"done": "green", "running": "cyan", "waiting": "white", "failed": "red"}
    for s in slots:
        m = s.info
        step = f"{m['step']}/{m['steps']}" if m.get("steps") else "—"
        left = "—"
        if s.state == "running" and m.get("atoms_per_s") and m.get("atoms_seen") is not None:
            left = f"{max(0.0, total_atoms - m['atoms_seen']) / m['atoms_per_s']:,.0f} s"
        elif s.state == "done":
            left = "0 s"
        state = s.state + (" (resumed)" if s.resumed else "")
        table.add_row(s.run.name, f"[{colour[s.state]}]{state}[/]", step,
                      f"{m['loss']:.4f}" if m.get("loss") is not None else "—",
                      f"{m['val_loss']:.4f}" if m.get("val_loss") is not None else "—",
                      f"{m['atoms_per_s']:,.0f}" if m.get("atoms_per_s") else "—", left)
    return table


def _status_line(slots: list[Slot], started: float) -> str:
    """``[time] done/running/waiting`` and each running run's step, loss and atoms/s, on one line."""
    counts = {s: sum(x.state == s for x in slots) for s in ("done", "running", "waiting", "failed")}
    running = [f"{s.run.name} {s.info.get('step', 0)}/{s.info.get('steps', '?')} loss "
               f"{s.info.get('loss') or float('nan'):.3f} {s.info.get('atoms_per_s') or 0:,.0f} atoms/s"
               for s in slots if s.state == "running"]
    return (f"[{time.time() - started:,.0f} s] {counts['done']} done, {counts['running']} running, "
            f"{counts['waiting']} waiting, {counts['failed']} failed; " + "; ".join(running))


def _interrupt(signum, frame) -> None:
    """SIGTERM handler: stop the study as Ctrl-C does."""
    raise KeyboardInterrupt


def _stop(slots: list[Slot]) -> None:
    """SIGTERM every running run's process group; SIGKILL what is left after 30 s."""
    running = [s for s in slots if s.process is not None and s.process.poll() is None]
    for s in running:
        try:
            os.killpg(s.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + 30
    for s in running:
        try:
            s.process.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(s.process.pid, signal.SIGKILL)
            s.process.wait()


def run_grid(runs: list[RunSpec], command, parallel: int, total_atoms: int, console, cost=None,
             env: dict | None = None, poll_s: float = 1.0) -> list[Slot]:
    """Run every unfinished run, at most ``parallel`` at once; returns the slots (state per run).

    Parameters
    ----------
    runs : the study's runs.
    command : ``command(run, resume: bool) -> list[str]``, the run's command line.
    parallel : runs side by side.
    total_atoms : D_max of every run (for the time-left column).
    console : a ``rich.console.Console``.
    cost : ``cost(run) -> float``; waiting runs start largest first (default: list order).
    env : extra environment variables for the runs (``OMP_NUM_THREADS`` defaults to 1).
    """
    from rich.live import Live

    slots = [Slot(run) for run in runs]
    for s in slots:
        status = checkpoint_status(s.run.run_dir)
        if status["state"] == "done":
            s.state, s.info = "done", live_metrics(s.run.run_dir)
    queue = [s for s in slots if s.state == "waiting"]
    if cost is not None:
        queue.sort(key=lambda s: -cost(s.run))
    child_env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1",
                 **(env or {})}
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), child_env.get("PYTHONPATH")]))
    started = time.time()
    previous = signal.signal(signal.SIGTERM, _interrupt)
    live = Live(_render(slots, total_atoms, started), console=console, refresh_per_second=2) \
        if console.is_terminal else contextlib.nullcontext()
    last_line = started
    try:
        with live:
            while queue or any(s.state == "running" for s in slots):
                while queue and sum(s.state == "running" for s in slots) < parallel:
                    _launch(queue.pop(0), command, child_env, console)
                for s in slots:
                    if s.state == "running":
                        s.info = live_metrics(s.run.run_dir)
                        if s.process.poll() is not None:
                            _finished(s, console)
                if console.is_terminal:
                    live.update(_render(slots, total_atoms, started))
                elif time.time() - last_line >= 60:  # a log file: one status line a minute
                    last_line = time.time()
                    console.print(_status_line(slots, started), soft_wrap=True)
                time.sleep(poll_s)
        if not console.is_terminal:  # a log file: the final table once
            console.print(_render(slots, total_atoms, started))
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: stopping the running runs (rerun the same command to resume them)[/]")
        _stop(slots)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return slots


def _launch(slot: Slot, command, env: dict, console) -> None:
    run = slot.run
    status = checkpoint_status(run.run_dir)
    slot.resumed = status["state"] == "resume"
    if not slot.resumed and run.run_dir.exists():
        shutil.rmtree(run.run_dir)  # no complete checkpoint: a stale start, begin afresh
    run.log.parent.mkdir(parents=True, exist_ok=True)
    argv = command(run, slot.resumed)
    with open(run.log, "a") as log:
        log.write(f"\n### {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n")
        log.flush()
        slot.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                        start_new_session=True)
    slot.state, slot.started = "running", time.time()
    if not console.is_terminal:
        console.print(f"{'resume' if slot.resumed else 'start'} {run.name} (from step {status['step']})")


def _finished(slot: Slot, console) -> None:
    slot.returncode = slot.process.returncode
    slot.info = live_metrics(slot.run.run_dir)
    done = checkpoint_status(slot.run.run_dir)["state"] == "done"
    slot.state = "done" if slot.returncode == 0 and done else "failed"
    if slot.state == "failed" or not console.is_terminal:
        console.print(f"{slot.run.name}: {slot.state} (exit {slot.returncode}, {time.time() - slot.started:,.0f} s)"
                      + (f"; see {slot.run.log}" if slot.state == "failed" else ""))
