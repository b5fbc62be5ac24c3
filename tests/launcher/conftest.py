"""Fixtures of the launcher tests: a small labelled data set in OMol25's layout, converted once, and
one uninterrupted tiny run on it that several tests compare with or start from (helpers in :mod:`jobs`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from jobs import run, tiny_job, write_split

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


@pytest.fixture(scope="session")
def tiny_run(data, tmp_path_factory) -> Path:
    """The run directory of one uninterrupted :func:`jobs.tiny_job` on ``data`` (10 steps, checkpoints
    at steps 2, 5, 8 and 10), made once: the reference of test_resume.py and test_http_data.py, the
    pretrained checkpoint of test_finetune.py. Tests read it; the one job started in it is refused at
    start (test_finetune.py) and must leave it as it was."""
    run_dir = tmp_path_factory.mktemp("tiny-run") / "run"
    result = run(tiny_job(data["train"], data["val"], run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir
