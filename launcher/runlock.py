"""One run per run directory: a lock that a second job on the same directory cannot take.

Two jobs writing the same ``RUN_DIR`` (a fresh start and a ``--resume``, or two resumes started
by a scheduler's retry while the first still runs) would interleave their checkpoints and metric
lines and corrupt what the run recorded. Rank 0 takes a POSIX record lock (``fcntl.lockf``) on
``RUN_DIR/run.lock`` for the life of its process and writes its host and pid into the file; the
lock is released by the kernel when the process ends, however it ends (a ``kill -9`` leaves no
stale lock), and works on NFS, where ``flock`` may not.

>>> import tempfile
>>> folder = tempfile.mkdtemp()
>>> lock = RunLock.acquire(folder)
>>> lock.path.name
'run.lock'
>>> lock.release()
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from launcher.errors import UserError

#: the lock file inside a run directory
LOCK_NAME = "run.lock"
#: a run's configuration inside its run directory (written at its first start)
CONFIG_NAME = "config.json"


class RunDirectoryLocked(RuntimeError):
    """Another live process holds the run directory."""


class RunLock:
    """A held lock on ``RUN_DIR/run.lock`` (see the module docstring)."""

    def __init__(self, path: Path, handle) -> None:
        self.path, self._handle = path, handle

    @classmethod
    def acquire(cls, run_dir: str | os.PathLike) -> RunLock:
        """Take the lock of ``run_dir`` (created if needed) without waiting.

        Raises
        ------
        RunDirectoryLocked
            naming the directory and the host/pid that holds it, if another process does.
        """
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK_NAME
        handle = open(path, "a+")  # noqa: SIM115 - held open for the process's life
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "an unknown process"
            handle.close()
            raise RunDirectoryLocked(
                f"run directory {run_dir} is in use by another job ({holder}); two jobs on one run directory "
                "would corrupt its checkpoints. Wait for it to end (or stop it), or give this job another "
                "--run-dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "since": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
        handle.flush()
        return cls(path, handle)

    def release(self) -> None:
        """Drop the lock (also dropped by the kernel when the process exits)."""
        if self._handle is not None:
            fcntl.lockf(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


def check_owner(run_dir: str | os.PathLike, config: dict, ignore=()) -> None:
    """Refuse a fresh start in a run directory that holds another run's ``config.json``.

    A fresh start writes its configuration and checkpoints into ``run_dir``; where another run
    (another model, width, data or any other option) lives there, its ``config.json`` would be
    overwritten and the two runs' checkpoints and metric lines mixed. The same run started again
    (an identical configuration, apart from the options in ``ignore``) may reuse its directory;
    continuing a run goes through ``--resume``, which does not come here.

    Raises
    ------
    UserError
        naming the run that owns ``run_dir`` (model, width, when its config was written) and the
        options that differ, with what to do instead.

    >>> import json, tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / CONFIG_NAME).write_text(json.dumps({"model": "some-model", "width": 8, "seed": 0}))
    >>> check_owner(folder, {"model": "some-model", "width": 8, "seed": 0})   # the same run: allowed
    >>> check_owner(folder, {"model": "some-model", "width": 16, "seed": 0})
    Traceback (most recent call last):
    ...
    launcher.errors.UserError: --run-dir ...: it holds another run, some-model width 8 (...): width 8 there, 16 now; ...
    """
    path = Path(run_dir) / CONFIG_NAME
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as error:
        raise UserError(f"--run-dir {run_dir}: its {CONFIG_NAME} is unreadable ({error}); it is not this run's "
                        "directory: give this run another --run-dir") from None
    first = ("model", "width", "model_overrides", "train")  # what names a run, shown first
    differ = sorted((k for k in set(saved) | set(config) if k not in ignore and saved.get(k) != config.get(k)),
                    key=lambda k: (first.index(k) if k in first else len(first), k))
    if not differ:
        return
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))
    shown = "; ".join(f"{k} {saved.get(k)!r} there, {config.get(k)!r} now" for k in differ[:4])
    more = f" (and {len(differ) - 4} more)" if len(differ) > 4 else ""
    raise UserError(f"--run-dir {run_dir}: it holds another run, {saved.get('model')} width {saved.get('width')} "
                    f"({path}, written {when}): {shown}{more}; starting here would overwrite its config and mix the "
                    f"two runs' checkpoints. Give this run another --run-dir, or continue that one with "
                    f"--resume {run_dir}")
