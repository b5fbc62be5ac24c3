"""A new user's first hour (issue 15): bad flags and data end in one line, long phases show
progress, conversion rejects are reported, the shard cache is the project's own, engine state is
kept for the last K checkpoints only, and MFU cannot exceed 100 % on a CPU."""

from __future__ import annotations

import json
import os
import shutil

import ase.db
import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from jobs import PYTHON, REPO, TINY, free_port, run

from launcher.config import parse
from launcher.retention import check_disk, disk_plan, prune_engine_state
from zoo.hub.checkpoint import read_metadata

BAD_FLAGS = [
    (["--width", "0"], "--width 0: must be >= 1"),
    (["--lr", "0"], "--lr 0.0: must be a positive number"),
    (["--warmup-fraction", "1.5"], "--warmup-fraction 1.5: must be in [0, 1)"),
    (["--keep-engine-state", "0"], "--keep-engine-state 0: must be >= 1"),
    (["--num-workers", "-1"], "--num-workers -1: must be >= 0"),
    (["--seed", "-3"], "--seed -3: must be >= 0"),
    (["--train", "/no/such/data"], "--train /no/such/data: no such file or directory"),
    (["--model-arg", "no_such_knob=1"], "cannot build the model"),
    (["--width", "abc"], "invalid int value"),
]


@pytest.mark.parametrize("argv, message", BAD_FLAGS)
def test_bad_flag_is_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        parse(["--model", "mpnn", *argv])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err, err


def test_disk_plan_and_refusal(tmp_path, monkeypatch):
    plan = disk_plan(n_params=10**9, checkpoints=10, keep=2, bf16=False)
    assert plan["needed_bytes"] == 10 * 4 * 10**9 + 3 * 16 * 10**9
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 10**10, 10**10))
    with pytest.raises(ValueError, match="need ≈88.0 GB .* only 10.0 GB is free"):
        check_disk(tmp_path / "run", plan)
    assert check_disk(tmp_path, disk_plan(10**6, 10, 2, False))["free_bytes"] == 10**10


def test_prune_keeps_weights_and_the_last_engine_states(tmp_path):
    for step in (10, 20, 30):
        ck = tmp_path / f"step-{step:08d}"
        (ck / "deepspeed" / "state").mkdir(parents=True)
        for name in ("model.safetensors", "metadata.json", "loader-rank00000.json"):
            (ck / name).write_text("x")
    pruned = prune_engine_state(tmp_path, keep=2)
    assert [p.name for p in pruned] == ["step-00000010"]
    assert sorted(p.name for p in (tmp_path / "step-00000010").iterdir()) == ["metadata.json", "model.safetensors"]
    assert (tmp_path / "step-00000030" / "deepspeed").is_dir() and (tmp_path / "step-00000020" / "deepspeed").is_dir()


def _raw_with_a_bad_structure(data, directory):
    """The raw train split plus one structure with two coincident atoms (rejected by conversion)."""
    directory.mkdir()
    shutil.copy(data["raw_train"], directory / "train.aselmdb")
    bad = Atoms("H2O", positions=[[0, 0, 0], [0, 0, 0], [1.0, 0, 0]])
    bad.calc = SinglePointCalculator(bad, energy=-1.0, forces=np.zeros((3, 3)))
    db = ase.db.connect(os.fspath(directory / "train.aselmdb"), type="aselmdb")
    try:
        db.write(bad, data={"charge": 0, "spin": 1})
    finally:
        db.close()
    return directory / "train.aselmdb"


@pytest.mark.slow
def test_new_user_run(data, tmp_path):
    raw_train = _raw_with_a_bad_structure(data, tmp_path / "mydata")
    raw_val = data["raw_train"].parent / "val.aselmdb"
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    result = run([PYTHON, "launcher/train.py", *TINY, "--train", str(raw_train), "--val", str(raw_val),
                  "--atoms-per-batch", "100", "--max-atoms", "600", "--checkpoint-fraction", "0.34",
                  "--max-val-structures", "4", "--keep-engine-state", "1", "--run-dir", str(run_dir)],
                 env={"SYMSCALE_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    # every long phase announced and timed
    for phase in ("converting the train split", "converting the val split", "building the DeepSpeed engine",
                  "validation", "validation on the whole split", "writing checkpoint"):
        assert phase in out, (phase, out)
    assert "done in" in out
    # the rejected structure: on the terminal, in the run log and in every checkpoint's metadata
    assert "conversion rejected 1 structure(s) (coincident atoms: 1)" in out
    start = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert start["data_rejected"]["train"]["rejected"] == 1
    assert start["disk"]["needed_bytes"] > 0 and start["disk"]["free_bytes"] > start["disk"]["needed_bytes"]
    checkpoints = sorted((run_dir / "checkpoints").glob("step-????????"))
    assert len(checkpoints) == 3
    for ck in checkpoints:
        meta = read_metadata(ck)
        assert meta["data_rejected"]["train"] == {**start["data_rejected"]["train"]}
        assert meta["val_data_hash"] and (ck / "model.safetensors").is_file()
    # the engine state of the last checkpoint only (--keep-engine-state 1); weights of all
    assert [(ck / "deepspeed").is_dir() for ck in checkpoints] == [False, False, True]
    # shards in the project's cache keyed by the inputs, nothing written beside the user's data
    assert [p.name for p in (tmp_path / "mydata").iterdir() if not p.name.endswith("-lock")] == ["train.aselmdb"]
    assert sorted(p.name.split("-")[0] for p in (cache / "shards").iterdir()) == ["train", "val"]
    # MFU against CPU time: a loaded machine cannot push it above 100 %
    throughput = read_metadata(checkpoints[-1])["throughput"]
    assert 0 < throughput["mfu"] < 1 and throughput["cpu_time_s"] > 0 and "CPU-second" in throughput["peak_source"]


def _one_error_line(result, launcher: str) -> None:
    both = result.stdout + result.stderr
    errors = [line for line in both.splitlines() if line.startswith("error:")]
    assert result.returncode != 0
    assert len(errors) == 1 and "--train" in errors[0] and "no input files found" in errors[0], both[-3000:]
    ours = [f'File "{REPO / room}' for room in ("launcher", "datapipe", "zoo")] + ['launcher/train.py", line']
    assert not any(frame in both for frame in ours), both[-3000:]  # no traceback from the job's own code
    if launcher != "torchrun":  # torchrun itself raises ChildFailedError (its own traceback) when a rank fails
        assert "Traceback" not in both, both[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["python", "torchrun", "deepspeed"])
def test_data_error_is_one_line_under_every_launcher(data, tmp_path, launcher):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [*TINY, "--train", str(empty), "--val", str(data["val"]), "--run-dir", str(tmp_path / "run")]
    bin_dir = os.path.dirname(PYTHON)
    command = {
        "python": [PYTHON, "launcher/train.py"],
        "torchrun": [os.path.join(bin_dir, "torchrun"), "--nproc_per_node", "2", "--master_port", free_port(),
                     "launcher/train.py"],
        "deepspeed": [os.path.join(bin_dir, "deepspeed"), "--num_gpus", "2", "--master_port", free_port(),
                      "launcher/train.py"],
    }[launcher]
    result = run([*command, *args], env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "SYMSCALE_CACHE": str(tmp_path)})
    _one_error_line(result, launcher)


def test_cpu_mfu_is_against_cpu_time():
    from launcher.throughput import rates

    # 10 s of wall time but only 2 CPU-seconds given to the job (a busy machine): MFU counts the 2
    speed = rates(10.0, atoms=100, structures=10, flops=1e9, peak=1e9, cpu_seconds=2.0)
    assert speed["mfu"] == 0.5 and speed["flops_per_s"] == 1e8
    assert rates(10.0, 100, 10, 1e9, peak=1e9)["mfu"] == 0.1  # GPUs: against wall time
