"""CPU seconds per test: ``pytest --cpu-durations=N`` lists the N tests that used the most CPU time.

Wall time (``--durations``) depends on what else the machine runs; CPU time much less. A test's
CPU time is that of the pytest process plus its reaped children (``getrusage`` of ``RUSAGE_SELF``
and ``RUSAGE_CHILDREN``) over its setup, call and teardown: every process a test starts counts,
launchers' ranks included (the session is their subreaper, :mod:`processes`), once they have
ended. Module- and session-scoped fixtures are charged to the first test that uses them (under
pytest-xdist, the first on each worker: every worker builds its own).

The process that runs the test measures it and puts the numbers in its teardown report's
``user_properties`` (``cpu_s``, ``wall_s``); the process that prints the summary reads them from
the reports it receives. That is the same process in a serial run; under pytest-xdist (``-n 2``)
the workers measure and the controller, which gets every report, prints the table.

Loaded by ``tests/conftest.py``.
"""

from __future__ import annotations

import resource
import time

import pytest

#: ``{nodeid: (cpu seconds, wall seconds)}`` of the tests reported so far
_spent: dict[str, tuple[float, float]] = {}
#: ``(cpu, wall)`` when the running test's protocol started (in the process that runs it)
_start: tuple[float, float] = (0.0, 0.0)


def _cpu() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def pytest_addoption(parser) -> None:
    parser.addoption("--cpu-durations", type=int, default=None, metavar="N",
                     help="list the N tests that used the most CPU time (this process and its children); 0: all")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_logstart(nodeid, location) -> None:
    """A test's protocol starts (before its setup): note the clocks."""
    global _start
    _start = (_cpu(), time.perf_counter())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """The teardown report carries the test's CPU and wall seconds, setup to end of teardown."""
    report = yield
    if call.when == "teardown":
        report.user_properties += [("cpu_s", _cpu() - _start[0]), ("wall_s", time.perf_counter() - _start[1])]
    return report


def pytest_runtest_logreport(report) -> None:
    if report.when == "teardown":
        spent = dict(p for p in report.user_properties if isinstance(p, tuple) and len(p) == 2)
        if "cpu_s" in spent:
            _spent[report.nodeid] = (spent["cpu_s"], spent["wall_s"])


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    n = config.getoption("--cpu-durations")
    if n is None or not _spent:
        return
    rows = sorted(_spent.items(), key=lambda kv: -kv[1][0])
    total_cpu, total_wall = sum(c for c, _ in _spent.values()), sum(w for _, w in _spent.values())
    terminalreporter.write_sep("=", f"CPU seconds per test (top {n or len(rows)})")
    for nodeid, (cpu, wall) in rows[:n or len(rows)]:
        terminalreporter.write_line(f"{cpu:8.1f} cpu-s {wall:8.1f} wall-s  {nodeid}")
    terminalreporter.write_line(f"{total_cpu:8.1f} cpu-s {total_wall:8.1f} wall-s  all {len(rows)} tests"
                                " (wall summed over tests, whichever worker ran them)")
