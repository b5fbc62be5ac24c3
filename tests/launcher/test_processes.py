"""A command that times out or fails takes every process it started with it, at once: the
launcher and its ranks, though the ranks run in sessions of their own (as torchrun and DeepSpeed
start them) and a kill of the launcher's process group would miss them."""

import os
import subprocess
import time

import pytest
from jobs import PYTHON, REPO, free_port
from processes import TaggedProcess, alive, tagged


def start_hanging_ranks(tmp_path) -> tuple[TaggedProcess, list[int]]:
    """torchrun with two ranks that sleep; returns once both ranks have written their pids."""
    job = TaggedProcess([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
                         "tests/launcher/sleeping_rank.py", str(tmp_path)],
                        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 180
    while len(pids := sorted(tmp_path.glob("rank-*.pid"))) < 2:
        if job.process.poll() is not None or time.monotonic() > deadline:
            job.kill()
            pytest.fail(f"ranks did not start: {job.output}")
        time.sleep(0.2)
    time.sleep(0.2)  # the pid files are written before the ranks sleep
    pids = [int(p.read_text()) for p in pids]
    # the situation of the issue: ranks alive, tagged, outside the launcher's session and group
    assert {p.pid for p in tagged(job.tag)} >= set(pids) | {job.process.pid}
    assert all(os.getsid(pid) != os.getsid(job.process.pid) for pid in pids)
    return job, pids


def assert_all_gone(job: TaggedProcess, pids: list[int], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while (running := [p for p in pids if alive(p)]) or tagged(job.tag):
        assert time.monotonic() < deadline, f"still running {within} s after the kill: {running}, {tagged(job.tag)}"
        time.sleep(0.1)


def test_timeout_kills_launcher_and_every_rank(tmp_path):
    job, pids = start_hanging_ranks(tmp_path)
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        job.wait(timeout=0.5)
    assert_all_gone(job, pids)
    assert job.process.returncode is not None
    assert time.monotonic() - start < 10  # at once, not after a grace period or a pipe timeout


def test_failure_inside_the_block_kills_every_rank(tmp_path):
    with pytest.raises(RuntimeError, match="a failing test"):
        with start_hanging_ranks(tmp_path)[0] as job:
            pids = [int(p.read_text()) for p in tmp_path.glob("rank-*.pid")]
            raise RuntimeError("a failing test")
    assert_all_gone(job, pids)


def test_processes_a_test_leaves_behind_are_killed_when_it_ends(tmp_path):
    """A test that starts a detached process (own session, no wait) and ends: the per-test tag
    kills it at teardown. Checked on an inner pytest run with this suite's process plugin."""
    pid_file = tmp_path / "orphan.pid"
    inner = tmp_path / "test_inner.py"
    inner.write_text(
        "import subprocess, sys, time\n"
        "def test_leaves_an_orphan():\n"
        f"    p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True)\n"
        f"    open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
    )
    # the inner run sees this suite's process plugin and nothing of the outer run's options
    inner_env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"} | {"PYTHONPATH": str(REPO / "tests")}
    result = subprocess.run([PYTHON, "-m", "pytest", "-q", "-p", "processes", "-p", "no:cacheprovider",
                             "--rootdir", str(tmp_path), "-c", os.devnull, str(inner)],
                            cwd=tmp_path, env=inner_env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    pid = int(pid_file.read_text())
    survived = alive(pid)
    if survived:
        os.kill(pid, 9)
    assert not survived, "the inner test's detached process outlived its test"
