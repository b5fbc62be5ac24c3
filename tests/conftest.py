"""Session-wide test wiring: every process a test starts is tagged and killed when the test ends
(:mod:`processes`); the heap a test freed goes back to the kernel before the next (:mod:`freed_heap`). Room-specific fixtures live in each room's conftest; what tests import from a
room (``from jobs import run``) lives in a module of its own, never in ``conftest``: all rooms'
conftests share the module name ``conftest``, so which one an import finds would depend on which
rooms pytest was asked to collect."""

from processes import (  # noqa: F401  (fixtures and hooks are registered by name)
    _kill_processes_of_session,
    _kill_processes_of_test,
    pytest_configure,
    pytest_sessionfinish,
)
from cputime import (  # noqa: F401  (`pytest --cpu-durations=N`: CPU seconds per test)
    pytest_addoption,
    pytest_runtest_logreport,
    pytest_runtest_logstart,
    pytest_runtest_makereport,
    pytest_terminal_summary,
)
from freed_heap import pytest_runtest_logfinish  # noqa: F401  (a test's freed heap goes back before the next)


def pytest_ignore_collect(collection_path, config):
    """The rooms' conftests are not collected again as modules of docstring examples
    (``--doctest-modules``; they hold none): importing a second ``conftest`` by path fails with
    "import file mismatch" when pytest collects two rooms at once (``pytest tests/fit tests/launcher``)."""
    if collection_path.name == "conftest.py":
        return True
    return None
