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

#: the lock file inside a run directory
LOCK_NAME = "run.lock"


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
