"""``--precision bf16`` end to end: a short 2-rank training run on the CPU under each engine, whose
checkpoint records the policy (:func:`zoo.models.precision.policy_record`) and loads as a zoo model."""

import json
import math

import pytest
from jobs import PYTHON, TINY, free_port, run

from launcher.config import parse
from launcher.sharding import engine_config, precision_record
from zoo.models.precision import FP32_ISLANDS


def test_explicit_bf16_is_honoured_without_cuda_and_auto_stays_fp32():
    """``--precision bf16`` on a CPU host trains in bf16 (torch computes it there); ``auto`` picks bf16
    only where the device computes it fast (``bf16_supported``: CUDA with bf16)."""
    for engine in ("deepspeed", "fsdp"):
        cfg = parse(["--engine", engine, "--precision", "bf16"])
        config = engine_config(cfg, bf16_supported=False)
        assert config["bf16"]["enabled"] is True
        record = precision_record(cfg, config)
        assert record["compute"] == "bf16" and record["fp32_islands"] == list(FP32_ISLANDS)
        assert record["gradient_reduction"] == ("fp32" if engine == "fsdp" else "bf16")
        assert engine_config(parse(["--engine", engine]), bf16_supported=False)["bf16"]["enabled"] is False


@pytest.mark.slow
def test_zero_init_in_bf16_keeps_the_islands_constants():
    """``--zero-stage 3 --precision bf16`` builds the model inside ``zero.Init``: eSEN builds there and
    every island constant (Wigner-D sample points and pseudo-inverses, radial frequencies, norms'
    weights) equals a plain build's, dtype included (tests/launcher/zinit_constants.py)."""
    result = run([PYTHON, "tests/launcher/zinit_constants.py"], timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "all constants identical" in result.stdout, result.stdout[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["deepspeed", "fsdp"])
def test_two_rank_bf16_run_records_the_policy(data, tmp_path, engine):
    from zoo.hub.checkpoint import load_model, read_metadata

    run_dir = tmp_path / engine
    args = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
            "launcher/train.py", *TINY, "--engine", engine, "--precision", "bf16", "--train", str(data["train"]),
            "--val", str(data["val"]), "--atoms-per-batch", "100", "--max-atoms", "1200", "--checkpoint-fraction", "1",
            "--log-every", "1", "--run-dir", str(run_dir)]
    result = run(args, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    last = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    meta = read_metadata(last)
    assert meta["precision"]["compute"] == "bf16", meta["precision"]
    assert meta["precision"]["fp32_islands"] == list(FP32_ISLANDS) and meta["precision"]["energy_references"] == "fp64"
    assert meta["world_size"] == 2 and meta["engine"]["engine"] == engine
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert len(losses) >= 5 and all(math.isfinite(x) for x in losses), losses
    start = next(r for r in rows if r["kind"] == "start")
    assert start["precision"]["compute"] == "bf16"
    model = load_model(last)  # weights stored in fp32 (a bf16 engine's are upcast)
    assert next(model.parameters()).dtype.is_floating_point and sum(p.numel() for p in model.parameters()) == meta["N"]
