"""What a person and a program see of a run: rich progress on rank 0, metrics as JSON lines.

``RUN_DIR/metrics.jsonl`` holds one JSON object per line with a ``"kind"``:

- ``"start"`` / ``"resume"`` — configuration summary (steps, parameters, learning rate, world size,
  the peak FLOP/s MFU is measured against and its source, code version, fitted scale factors);
- ``"train"`` — every ``log_every`` steps and at checkpoints: step, loss terms (global means,
  normalised units; ``mean_loss`` over the steps since the last record), ``atoms_per_s``,
  ``structures_per_s``, ``flops_per_s`` and ``mfu`` over the steps since the last record (time in
  training steps only), counters (samples_seen, atoms_seen, cumulative ``flops`` and ``pflops``),
  ``step_flops`` (the global FLOPs of each step since the last record, in order: over a run they
  sum to the cumulative count) and ``flops_since_last`` (their sum); see :mod:`launcher.throughput`;
- ``"val"`` — validation metrics (:mod:`launcher.validate`) at each checkpoint, on the fixed subset;
- ``"val_full"`` — at the final checkpoint: the same on the whole validation split (+ ``seconds``);
- ``"checkpoint"`` — the directory written;
- ``"end"`` — wall time, the final validation and the run's ``throughput`` summary.

Only rank 0 writes; other ranks get a logger that does nothing.

Every phase of a job that may take more than a few seconds (shard conversion, the architecture's
pre-training hook, building the engine, validation, the final full-split validation, checkpoint
writing) runs inside a :class:`Phase`: on a terminal a bar (or spinner) with its own elapsed and
remaining time, else a line when it starts, about every 10 % of it (at most one per 10 s) with the
time left estimated from its own rate so far, and one when it ends — on rank 0 only, once per job.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from zoo.hub.metadata import strict_json


def _clock(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _bar(console: Console) -> Progress:
    return Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TextColumn("left"),
                    TimeRemainingColumn(), console=console, transient=False,
                    disable=not console.is_terminal)


class Phase:
    """Progress of one long phase of a job (rank 0 only; a no-op where ``enabled`` is false).

    Use as a context manager; :meth:`advance` by units of ``total`` (``total=None``: a spinner,
    no time left). On a terminal it is a task of ``progress`` (the run's live bar, so the two do
    not fight) or of its own bar; otherwise plain lines (see the module docstring). On leaving, one
    line says how long it took; ``seconds`` holds that time.

    >>> with Phase("counting", total=4, unit="items", console=Console(file=__import__("io").StringIO())) as ph:
    ...     for _ in range(4):
    ...         ph.advance()
    >>> ph.done, ph.seconds >= 0
    (4.0, True)
    """

    def __init__(self, description: str, total: float | None = None, *, unit: str = "", enabled: bool = True,
                 console: Console | None = None, progress: Progress | None = None, detail: str = "") -> None:
        self.description, self.total, self.unit, self.enabled = description, total, unit, enabled
        self.detail = detail  # said once, when the phase starts
        self.console = console or Console(highlight=False, soft_wrap=True, stderr=False)
        self.progress, self.own = progress, False
        self.done, self.seconds, self.task = 0.0, 0.0, None
        self.started = self.next_line = self.last_line = 0.0

    def __enter__(self) -> Phase:
        self.started = self.last_line = time.time()
        if not self.enabled:
            return self
        if self.console.is_terminal:
            if self.detail:
                self.console.print(f"{self.description} {self.detail}")
            if self.progress is None:
                self.progress, self.own = _bar(self.console), True
                self.progress.start()
            self.task = self.progress.add_task(self.description, total=self.total, status="")
        else:
            size = f" ({self.total:,.0f} {self.unit})" if self.total else ""
            self.console.print(f"{self.description}{size}{' ' + self.detail if self.detail else ''} …")
            self.next_line = 0.1
        return self

    def advance(self, amount: float = 1.0) -> None:
        """Count ``amount`` more units done."""
        self.done += amount
        if not self.enabled:
            return
        if self.task is not None:
            self.progress.update(self.task, completed=self.done)
        elif (self.total and self.done / self.total >= self.next_line and self.done < self.total
              and time.time() - self.last_line >= 10):  # a line per ~10 % of the phase, at most one per 10 s
            self.last_line = time.time()
            elapsed = self.last_line - self.started
            left = elapsed * (self.total - self.done) / self.done
            self.console.print(f"  {self.description}: {self.done:,.0f}/{self.total:,.0f} {self.unit}, "
                               f"{_clock(elapsed)} elapsed, ≈{_clock(left)} left")
            self.next_line = self.done / self.total + 0.1

    def __exit__(self, kind, value, traceback) -> None:
        self.seconds = time.time() - self.started
        if not self.enabled:
            return
        if self.task is not None:
            self.progress.remove_task(self.task)
            if self.own:
                self.progress.stop()
        if kind is None:
            self.console.print(f"{self.description}: done in {self.seconds:.1f} s")


class RunLog:
    """Metrics file and terminal progress of rank 0 (a no-op on other ranks)."""

    def __init__(self, run_dir: Path, total_steps: int, first_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.console = Console(highlight=False, soft_wrap=True)
        # kept open for the whole run (appended line by line), closed in close()
        self.file = open(Path(run_dir) / "metrics.jsonl", "a") if enabled else None  # noqa: SIM115
        self.progress = None
        if enabled:
            self.progress = _bar(self.console)
            self.task = self.progress.add_task("train", total=total_steps, completed=first_step, status="")
            self.progress.start()
        self.total = total_steps
        self.every = max(1, total_steps // 20)  # without a terminal: a line every ~5 % of the run
        self.last_line = first_step

    def record(self, kind: str, **fields) -> None:
        """Append one JSON line ``{"kind": kind, "time": unix time, **fields}``."""
        if not self.enabled:
            return
        line = {"kind": kind, "time": time.time(), **strict_json(fields)}
        self.file.write(json.dumps(line) + "\n")
        self.file.flush()

    def step(self, step: int, status: str) -> None:
        """Advance the bar (a plain line every ~5 % of the run when stdout is not a terminal)."""
        if not self.enabled:
            return
        self.progress.update(self.task, completed=step, status=status)
        if not self.console.is_terminal and step - self.last_line >= self.every:
            self.console.print(f"step {step}/{self.total}: {status}")
            self.last_line = step

    def say(self, text: str) -> None:
        """A line on the terminal (above the progress bar), also when it is not a TTY."""
        if self.enabled:
            self.console.print(text)

    def phase(self, description: str, total: float | None = None, unit: str = "") -> Phase:
        """A :class:`Phase` shown beside the training bar (rank 0 only)."""
        return Phase(description, total, unit=unit, enabled=self.enabled, console=self.console,
                     progress=self.progress)

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()
            self.file.close()
