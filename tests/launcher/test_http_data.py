"""A training run whose shards stream over HTTP (a server on 127.0.0.1; no shared folder)
trains on the same batches, with the same losses, as one reading the local folder (the ``tiny_run``
fixture: the same command on the local shards)."""

from __future__ import annotations

import json

import pytest

from jobs import run, tiny_job
from http_server import serve

pytestmark = pytest.mark.slow
LIMIT = 900


def _losses(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if r["kind"] == "train"], [r for r in lines if r["kind"] == "start"][0]


def test_training_from_http_equals_local(data, tiny_run, tmp_path):
    with serve(data["train"]) as (train_url, train_log), serve(data["val"]) as (val_url, _):
        remote = run(tiny_job(train_url, val_url, tmp_path / "http"), timeout=LIMIT,
                     env={"SYMSCALE_CACHE": str(tmp_path / "cache")})
    assert remote.returncode == 0, remote.stdout[-2000:] + remote.stderr[-3000:]
    (a, start_a), (b, start_b) = _losses(tiny_run), _losses(tmp_path / "http")
    assert a == b and len(a) == start_a["steps"] == start_b["steps"]  # the same batches, bit for bit
    assert any(name.endswith(".tar") for name in train_log.requests)  # the shards did come over HTTP
