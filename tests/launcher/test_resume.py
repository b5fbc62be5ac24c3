"""The job as a user starts it (plain ``python launcher/train.py``), killed with SIGKILL mid-run and
resumed with ``--resume``: it continues from its last checkpoint, sees each structure once, and
ends with exactly the weights of an uninterrupted run (the ``tiny_run`` fixture, the same command)."""

import json
import signal
import subprocess

import pytest
import torch
from jobs import PYTHON, REPO, run, tiny_job
from safetensors.torch import load_file

from datapipe.index import ShardIndex
from datapipe.loader import StreamingLoader
from launcher.validate import validate
from zoo.hub.checkpoint import load_model, read_metadata


def records(run_dir, kind):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["kind"] == kind]


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted_run(data, tiny_run, tmp_path):
    reference, crashed = tiny_run, tmp_path / "crashed"
    steps = records(reference, "start")[0]["steps"]
    first_checkpoint = min(r["step"] for r in records(reference, "checkpoint"))
    kill_at = first_checkpoint + 2
    assert kill_at < steps

    result = run(tiny_job(data["train"], data["val"], crashed), env={"SYMSCALE_KILL_AT_STEP": str(kill_at)})
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert max(r["step"] for r in records(crashed, "train")) == kill_at
    result = run([PYTHON, "launcher/train.py", "--resume", str(crashed)])
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = records(crashed, "resume")
    assert len(resumed) == 1 and resumed[0]["step"] == first_checkpoint

    index = ShardIndex.load(data["train"])
    final = f"checkpoints/step-{steps:08d}"
    meta_ref, meta = read_metadata(reference / final), read_metadata(crashed / final)
    # every structure once: the counters cover the split exactly, not the replayed steps twice
    assert meta["atoms_seen"] == meta_ref["atoms_seen"] == index.n_atoms
    assert meta["samples_seen"] == index.n_structures and meta["step"] == steps
    # same batches in the same order after the resume: identical losses step by step
    ref_loss = {r["step"]: r["loss"] for r in records(reference, "train")}
    after = [r for r in records(crashed, "train") if r["time"] > resumed[0]["time"]]
    assert [r["step"] for r in after] == list(range(first_checkpoint + 1, steps + 1))
    for r in after:
        assert r["loss"] == pytest.approx(ref_loss[r["step"]], rel=1e-9, abs=1e-12), r["step"]
    # and the same final (averaged) weights and validation
    a, b = load_file(reference / final / "model.safetensors"), load_file(crashed / final / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-6 * max(1.0, float(a[key].abs().max())), key
    assert meta["validation"]["loss"] == pytest.approx(meta_ref["validation"]["loss"], rel=1e-6)
    for key in ("architecture", "width", "config", "N", "flops", "data_hash", "code_version", "wall_time_s"):
        assert key in meta
    # issue 5: every checkpoint's cumulative FLOPs is the sum of the logged per-step FLOPs up to it
    # (across the crash: the steps replayed after the resume replace the lost ones)
    for run_dir in (reference, crashed):
        per_step = {}
        for r in records(run_dir, "train"):  # later records (after the resume) overwrite replayed steps
            assert len(r["step_flops"]) == 1  # --log-every 1: one step per record
            per_step.update(zip(range(r["step"] - len(r["step_flops"]) + 1, r["step"] + 1), r["step_flops"]))
        assert all(v > 0 for v in per_step.values())
        for checkpoint in sorted((run_dir / "checkpoints").glob("step-????????")):
            saved = read_metadata(checkpoint)
            assert saved["flops"] == sum(v for s, v in per_step.items() if s <= saved["step"]), checkpoint
    assert meta["flops"] == meta_ref["flops"]
    speed = meta["throughput"]
    assert speed["flops_per_s"] > 0 and 0 < speed["mfu"] < 1 and speed["peak_flops"] > 0
    assert "measured" in speed["peak_source"] and speed["kappa"] > 0 and speed["counting_overhead"] >= 0
    assert speed["atoms_per_s"] == pytest.approx(meta["atoms_seen"] / speed["train_time_s"])
    if (REPO / ".git").exists():  # the real `git describe` of this checkout, not a placeholder
        described = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=REPO, check=True,
                                   capture_output=True, text=True).stdout.strip()
        assert meta["code_version"] == described
    # the final checkpoint also validates on the whole split (here the subset is the whole split)
    assert meta["validation_full"]["structures"] == ShardIndex.load(data["val"]).n_structures
    # the saved model is the one that was validated: reloading it reproduces the recorded metrics
    model = load_model(crashed / final)
    loader = StreamingLoader(data["val"], rank=0, world_size=1, num_workers=0, shuffle=False,
                             cutoff=meta["config"]["graph_cutoff"])
    again = validate(model, loader, torch.device("cpu"), index.force_rms)
    for key in ("loss", "energy_mae_mev_per_atom", "force_mae_mev_per_A", "zero_force_mae_mev_per_A"):
        assert again[key] == pytest.approx(meta["validation"][key], rel=1e-5), key
