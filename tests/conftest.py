"""Session-wide test wiring: every process a test starts is tagged and killed when the test ends
(:mod:`processes`). Room-specific fixtures live in each room's conftest."""

from processes import (  # noqa: F401  (fixtures and hooks are registered by name)
    _kill_processes_of_session,
    _kill_processes_of_test,
    pytest_configure,
    pytest_sessionfinish,
)
