"""Fault injection for the reliability tests: the faults of a long run, made to happen on purpose.

A test (or a person checking by hand) sets ``SYMSCALE_FAULT`` to one or more ``NAME:STEP[:RANK]``
items separated by commas; the job then misbehaves at that step on that rank (default rank 0)
exactly as the real fault would, through the real code path:

``kill-in-checkpoint``   SIGKILL while the checkpoint after STEP is being written (its engine
                         state on disk, its metadata not yet, not renamed)
``enospc-in-checkpoint`` the checkpoint after STEP fails with ``OSError(ENOSPC)`` ("No space
                         left on device") while its model file is written
``nan-loss``             the predictions of STEP are NaN (a non-finite loss)
``nan-gradient``         the loss of STEP is finite but its gradient is NaN
``exit``                 the process SIGKILLs itself at the start of STEP (a rank that dies)

Unset (the normal case) every hook is a dictionary lookup that returns at once.

``SYMSCALE_RECORD_IDS=DIR`` (:func:`record_ids`) makes every rank append the structure ids of each step
it trained on to ``DIR/ids-rank<R>.jsonl``: the elastic-resume tests check with it that each
structure is trained on once over a run resumed on other world sizes.

>>> import os
>>> os.environ[FAULT_ENV] = "nan-loss:3,exit:5:1"
>>> armed("nan-loss", 3, rank=0), armed("nan-loss", 4, rank=0), armed("exit", 5, rank=0), armed("exit", 5, rank=1)
(True, False, False, True)
>>> del os.environ[FAULT_ENV]
"""

from __future__ import annotations

import errno
import json
import os
import signal

import torch

#: environment variable holding the faults to inject (see the module docstring)
FAULT_ENV = "SYMSCALE_FAULT"
#: environment variable naming a folder for the structure ids of every trained step (see the module docstring)
IDS_ENV = "SYMSCALE_RECORD_IDS"
NAMES = ("kill-in-checkpoint", "enospc-in-checkpoint", "nan-loss", "nan-gradient", "exit")


def _parse(text: str) -> set[tuple[str, int, int]]:
    faults = set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, rest = item.partition(":")
        step, _, rank = rest.partition(":")
        if name not in NAMES or not step.isdigit() or (rank and not rank.isdigit()):
            raise ValueError(f"{FAULT_ENV}={text!r}: expected NAME:STEP[:RANK] items with NAME in {NAMES}")
        faults.add((name, int(step), int(rank or 0)))
    return faults


def armed(name: str, step: int, rank: int) -> bool:
    """Whether fault ``name`` is to happen at ``step`` on ``rank``."""
    text = os.environ.get(FAULT_ENV)
    return bool(text) and (name, int(step), int(rank)) in _parse(text)


def maybe_kill(name: str, step: int, rank: int) -> None:
    """SIGKILL this process if ``name`` is armed (no handler, no cleanup: as ``kill -9``)."""
    if armed(name, step, rank):
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_disk_full(step: int, rank: int, path) -> None:
    """Raise ``OSError(ENOSPC)`` for ``path`` if ``enospc-in-checkpoint`` is armed."""
    if armed("enospc-in-checkpoint", step, rank):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def maybe_poison(prediction: dict, step: int, rank: int) -> dict:
    """``prediction`` with NaN values (``nan-loss``) or with a NaN gradient behind finite values
    (``nan-gradient``) when armed; else unchanged."""
    if armed("nan-loss", step, rank):
        return {key: value * float("nan") for key, value in prediction.items()}
    if armed("nan-gradient", step, rank):
        return {key: _NaNGradient.apply(value) for key, value in prediction.items()}
    return prediction


class _NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward."""

    @staticmethod
    def forward(ctx, value):
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


def record_ids(step: int, rank: int, ids: list) -> None:
    """Append ``{"step", "rank", "ids"}`` to ``$SYMSCALE_RECORD_IDS/ids-rank<R>.jsonl`` when set."""
    folder = os.environ.get(IDS_ENV)
    if folder:
        with open(os.path.join(folder, f"ids-rank{rank:05d}.jsonl"), "a") as handle:
            handle.write(json.dumps({"step": int(step), "rank": int(rank), "ids": [str(i) for i in ids]}) + "\n")
