"""Two CPU ranks under DeepSpeed ZeRO vs one process: global loss, gradients, averaged weights."""

import json

import pytest
from jobs import PYTHON, free_port, run

STAGES = [1, 2, 3]


@pytest.fixture(scope="module")
def by_stage(data, tmp_path_factory) -> dict:
    """``{stage: largest differences}``: one launch of 2 ranks checks every stage in turn (the ranks'
    start-up, a large part of the cost on a CPU, is paid once)."""
    out = tmp_path_factory.mktemp("zero") / "result.json"
    extensions = out.parent / "torch_extensions"  # where DeepSpeed would build an op (none expected)
    result = run([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
                  "tests/launcher/zero_worker.py", str(data["raw_train"]), ",".join(map(str, STAGES)), str(out)],
                 timeout=600, env={"TORCH_EXTENSIONS_DIR": str(extensions)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {**json.loads(out.read_text()), "built": sorted(p.name for p in extensions.glob("*"))}


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_two_ranks_match_one_process(by_stage, stage):
    """Uneven shares of one global batch on 2 ranks (ZeRO-1, 2 and 3; direct forces) give the one-process loss, the
    gradient of the global mean, and schedule-free averaged weights equal to ``optimizer.eval()``."""
    worst = by_stage[str(stage)]
    assert worst["loss"] < 1e-6, worst
    assert worst["grad"] < 1e-5, worst
    assert worst["averaged"] < 1e-5, worst


@pytest.mark.slow
def test_deepspeed_builds_no_op_on_the_cpu(by_stage):
    """Two ranks through ZeRO-1, 2 and 3 build no DeepSpeed op (its CPU communication backend's
    shared-memory op is marked unavailable by the launcher): no job, and no test, waits minutes for a
    compiler on a fresh clone (tests/launcher/jobs.py)."""
    assert by_stage["built"] == [], by_stage["built"]
