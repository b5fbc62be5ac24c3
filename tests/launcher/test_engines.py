"""Every engine × force mode the launcher accepts, on 2 CPU ranks, against one process (gradients, then
the loss over three steps), at a setting where the tensors really are partitioned; the launcher's
DeepSpeed engine at ZeRO-1, 2 and 3 against one process (global loss, gradients, averaged weights);
and the refusals. One launch of 2 ranks per engine serves all of its cases."""

import json

import pytest
from jobs import PYTHON, free_port, run

from launcher.config import parse
from launcher.sharding import engine_config

CASES = [  # engine, ZeRO stage, forces, extra flags
    ("deepspeed", 3, "direct", []),  # built inside zero.Init, persistence threshold 0
    ("deepspeed", 3, "direct", ["ac", "offload"]),  # + optimizer and parameter offload
    ("deepspeed", 2, "conservative", ["ac"]),
    ("fsdp", 3, "direct", ["ac"]),  # per-block units
    ("fsdp", 3, "conservative", []),  # root-only unit
    ("fsdp", 3, "direct", ["offload"]),  # CPUOffloadPolicy: parameters, gradients, optimizer on the host
]


#: ZeRO stages of the launcher's own DeepSpeed engine on the MPNN (tests/launcher/zero_worker.py)
STAGES = [1, 2, 3]


def case_name(engine, stage, forces, extra) -> str:
    """The worker's name of a case (tests/launcher/shard_worker.py), the model eSEN at width 16."""
    return ":".join([engine, str(stage), forces, "esen", "16", *extra])


@pytest.fixture(scope="module")
def checked(data, tmp_path_factory):
    """``checked(engine)`` → ``{case: largest differences}`` for every case of that engine (DeepSpeed's
    with the ``zero:STAGE`` cases, and ``"built"``: the ops DeepSpeed built), from one launch of 2 ranks
    per engine (made on first use; the ranks' start-up is paid once per engine)."""
    results = {}

    def get(engine: str) -> dict:
        if engine not in results:
            out = tmp_path_factory.mktemp(f"shard-{engine}") / "result.json"
            extensions = out.parent / "torch_extensions"  # where DeepSpeed would build an op (none expected)
            cases = [case_name(*case) for case in CASES if case[0] == engine]
            if engine == "deepspeed":
                cases += [f"zero:{stage}" for stage in STAGES]
            result = run([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
                          "tests/launcher/shard_worker.py", str(data["raw_train"]), str(out), *cases], timeout=600,
                         env={"TORCH_EXTENSIONS_DIR": str(extensions)})
            # a failed launch fails each of its cases with its output (and is not launched again)
            results[engine] = {**json.loads(out.read_text()), "built": sorted(p.name for p in extensions.glob("*"))} \
                if result.returncode == 0 else result.stdout[-3000:] + result.stderr[-3000:]
        assert isinstance(results[engine], dict), results[engine]
        return results[engine]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("engine,stage,forces,extra", CASES)
def test_sharded_gradients_match_one_process(checked, engine, stage, forces, extra):
    worst = checked(engine)[case_name(engine, stage, forces, extra)]
    assert worst["loss"] < 1e-6, worst
    assert worst["grad"] < 1e-5, worst
    if stage == 3:  # every tensor but scalars split across the two ranks
        assert worst["partitioned"] >= worst["parameters"] - 4, worst


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_two_ranks_match_one_process(checked, stage):
    """Uneven shares of one global batch on 2 ranks (ZeRO-1, 2 and 3; direct forces) give the one-process loss, the
    gradient of the global mean, and schedule-free averaged weights equal to ``optimizer.eval()``."""
    worst = checked("deepspeed")[f"zero:{stage}"]
    assert worst["loss"] < 1e-6, worst
    assert worst["grad"] < 1e-5, worst
    assert worst["averaged"] < 1e-5, worst


@pytest.mark.slow
def test_deepspeed_builds_no_op_on_the_cpu(checked):
    """Two ranks through ZeRO-1, 2 and 3 (and ZeRO-3 with optimizer and parameter offload) build no
    DeepSpeed op (its CPU communication backend's shared-memory op is marked unavailable by the
    launcher): no job, and no test, waits minutes for a compiler on a fresh clone (tests/launcher/jobs.py)."""
    assert checked("deepspeed")["built"] == [], checked("deepspeed")["built"]


def test_refusals_name_what_works():
    with pytest.raises(ValueError, match="use --engine fsdp --conservative"):
        engine_config(parse(["--conservative", "--zero-stage", "3"]), False)
    with pytest.raises(ValueError, match="--fsdp-units root"):
        engine_config(parse(["--engine", "fsdp", "--fsdp-units", "blocks", "--conservative"]), False)
    with pytest.raises(ValueError, match="cannot offload the optimizer state alone.*--engine fsdp --offload-params"):
        engine_config(parse(["--engine", "fsdp", "--offload-optimizer"]), False)
    fsdp = engine_config(parse(["--engine", "fsdp", "--offload-params"]), False)
    assert fsdp["fsdp"]["cpu_offload"] and set(fsdp["zero_optimization"]) >= {"offload_param", "offload_optimizer"}
    with pytest.raises(ValueError, match="--zero-stage 3"):
        engine_config(parse(["--offload-params"]), False)
    assert engine_config(parse(["--engine", "fsdp", "--conservative"]), False)["fsdp"]["units"] == "root"
    assert engine_config(parse(["--engine", "fsdp"]), False)["fsdp"]["units"] == "blocks"
    ds = engine_config(parse(["--zero-stage", "3", "--offload-optimizer", "--offload-params"]), False)
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["zero_force_ds_cpu_optimizer"] is False  # the schedule-free client optimizer is kept


@pytest.mark.slow
def test_fsdp_job_trains_checkpoints_and_resumes(data, tmp_path):
    """``torchrun … launcher/train.py --engine fsdp --conservative`` end to end on 2 ranks: the checkpoint
    records the engine and precision policy and loads as a zoo model; ``--resume`` of the last checkpoint
    restores the sharded state (torch.distributed.checkpoint) and finds nothing left to do."""
    from jobs import TINY

    from zoo.hub.checkpoint import load_model, read_metadata

    run_dir = tmp_path / "fsdp"
    args = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
            "launcher/train.py", *TINY, "--engine", "fsdp", "--conservative", "--train", str(data["train"]),
            "--val", str(data["val"]), "--atoms-per-batch", "100", "--max-atoms", "1500", "--checkpoint-fraction", "0.5",
            "--run-dir", str(run_dir)]
    result = run(args, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    last = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    meta = read_metadata(last)
    assert meta["engine"]["engine"] == "fsdp" and meta["engine"]["stage"] == "root", meta["engine"]
    assert meta["precision"]["compute"] == "fp32" and meta["world_size"] == 2
    model = load_model(last)
    assert sum(p.numel() for p in model.parameters()) == meta["N"]
    resumed = run([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
                   "launcher/train.py", "--resume", str(last)], timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "nothing to do" in resumed.stdout + resumed.stderr
