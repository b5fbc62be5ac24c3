"""A child process that answers one JSON request per line: the other side of a benchmark.

The benchmarks run the model they compare against in its own process (fairchem in its own virtual
environment, :mod:`bench_vs_fairchem`; an older revision of this repository, :mod:`bench_gemnet`),
so the two sides alternate step by step on one machine. The child reads ``{"cmd": ...}`` lines on
stdin and writes one JSON reply line per request; a reply with ``"error"`` is raised here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import traceback
from collections.abc import Callable


class JsonWorker:
    """A request/reply child process.

    Parameters
    ----------
    argv : list of str
        The child's command line.
    env : dict
        Its environment.
    name : str
        What it is, for error messages ("fairchem worker", "baseline worker").
    cwd : str, optional
        Its working directory.
    """

    def __init__(self, argv: list[str], env: dict, name: str, cwd: str | None = None) -> None:
        self.name = name
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=cwd)

    def ask(self, **msg) -> dict:
        """Send one request, return its reply.

        Raises
        ------
        RuntimeError
            The child exited, or replied with an error (its traceback is in the message).
        """
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} exited (code {self.proc.wait()}) on {msg}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{self.name} failed on {msg}: {reply['error']}\n{reply.get('traceback', '')}")
        return reply

    def close(self) -> None:
        """Ask the child to quit and wait for it (60 s)."""
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


def serve(handle: Callable[[dict], dict]) -> None:
    """The child's side: answer each ``{"cmd": ...}`` line on stdin with ``handle(msg)`` until ``quit``.

    An exception in ``handle`` becomes an ``{"error", "traceback"}`` reply, which :meth:`JsonWorker.ask`
    raises in the parent; the child goes on reading (the parent stops it).
    """
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["cmd"] == "quit":
            return
        try:
            reply = handle(msg)
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which stops with it
            reply = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        print(json.dumps(reply), flush=True)


def same_malloc_for_both(cpu: bool = True) -> dict[str, str]:
    """Set glibc's malloc here as the launcher sets it for CPU training (:mod:`launcher.heap`), print
    what both sides run with, and return the environment variables that give the child the same
    (``{}`` off the CPU or where the user's own settings stand: the child inherits those)."""
    from launcher.heap import keep_freed_memory  # the repository is on sys.path in both benchmarks

    env = keep_freed_memory() if cpu else {}
    print("glibc malloc: " + (", ".join(f"{k}={v}" for k, v in env.items()) + " in both processes"
                              if env else "as the environment sets it, in both processes"), flush=True)
    return env
