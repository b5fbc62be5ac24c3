"""Fixtures of the launcher tests: a small labelled data set in OMol25's layout, converted once
(helpers in :mod:`jobs`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from jobs import write_split

from datapipe.convert import convert

#: rank scripts run by the tests, not test modules (nor modules of docstring examples)
collect_ignore = ["zero_worker.py", "sleeping_rank.py", "shard_worker.py", "zinit_constants.py"]


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> dict[str, Path]:
    """``{"raw_train", "train", "val"}``: a raw .aselmdb (96 structures) and two shard dirs."""
    root = tmp_path_factory.mktemp("launcher-data")
    (root / "raw").mkdir()
    write_split(root / "raw" / "train.aselmdb", 96, seed=1)
    write_split(root / "raw" / "val.aselmdb", 24, seed=2)
    convert([root / "raw" / "train.aselmdb"], root / "train", shard_size=24, workers=1)
    convert([root / "raw" / "val.aselmdb"], root / "val", shard_size=24, workers=1)
    return {"raw_train": root / "raw" / "train.aselmdb", "train": root / "train", "val": root / "val"}
