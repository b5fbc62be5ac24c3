"""A training run whose shards stream over HTTP (a server on 127.0.0.1; no shared folder)
trains on the same batches, with the same losses, as one reading the local folder."""

from __future__ import annotations

import json

import pytest

from jobs import PYTHON, TINY, run
from http_server import serve

pytestmark = pytest.mark.slow
LIMIT = 900


def _losses(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if r["kind"] == "train"], [r for r in lines if r["kind"] == "start"][0]


def test_training_from_http_equals_local(data, tmp_path):
    common = [*TINY, "--atoms-per-batch", "100", "--log-every", "1", "--max-atoms", "all",
              "--max-val-structures", "all", "--checkpoint-fraction", "1"]
    env = {"SYMSCALE_CACHE": str(tmp_path / "cache")}
    local = run([PYTHON, "launcher/train.py", *common, "--train", str(data["train"]), "--val", str(data["val"]),
                 "--run-dir", str(tmp_path / "local")], timeout=LIMIT, env=env)
    assert local.returncode == 0, local.stdout[-2000:] + local.stderr[-3000:]
    with serve(data["train"]) as (train_url, train_log), serve(data["val"]) as (val_url, _):
        remote = run([PYTHON, "launcher/train.py", *common, "--train", train_url, "--val", val_url,
                      "--run-dir", str(tmp_path / "http")], timeout=LIMIT, env=env)
    assert remote.returncode == 0, remote.stdout[-2000:] + remote.stderr[-3000:]
    (a, start_a), (b, start_b) = _losses(tmp_path / "local"), _losses(tmp_path / "http")
    assert a == b and len(a) == start_a["steps"] == start_b["steps"]  # the same batches, bit for bit
    assert any(name.endswith(".tar") for name in train_log.requests)  # the shards did come over HTTP
