"""What the nodes of a job must share, checked on every rank before any long phase.

Every rank of a job reads the same shard index (the loader's plan is computed from it on each
rank, :mod:`datapipe.plan`) and writes its part of each checkpoint into the same run directory
(:mod:`launcher.checkpoint`). On several nodes both must therefore be one shared folder (a
network file system), or the shards a copy with the same index on each node. What a node does not
share ends the job at start-up, on every rank, with one message naming the ranks and hosts that
differ — never a hang, a different data stream per node, or a checkpoint missing a rank's part:

- :func:`together` runs a step that can fail on some ranks only (a path that exists on one node
  and not on another) and raises the same :class:`~launcher.errors.UserError` everywhere
  (:func:`agree`);
- :func:`check_run_dir`: rank 0 writes a fresh token into the run directory, every rank reads it back;
- :func:`check_same`: a value (the shards' index hash) must be the same on every rank.

See docs/multinode.md.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

from datapipe.shards import ShardError
from launcher.engine import Runtime, all_gather_objects, barrier, broadcast_object
from launcher.errors import UserError

#: file in the run directory holding the token of the job that started last
TOKEN = ".shared-token"


def _where(ranks: list[int], hosts: list[str]) -> str:
    names = sorted({hosts[r] for r in ranks})
    return f"rank(s) {ranks} on {', '.join(names)}"


def agree(runtime: Runtime, problem: str | None) -> None:
    """Collective: if any rank has a ``problem``, raise one ``UserError`` on every rank giving each
    distinct problem with the ranks and hosts that met it (just the problem when every rank met it)."""
    found = all_gather_objects((problem, socket.gethostname()))
    hosts = [host for _, host in found]
    problems: dict[str, list[int]] = {}
    for rank, (text, _) in enumerate(found):
        if text is not None:
            problems.setdefault(text, []).append(rank)
    if not problems:
        return
    if len(problems) == 1 and len(next(iter(problems.values()))) == runtime.world_size:
        raise UserError(next(iter(problems)))  # every rank alike: nothing node-specific to say
    lines = [f"{text} ({_where(ranks, hosts)})" for text, ranks in problems.items()]
    raise UserError("; ".join(lines) + "; on several nodes, every node must see the same run directory and "
                    "shards (docs/multinode.md)")


def together(runtime: Runtime, step, *args, **kwargs):
    """``step(*args, **kwargs)`` on every rank; if it raises a user-facing error (``UserError``,
    ``OSError``, ``ValueError``, a ``ShardError``) on any rank, every rank raises the same
    ``UserError`` (:func:`agree`). ``step`` must not start a collective after a rank-local failure."""
    result, problem = None, None
    try:
        result = step(*args, **kwargs)
    except (UserError, OSError, ValueError, ShardError) as error:
        problem = str(error)
    agree(runtime, problem)
    return result


def check_run_dir(run_dir: Path, runtime: Runtime) -> None:
    """Check that every rank sees rank 0's run directory (collective).

    Rank 0 writes a fresh random token to ``run_dir/.shared-token``; each rank reads it back.

    Raises
    ------
    UserError
        on every rank, naming the ranks (and hosts) that read no token or another one: their
        ``run_dir`` is another folder (not shared, or another path) and their checkpoint parts
        would be lost.
    """
    token = broadcast_object(uuid.uuid4().hex if runtime.is_main else None)
    problem = None
    if runtime.is_main:
        try:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            (Path(run_dir) / TOKEN).write_text(token + "\n")
            fsync_path(Path(run_dir) / TOKEN)
        except OSError as error:
            problem = f"cannot write to the run directory {run_dir}: {error}"
    problem = broadcast_object(problem)
    if problem:
        raise UserError(problem)
    barrier()
    try:
        seen = (Path(run_dir) / TOKEN).read_text().strip()
    except OSError:
        seen = None
    mine = None if seen == token else (f"{run_dir} does not exist there" if not Path(run_dir).is_dir() else
                                       f"{run_dir} holds {'no token' if seen is None else 'another job’s token'}")
    found = all_gather_objects((mine, socket.gethostname(), os.fspath(run_dir)))
    bad = [r for r, (text, _, _) in enumerate(found) if text is not None]
    if bad:
        hosts = [host for _, host, _ in found]
        details = "; ".join(f"rank {r} on {hosts[r]}: {found[r][0]}" for r in bad)
        raise UserError(f"the run directory is not shared: rank 0 on {hosts[0]} wrote a token into {found[0][2]}, "
                        f"which {_where(bad, hosts)} cannot read ({details}). Every node must see the run "
                        "directory as one shared folder (a network file system), or their checkpoint parts would "
                        "be lost (docs/multinode.md)")


def check_same(runtime: Runtime, what: str, value: str, hint: str) -> None:
    """Check that ``value`` (e.g. a data hash) is the same on every rank (collective).

    Raises
    ------
    UserError
        on every rank, naming the ranks and hosts whose ``value`` differs from rank 0's.
    """
    found = all_gather_objects((value, socket.gethostname()))
    hosts = [host for _, host in found]
    bad = [r for r, (v, _) in enumerate(found) if v != found[0][0]]
    if bad:
        values = ", ".join(f"rank {r}: {str(found[r][0])[:12]}" for r in bad)
        raise UserError(f"{what} differs between ranks: rank 0 on {hosts[0]} has {str(found[0][0])[:12]}, "
                        f"{_where(bad, hosts)} another ({values}); {hint} (docs/multinode.md)")


def fsync_path(path: Path) -> None:
    """Flush a file or a directory (its entries) to stable storage, so other nodes see it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
