"""Faults during training that every rank must meet with the same decision.

A rank that raises alone leaves the others waiting in their next collective (a hang until the
process group times out), and a rank that skips a step alone desynchronises the collectives of
every later step. So each fault below is turned into a flag that is all-reduced, and every rank
acts on the global value:

- **unreadable data** (:class:`datapipe.shards.ShardError` from this rank's loader): by default
  every rank stops with :class:`RunStopped`, naming the rank, the shard and the checkpoint to
  resume from (:func:`agree_on_batch`). With ``--skip-bad-shards`` the loader skips what it cannot
  read (:class:`datapipe.loader.StreamingLoader`, ``skip_bad_shards``); the skipped structures are
  counted and recorded, never counted in D; if one rank's whole batch was unreadable, every rank
  skips that step.
- **a non-finite loss**: the loss all-reduce carries the count of non-finite structures
  (:func:`launcher.loss.global_loss`); when it is not 0 every rank skips backward and step.
- **a non-finite gradient** behind a finite loss: :class:`GradientWatch` flags this rank's local
  gradients during backward; one all-reduce makes it global, and every rank discards the step's
  gradients (:func:`discard_gradients`).

Each skipped step is counted in the run's counters, logged with the ids of the structures of its
global batch (:func:`skip_record`), and recorded in the checkpoint metadata (``skipped``); after
``--max-consecutive-skips`` skipped steps in a row the run stops (:func:`check_consecutive`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from datapipe.shards import ShardError
from launcher import checkpoint as ckpt
from launcher.engine import RankLost, all_gather_objects, all_reduce_sum, lost_ranks, report_stop
from launcher.errors import UserError

#: structure ids kept per skip record (the counts are always exact)
MAX_IDS_PER_RECORD = 64
#: skip records kept in a checkpoint's metadata (the counts are always exact)
MAX_RECORDS = 1000


class RunStopped(RuntimeError):
    """A fault that stops the run on every rank; the message says what happened and what to do."""


@dataclass
class DataFault:
    """Stands in for the batch of a rank whose loader failed (the error's message)."""

    message: str


def batches(loader):
    """Iterate ``loader``; a :class:`ShardError` becomes one :class:`DataFault` item and ends the stream,
    so that this rank still joins the step's agreement (:func:`agree_on_batch`) instead of raising alone."""
    try:
        yield from loader
    except ShardError as error:
        yield DataFault(str(error))


def resume_hint(run_dir: Path) -> str:
    """Where to continue from: the last complete checkpoint of ``run_dir`` and the command.

    A run that stops before its first checkpoint is told to start again (the error that stopped it
    stays the message; ``--resume`` has nothing to continue from):

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as run_dir:
    ...     resume_hint(Path(run_dir)).startswith("no checkpoint of")
    True
    """
    try:
        checkpoint = ckpt.find(run_dir)
    except (FileNotFoundError, UserError):  # find's UserError names --resume: not what stopped this run
        return f"no checkpoint of {run_dir} is complete yet: start the run again"
    return f"its last complete checkpoint is {checkpoint}: continue with `--resume {run_dir}`"


def agree_on_batch(batch, rank: int, device: torch.device, step: int, run_dir: Path) -> bool:
    """Collective: whether every rank holds a batch to train on at ``step``.

    ``batch`` is this rank's batch, ``None`` (skip mode: every structure of it was unreadable) or a
    :class:`DataFault`. Returns False when some rank has no batch (every rank then skips the step).

    Raises
    ------
    RunStopped
        on every rank, naming each failing rank and its error, if any rank's data failed.
    """
    fault, empty = all_reduce_sum([float(isinstance(batch, DataFault)), float(batch is None)], device)
    if fault:
        messages = all_gather_objects(f"rank {rank}: {batch.message}" if isinstance(batch, DataFault) else None)
        raise RunStopped(f"training data failed at step {step}: " + "; ".join(m for m in messages if m) +
                         f". The run stopped on every rank; {resume_hint(run_dir)} once the shard is restored "
                         "(reconvert it: python -m datapipe.convert), or add --skip-bad-shards (to the resume as well) to "
                         "skip, count and record the structures that cannot be read")
    return not empty


class GradientWatch:
    """Flags non-finite local gradients of ``module``'s parameters as backward computes them.

    A tensor hook per parameter ORs ``~isfinite(grad).all()`` into one flag (no host sync during
    backward); :meth:`global_count` all-reduces it once per step. Local gradients are those
    before the engine's reduction: a reduced gradient is non-finite exactly when some rank's is.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self._flag = None
        self._handles = [p.register_hook(self._check) for p in module.parameters() if p.requires_grad]

    def _check(self, grad: torch.Tensor) -> None:
        bad = ~torch.isfinite(grad).all()
        self._flag = bad if self._flag is None else self._flag | bad

    def global_count(self, device: torch.device) -> int:
        """Collective: ranks whose gradients of the last backward were not finite (resets the flag)."""
        local = 0.0 if self._flag is None else float(self._flag)
        self._flag = None
        return round(all_reduce_sum([local], device)[0])

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def discard_gradients(engine) -> None:
    """Collective: throw away the gradients of a step every rank skips, without an update.

    DeepSpeed's ZeRO and bf16 optimizers discard non-finite gradients themselves in ``step()``
    (their overflow path, agreed over ranks; bf16 needs ``bf16.check_grad_overflow``, which
    :func:`launcher.config.deepspeed_config` sets) and report it through ``was_step_applied()``;
    a plain optimizer's gradients are in ``param.grad`` and are cleared.

    Raises
    ------
    RunStopped
        if the engine applied the update anyway (its weights are then not finite).
    """
    if hasattr(engine.optimizer, "overflow"):
        engine.step()
        if engine.was_step_applied():
            raise RunStopped("the engine applied an update with non-finite gradients (the weights are no longer "
                             "finite); this engine configuration cannot skip a step: resume from the last "
                             "checkpoint with ZeRO stage 1 or 2")
    else:
        engine.optimizer.zero_grad(set_to_none=True)


def skip_record(step: int, reason: str, ids: list[str], structures: int, atoms: int,
                flagged: list[str] | None = None) -> dict:
    """Collective: the record of a skipped step: the structure ids of all ranks' batches
    (``structure_ids``, the first :data:`MAX_IDS_PER_RECORD`) and those found non-finite
    (``flagged_ids``)."""
    every, bad = [], []
    for part_ids, part_bad in all_gather_objects((list(ids), list(flagged or []))):
        every.extend(part_ids)
        bad.extend(part_bad)
    return {"step": step, "reason": reason, "structures": structures, "atoms": atoms,
            "structure_ids": every[:MAX_IDS_PER_RECORD], "ids_truncated": len(every) > MAX_IDS_PER_RECORD,
            "flagged_ids": bad[:MAX_IDS_PER_RECORD]}


def check_consecutive(consecutive: int, limit: int, last: dict, run_dir: Path) -> None:
    """Stop the run (every rank alike) after ``limit`` skipped steps in a row.

    Raises
    ------
    RunStopped
        naming the last skip's reason and structures and the checkpoint to resume from.
    """
    if limit and consecutive >= limit:
        raise RunStopped(f"{consecutive} consecutive steps skipped (limit --max-consecutive-skips {limit}); the last, "
                         f"step {last['step']}: {last['reason']} (structures {last['structure_ids'][:8]}). The model "
                         f"or the data has gone bad: lower the learning rate or inspect those structures; "
                         f"{resume_hint(run_dir)}")


#: words of the errors torch.distributed raises when a peer is gone or a collective timed out
_COLLECTIVE_WORDS = ("gloo", "nccl", "connection closed", "connection reset", "timed out", "timeout", "broken pipe")


def is_collective_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed because a peer died, hung or was unreachable."""
    dist_error = getattr(torch.distributed, "DistError", ())
    text = str(error).lower()
    return isinstance(error, dist_error) or (isinstance(error, RuntimeError) and any(w in text for w in _COLLECTIVE_WORDS))


@contextmanager
def stop_together(rank: int, world: int, step, run_dir: Path):
    """Around the training loop: a rank that stops leaves its reason in the rendezvous store, and a
    collective that fails because another rank is gone becomes :class:`launcher.engine.RankLost`
    naming that rank (from the store) and what to do. ``step()`` gives the current step.

    Raises
    ------
    RankLost
        on the surviving ranks, within ``--dist-timeout`` of the failure at most (at once when the
        dead rank's connections close).
    """
    try:
        yield
    except RunStopped as error:
        report_stop(rank, f"stopped at step {step()}: {error}")
        raise
    except Exception as error:
        if not is_collective_failure(error):
            report_stop(rank, f"failed at step {step()}: {type(error).__name__}: {error}")
            raise
        report_stop(rank, "collective failed")
        raise RankLost(f"rank {rank}: a collective failed at step {step()} ({type(error).__name__}: "
                       f"{str(error).strip()[:300]}); {lost_ranks(rank, world)}. This rank stops too; "
                       f"{resume_hint(run_dir)} with every rank running (same number of ranks)") from error
