"""Two CPU ranks under DeepSpeed ZeRO vs one process: global loss, gradients, averaged weights."""

import json

import pytest
from conftest import PYTHON, free_port, run


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_ranks_match_one_process(data, tmp_path, stage):
    """Uneven shares of one global batch on 2 ranks (ZeRO-1, 2 and 3; direct forces) give the one-process loss, the
    gradient of the global mean, and schedule-free averaged weights equal to ``optimizer.eval()``."""
    out = tmp_path / "result.json"
    result = run([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
                  "tests/launcher/zero_worker.py", str(data["raw_train"]), str(stage), str(out)], timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    worst = json.loads(out.read_text())
    assert worst["loss"] < 1e-6, worst
    assert worst["grad"] < 1e-5, worst
    assert worst["averaged"] < 1e-5, worst
