"""User errors: a mistake in what was asked for (a flag, a path, the data) ends the job with one line.

A :class:`UserError` raised anywhere in a training job is reported by :func:`run` as one line
``error: <message>`` on standard error, printed by rank 0 only (every rank exits), with exit
status :data:`EXIT_USER_ERROR` and no traceback. ``--debug`` on the command line (or
``SYMSCALE_DEBUG=1``) re-raises it with its traceback. Anything else is a bug or a fault, and
keeps Python's traceback.

>>> import io, contextlib
>>> def main(argv):
...     raise UserError("--width 0: must be >= 1")
>>> err = io.StringIO()
>>> with contextlib.redirect_stderr(err):
...     status = run(main, [])
>>> status, err.getvalue()
(2, 'error: --width 0: must be >= 1\\n')
"""

from __future__ import annotations

import os
import sys

#: exit status of a job ended by a user error (argparse's own, so flags and data errors agree)
EXIT_USER_ERROR = 2


class UserError(ValueError):
    """A flag, path or data set that cannot be used; the message names it and says what to do."""


def is_rank0() -> bool:
    """Whether this process is rank 0 of its job (true before torch.distributed starts: RANK is unset)."""
    return os.environ.get("RANK", "0") == "0"


def debug_requested(argv: list[str] | None) -> bool:
    """``--debug`` among the arguments, or ``SYMSCALE_DEBUG`` set to a non-empty value other than 0."""
    args = sys.argv[1:] if argv is None else argv
    return "--debug" in args or os.environ.get("SYMSCALE_DEBUG", "0") not in ("", "0")


def run(main, argv: list[str] | None = None) -> int:
    """Call ``main(argv)``; a :class:`UserError` becomes one line on rank 0 and :data:`EXIT_USER_ERROR`.

    Returns 0 when ``main`` returns, after closing torch.distributed's process group if the job
    started one: left open, its communication threads were still running when the interpreter tore
    down, and now and then a rank ended in ``terminate called without an active exception``
    (SIGABRT, exit status −6) after a finished job. With ``--debug`` the error propagates with its
    traceback.
    """
    try:
        main(argv)
    except UserError as error:
        if debug_requested(argv):
            raise
        if is_rank0():
            print(f"error: {error}", file=sys.stderr, flush=True)
        _leave_process_group()
        return EXIT_USER_ERROR
    _close_process_group()
    return 0


def _started_process_group():
    """``torch.distributed`` if the job started a process group (without importing torch), else None."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def _close_process_group() -> None:
    """Destroy torch.distributed's process groups, if any were started (every rank has finished)."""
    dist = _started_process_group()
    if dist is not None:
        dist.destroy_process_group()


def _leave_process_group() -> None:
    """Leave torch.distributed's process group if the job started one (every rank raised the error).

    The ranks first meet at a barrier (10 s at most), so that no rank exits — and makes the
    launcher kill the others — before rank 0 has printed the error.
    """
    dist = _started_process_group()
    if dist is not None:
        from datetime import timedelta

        try:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=timedelta(seconds=10))
            else:
                dist.barrier()
        except Exception:  # noqa: BLE001 - a rank that did not raise: nothing more to wait for
            pass
    _close_process_group()
