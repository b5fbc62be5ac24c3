"""Faults of a long run, each injected into the real job (plain ``python launcher/train.py``, real
DeepSpeed, real checkpoints on disk), and what must survive them (issue 13, part 2).

Injection goes through ``SYMSCALE_FAULT`` (:mod:`launcher.faults`) where the fault cannot be
caused from outside at a chosen moment (a kill inside a checkpoint write, a full disk, a NaN);
bad shards are real damaged files, dead ranks real killed processes, the second job a real
second process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
from jobs import PYTHON, REPO, free_port, run, tiny_job

from datapipe.index import ShardIndex
from datapipe.loader import StreamingLoader
from launcher import checkpoint as ckpt
from zoo.hub.checkpoint import load_model, read_metadata

pytestmark = pytest.mark.slow
#: seconds one job may take (a tiny run takes ~30 s alone, minutes on a shared, loaded machine)
LIMIT = 900


def records(run_dir, kind):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["kind"] == kind]


def final_metadata(run_dir):
    return read_metadata(ckpt.find(run_dir))


def steps_of(run_dir):
    return records(run_dir, "start")[0]["steps"]


def test_kill_during_checkpoint_write_resumes_from_last_complete(data, tmp_path):
    """SIGKILL after the engine state of the step-5 checkpoint is on disk but before it is complete:
    the partial directory is never taken for a checkpoint; --resume continues from step 2 and sees
    every structure exactly once, with the same losses the killed run logged for the replayed steps."""
    run_dir = tmp_path / "run"
    result = run(tiny_job(data["train"], data["val"], run_dir), env={"SYMSCALE_FAULT": "kill-in-checkpoint:5"},
                 timeout=LIMIT)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    folder = run_dir / "checkpoints"
    assert (folder / "step-00000005.partial" / "deepspeed").is_dir() and not (folder / "step-00000005").exists()
    assert ckpt.find(run_dir) == folder / "step-00000002"
    with pytest.raises(FileNotFoundError, match="unfinished checkpoint"):
        ckpt.find(folder / "step-00000005.partial")
    before = {r["step"]: r["loss"] for r in records(run_dir, "train")}

    result = run([PYTHON, "launcher/train.py", "--resume", str(run_dir)], timeout=LIMIT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert records(run_dir, "resume")[0]["step"] == 2
    assert not list(folder.glob("*.partial"))
    index = ShardIndex.load(data["train"])
    meta = final_metadata(run_dir)
    assert meta["step"] == steps_of(run_dir)
    assert (meta["atoms_seen"], meta["samples_seen"]) == (index.n_atoms, index.n_structures)
    after = [r for r in records(run_dir, "train") if r["time"] > records(run_dir, "resume")[0]["time"]]
    for r in after[:3]:  # steps 3, 4, 5 again: the same batches, the same weights, the same loss
        assert r["loss"] == pytest.approx(before[r["step"]], rel=1e-9, abs=1e-12), r["step"]


def test_disk_full_during_checkpoint_keeps_the_previous_one(data, tmp_path):
    """ENOSPC while the step-5 checkpoint is written: one clear error line, no partial or half
    checkpoint left, and the step-2 checkpoint intact: the run resumes from it to the end."""
    run_dir = tmp_path / "run"
    result = run(tiny_job(data["train"], data["val"], run_dir), env={"SYMSCALE_FAULT": "enospc-in-checkpoint:5"},
                 timeout=LIMIT)
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: could not write checkpoint") and "(the disk is full)" in last, last
    assert "No space left on device" in last and "step-00000002" in last and f"--resume {run_dir}" in last
    assert "Traceback" not in result.stderr
    folder = run_dir / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step-00000002"]
    assert torch.isfinite(next(load_model(folder / "step-00000002").parameters())).all()

    result = run([PYTHON, "launcher/train.py", "--resume", str(run_dir)], timeout=LIMIT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert final_metadata(run_dir)["atoms_seen"] == ShardIndex.load(data["train"]).n_atoms


def test_nonfinite_loss_and_gradient_are_skipped_by_every_rank(data, tmp_path):
    """Two ranks: a NaN loss on rank 1 only (step 2) and a NaN gradient behind a finite loss on rank
    0 only (step 4). Both ranks skip both steps together (no hang, no desync), the skips are
    logged with the global batch's structure ids and recorded in the checkpoint; D counts only
    the atoms trained on, and the weights stay finite."""
    run_dir = tmp_path / "run"
    args = tiny_job(data["train"], data["val"], run_dir)
    result = run([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
                  *args[1:]], env={"SYMSCALE_FAULT": "nan-loss:2:1,nan-gradient:4:0"}, timeout=LIMIT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    skips = records(run_dir, "skip")
    assert [(s["step"], s["reason"]) for s in skips] == [(2, "non-finite loss"), (4, "non-finite gradient")]
    assert all(s["structure_ids"] and s["structures"] == len(s["structure_ids"]) for s in skips)
    assert skips[0]["flagged_ids"] and set(skips[0]["flagged_ids"]) <= set(skips[0]["structure_ids"])
    meta = final_metadata(run_dir)
    skipped = meta["skipped"]
    assert skipped["steps"] == 2 and [r["step"] for r in skipped["records"]] == [2, 4]
    index = ShardIndex.load(data["train"])
    assert meta["atoms_seen"] + skipped["atoms"] == index.n_atoms
    assert meta["samples_seen"] + skipped["structures"] == index.n_structures
    assert all(torch.isfinite(p).all() for p in load_model(ckpt.find(run_dir)).parameters())
    trained = {r["step"] for r in records(run_dir, "train")}
    assert 2 not in trained and 4 not in trained and meta["step"] in trained


def test_consecutive_skips_stop_the_run(data, tmp_path):
    run_dir = tmp_path / "run"
    result = run(tiny_job(data["train"], data["val"], run_dir, "--max-consecutive-skips", "3"),
                 env={"SYMSCALE_FAULT": "nan-loss:3,nan-loss:4,nan-loss:5"}, timeout=LIMIT)
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 3 consecutive steps skipped") and "step 5: non-finite loss" in last, last
    assert "step-00000002" in last and f"--resume {run_dir}" in last
    assert [s["consecutive"] for s in records(run_dir, "skip")] == [1, 2, 3]


#: a shuffle buffer of one shard (24 structures): shards are then read one after the other during the run
BUFFER = ["--shuffle-buffer", "24"]


def late_shard(train):
    """The shard the single-rank run (with :data:`BUFFER`) reads last: damaging it makes the run fail mid-way."""
    loader = StreamingLoader(train, rank=0, world_size=1, num_workers=0, atoms_per_batch=100,
                             shuffle_buffer=24, seed=0, shuffle=True)
    index = ShardIndex.load(train)
    return index.shard_path(loader.plan.streams[0][0].pieces[-1][0])


@pytest.fixture
def damaged(data, tmp_path):
    """A copy of the train shards whose last-read shard has its second half overwritten (same size)."""
    train = tmp_path / "train"
    shutil.copytree(data["train"], train)
    shard = late_shard(train)
    size = shard.stat().st_size
    with open(shard, "r+b") as handle:
        handle.seek(size // 2)
        handle.write(b"\x00" * (size - size // 2))
    return train, shard.name


def test_bad_shard_mid_run_stops_naming_it_and_the_checkpoint(data, damaged, tmp_path):
    train, name = damaged
    run_dir = tmp_path / "run"
    result = run(tiny_job(train, data["val"], run_dir, *BUFFER), timeout=LIMIT)
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training data failed at step") and f"rank 0: shard {name}" in last, last
    assert "its last complete checkpoint is" in last and f"--resume {run_dir}" in last and "--skip-bad-shards" in last
    assert records(run_dir, "checkpoint"), "the shard goes bad after the first checkpoint"
    # as the message says: resume with --skip-bad-shards; the run ends with D exact
    result = run([PYTHON, "launcher/train.py", "--resume", str(run_dir), "--skip-bad-shards"], timeout=LIMIT)
    assert result.returncode == 0, result.stderr[-3000:]
    meta, index = final_metadata(run_dir), ShardIndex.load(train)
    assert meta["skipped"]["structures"] > 0 and meta["step"] == steps_of(run_dir)
    assert meta["atoms_seen"] + meta["skipped"]["atoms"] == index.n_atoms


def test_skip_bad_shards_counts_and_records_what_was_not_read(data, damaged, tmp_path):
    train, name = damaged
    run_dir = tmp_path / "run"
    result = run(tiny_job(train, data["val"], run_dir, *BUFFER, "--skip-bad-shards"), timeout=LIMIT)
    assert result.returncode == 0, result.stderr[-3000:]
    meta = final_metadata(run_dir)
    skipped, index = meta["skipped"], ShardIndex.load(train)
    assert skipped["structures"] > 0 and skipped["steps"] == 0
    unread = [r for r in skipped["records"] if r["reason"] == "unreadable shard"]
    assert {r["shard"] for r in unread} == {name}
    assert sum(len(r["rows"]) for r in unread) == skipped["structures"]
    assert meta["atoms_seen"] + skipped["atoms"] == index.n_atoms  # D exact: read atoms only
    assert meta["samples_seen"] + skipped["structures"] == index.n_structures
    assert records(run_dir, "unread")


def rank_env(rank, port):
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "RANK": str(rank),
            "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port}


def start(args, env):
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(process, timeout):
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise


def test_a_rank_that_dies_is_named_by_the_others(data, tmp_path):
    """Two ranks started separately (as on two hosts, no launcher to kill the rest): rank 1 is
    SIGKILLed at step 3; rank 0 stops soon after (well inside --dist-timeout) naming rank 1."""
    run_dir, port = tmp_path / "run", free_port()
    args = tiny_job(data["train"], data["val"], run_dir, "--dist-timeout", "120")
    ranks = [start(args, {**rank_env(r, port), "SYMSCALE_FAULT": "exit:3:1"}) for r in (0, 1)]
    _, err1 = finish(ranks[1], LIMIT)
    died = time.time()
    assert ranks[1].returncode == -signal.SIGKILL, err1[-2000:]
    _, err0 = finish(ranks[0], 120)
    waited = time.time() - died
    assert ranks[0].returncode == 1, err0[-3000:]
    last = err0.strip().splitlines()[-1]
    assert "rank 1 stopped without a word" in last and f"--resume {run_dir}" in last, last
    assert waited < 60, f"rank 0 took {waited:.0f} s to stop"


def test_a_rank_that_never_joins_is_named(data, tmp_path):
    """Rank 0 of 2 started alone: it stops after --dist-timeout, naming rank 1 (not a hang). Rank 0
    hosts the rendezvous store and the wait starts once it has checked in, so a short timeout is
    not hurried by a slow start on a loaded machine (the test waits it out: 3 s, not 10)."""
    run_dir, port = tmp_path / "run", free_port()
    rank0 = start(tiny_job(data["train"], data["val"], run_dir, "--dist-timeout", "3"), rank_env(0, port))
    _, err = finish(rank0, LIMIT)
    assert rank0.returncode == 1, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert "rank(s) [1] of 2 did not join within 3 s" in last and "start them" in last, last
    assert not (run_dir / "checkpoints").exists()


def test_a_second_job_on_the_same_run_directory_refuses_to_start(data, tmp_path):
    """While a job runs (held still with SIGSTOP so that it cannot finish first), a second fresh job
    and a --resume on its run directory both refuse to start; the first then finishes normally."""
    run_dir = tmp_path / "run"
    first = start(tiny_job(data["train"], data["val"], run_dir),
                  {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    deadline = time.time() + LIMIT
    while not (run_dir / "metrics.jsonl").is_file() or not records(run_dir, "checkpoint"):  # started, resumable
        assert first.poll() is None and time.time() < deadline, "the first job did not reach its first checkpoint"
        time.sleep(0.2)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second = run(tiny_job(data["train"], data["val"], run_dir), timeout=LIMIT)
        resumed = run([PYTHON, "launcher/train.py", "--resume", str(run_dir)], timeout=LIMIT)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, err = finish(first, LIMIT)
    assert first.returncode == 0, err[-3000:]
    for other in (second, resumed):
        assert other.returncode == 1, other.stderr[-3000:]
        last = other.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: run directory {run_dir} is in use by another job"), last
        assert f'"pid": {first.pid}' in last, last
    assert len(records(run_dir, "start")) == 1 and not records(run_dir, "resume")
