"""CPU seconds per test: ``pytest --cpu-durations=N`` lists the N tests that used the most CPU time.

Wall time (``--durations``) depends on what else the machine runs; CPU time much less. A test's
CPU time is that of the pytest process plus its reaped children (``getrusage`` of ``RUSAGE_SELF``
and ``RUSAGE_CHILDREN``) over its setup, call and teardown: every process a test starts counts,
launchers' ranks included (the session is their subreaper, :mod:`processes`), once they have
ended. Module- and session-scoped fixtures are charged to the first test that uses them.

Loaded by ``tests/conftest.py``.
"""

from __future__ import annotations

import resource
import time

import pytest

#: ``{nodeid: (cpu seconds, wall seconds)}`` of the tests run so far
_spent: dict[str, tuple[float, float]] = {}


def _cpu() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def pytest_addoption(parser) -> None:
    parser.addoption("--cpu-durations", type=int, default=None, metavar="N",
                     help="list the N tests that used the most CPU time (this process and its children); 0: all")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    cpu, wall = _cpu(), time.perf_counter()
    yield
    _spent[item.nodeid] = (_cpu() - cpu, time.perf_counter() - wall)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    n = config.getoption("--cpu-durations")
    if n is None or not _spent:
        return
    rows = sorted(_spent.items(), key=lambda kv: -kv[1][0])
    total_cpu, total_wall = sum(c for c, _ in _spent.values()), sum(w for _, w in _spent.values())
    terminalreporter.write_sep("=", f"CPU seconds per test (top {n or len(rows)})")
    for nodeid, (cpu, wall) in rows[:n or len(rows)]:
        terminalreporter.write_line(f"{cpu:8.1f} cpu-s {wall:8.1f} wall-s  {nodeid}")
    terminalreporter.write_line(f"{total_cpu:8.1f} cpu-s {total_wall:8.1f} wall-s  all {len(rows)} tests")
