"""Shared fixtures for the fit tests: the published validation tables beside the repository."""

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"validation data not found at {SHARED_DATA} (expected ../shared/data beside the repo)")
    return SHARED_DATA
