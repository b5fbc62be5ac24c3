"""Processes the tests start, found and killed by a tag in their environment.

A launcher (``torchrun``, ``deepspeed``) puts its ranks in sessions of their own, so killing the
launcher's process group leaves the ranks running, holding pytest's output pipes open. Instead,
every test runs with a unique value of :data:`TAG` in ``os.environ``, which every process it
starts inherits (through any number of launchers and sessions); at the end of the test, and of the
session, every process that carries the tag is killed. :class:`TaggedProcess` narrows the tag to
one command and kills its whole tree at once when its wait times out or raises.

Loaded by ``tests/conftest.py`` (the fixtures and hooks below) and usable as a plugin
(``-p processes`` with ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

#: environment variable that marks the processes a test started
TAG = "SYMSCALE_TEST_TAG"
#: this pytest session's tag; a test's tag is ``SESSION/<n>``, a command's ``SESSION/<n>/<hex>``
SESSION = f"pytest-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _set_child_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux ``PR_SET_CHILD_SUBREAPER``),
    so that a rank whose launcher died stays below the test process, where :func:`descendants`
    finds it. Returns False where the call is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def descendants() -> list[int]:
    """Pids of every process below this one (from ``/proc/<pid>/task/<tid>/children``), or of
    every process on the machine where that file does not exist."""
    if not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists():
        return [p.pid for p in psutil.process_iter()]
    found, todo = [], [os.getpid()]
    while todo:
        pid = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                children = [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def _carries(pid: int, prefix: str) -> bool:
    try:
        value = psutil.Process(pid).environ().get(TAG)
    except (psutil.Error, OSError):  # gone, a zombie, or not ours to read
        return False
    return value is not None and (value == prefix or value.startswith(prefix + "/"))


def tagged(prefix: str) -> list[psutil.Process]:
    """Live processes whose :data:`TAG` is ``prefix`` or below it (``prefix/...``).

    Only this process's descendants are read: with this process a child subreaper (set when the
    plugin loads), every process a test started, in whatever session, is one of them.
    """
    found = []
    for pid in descendants():
        if _carries(pid, prefix):
            try:
                found.append(psutil.Process(pid))
            except psutil.Error:
                pass
    return found


def with_environment(name: str, value: str) -> list[psutil.Process]:
    """Live processes other than this one whose environment sets ``name=value``."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.pid != os.getpid() and process.environ().get(name) == value:
                found.append(process)
        except (psutil.Error, OSError):
            pass
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie, killed but not yet reaped, is not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_tagged(prefix: str, timeout: float = 10.0) -> list[int]:
    """SIGKILL every process tagged ``prefix`` (or below), again until none is left.

    Repeats because a launcher may start a rank between the scan and the kill. Returns the pids
    killed; raises ``RuntimeError`` if some survive ``timeout`` seconds (a process stuck in
    uninterruptible sleep).
    """
    killed: list[int] = []
    deadline = time.monotonic() + timeout
    while survivors := tagged(prefix):
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes tagged {prefix} survived SIGKILL: {[p.pid for p in survivors]}")
        for process in survivors:
            try:
                process.send_signal(signal.SIGKILL)
                killed.append(process.pid)
            except psutil.Error:
                pass
        psutil.wait_procs(survivors, timeout=0.5)
    return sorted(set(killed))


def current_tag() -> str:
    """The tag of the running test (the session's outside a test)."""
    return os.environ.get(TAG, SESSION) if os.environ.get(TAG, "").startswith(SESSION) else SESSION


class TaggedProcess:
    """A command started with a tag of its own below the running test's, killed as a whole.

    ``wait`` returns a ``CompletedProcess``; if it times out (``subprocess.TimeoutExpired``) or is
    interrupted, every process carrying the command's tag — the command and all it started, in
    any session — is killed before the exception propagates. Leaving the ``with`` block does the
    same for whatever is still running::

        with TaggedProcess([sys.executable, "-m", "torch.distributed.run", ...]) as job:
            result = job.wait(timeout=300)
    """

    def __init__(self, args: list[str], *, cwd: str | os.PathLike | None = None, env: dict | None = None) -> None:
        self.args = args
        self.tag = f"{current_tag()}/{uuid.uuid4().hex[:12]}"
        self.output: tuple[str | None, str | None] = (None, None)  # (stdout, stderr) read by kill()
        self.process = subprocess.Popen(args, cwd=cwd, env={**(env or os.environ), TAG: self.tag},
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        start_new_session=True)

    def wait(self, timeout: float) -> subprocess.CompletedProcess:
        try:
            stdout, stderr = self.process.communicate(timeout=timeout)
        except BaseException:
            self.kill()
            raise
        return subprocess.CompletedProcess(self.args, self.process.returncode, stdout, stderr)

    def kill(self) -> list[int]:
        """Kill the command and everything tagged with it; returns the pids killed."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()  # reaped here, so that its return code is kept (-SIGKILL)
        killed = kill_tagged(self.tag)
        try:  # every writer of the pipes is dead: this drains and reaps at once
            self.output = self.process.communicate(timeout=10)
        except (subprocess.TimeoutExpired, ValueError):
            pass
        return killed

    def __enter__(self) -> TaggedProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.kill()


# ---- pytest wiring: a tag per test, every tagged process killed after the test and the session
_count = 0


@pytest.fixture(autouse=True)
def _kill_processes_of_test(monkeypatch):
    """Tag everything this test starts; kill what is still running when it ends (pass or fail)."""
    global _count
    _count += 1
    tag = f"{SESSION}/{_count}"
    monkeypatch.setenv(TAG, tag)
    yield tag
    kill_tagged(tag)


@pytest.fixture(autouse=True, scope="session")
def _kill_processes_of_session():
    yield
    kill_tagged(SESSION)


def _terminate(signum, frame):
    """SIGTERM (a CI cancel): kill every process the session started, then die of the signal.
    (Raising KeyboardInterrupt instead would be swallowed by code that catches BaseException,
    such as click's test runner, and the session would go on.)"""
    try:
        kill_tagged(SESSION)
    finally:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def pytest_configure(config) -> None:
    _set_child_subreaper()
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _terminate)


def pytest_sessionfinish(session, exitstatus) -> None:
    kill_tagged(SESSION)
