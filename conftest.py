"""The docstring examples of datapipe/, launcher/, zoo/ and fit/ run as doctests (``--doctest-modules``
in pyproject.toml) from the repository root, where their relative paths (``data/omol25_sample/…``)
point, whatever directory pytest was started in."""

from pathlib import Path

import pytest
from _pytest.doctest import DoctestItem

REPO = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def _doctests_run_from_the_repository_root(request, monkeypatch):
    if isinstance(request.node, DoctestItem):
        monkeypatch.chdir(REPO)
