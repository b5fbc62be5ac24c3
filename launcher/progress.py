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
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


class RunLog:
    """Metrics file and terminal progress of rank 0 (a no-op on other ranks)."""

    def __init__(self, run_dir: Path, total_steps: int, first_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.console = Console(highlight=False, soft_wrap=True)
        # kept open for the whole run (appended line by line), closed in close()
        self.file = open(Path(run_dir) / "metrics.jsonl", "a") if enabled else None  # noqa: SIM115
        self.progress = None
        if enabled:
            self.progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
                disable=not self.console.is_terminal,
            )
            self.task = self.progress.add_task("train", total=total_steps, completed=first_step, status="")
            self.progress.start()
        self.total = total_steps
        self.every = max(1, total_steps // 20)  # without a terminal: a line every ~5 % of the run
        self.last_line = first_step

    def record(self, kind: str, **fields) -> None:
        """Append one JSON line ``{"kind": kind, "time": unix time, **fields}``."""
        if not self.enabled:
            return
        line = {"kind": kind, "time": time.time(), **_clean(fields)}
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

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()
            self.file.close()
