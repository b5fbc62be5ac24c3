"""Shared fixtures: small real inputs in OMol25's layout (molecules with EMT labels, charge and
spin in ``row.data``), converted once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from molecules import write_aselmdb

from datapipe.convert import convert

#: The repository's shared inputs, found beside the checkout (CI layout: <repo>/../shared).
SHARED = Path(__file__).resolve().parents[2].parent / "shared"


@pytest.fixture(scope="session")
def raw_dir(tmp_path_factory) -> Path:
    """Two `.aselmdb` files of 120 molecules (3-30 atoms), charge/spin in row.data."""
    directory = tmp_path_factory.mktemp("raw")
    write_aselmdb(directory / "partA.aselmdb", 120, seed=1)
    write_aselmdb(directory / "partB.aselmdb", 120, seed=2)
    return directory


@pytest.fixture(scope="session")
def shard_dir(raw_dir, tmp_path_factory) -> Path:
    """`raw_dir` converted into shards of 40 structures (6 shards)."""
    out = tmp_path_factory.mktemp("shards")
    convert([raw_dir], out, shard_size=40, workers=1)
    return out


@pytest.fixture(scope="session")
def cases_dir() -> Path:
    if not (SHARED / "cases").is_dir():
        pytest.skip(f"shared cases not found at {SHARED / 'cases'}")
    return SHARED / "cases"
