"""``zoo study``: the nested data ladder, the shared data, the plan, and the quick preset end to end
(interrupted with Ctrl-C once, resumed, fitted, refitted from runs.csv by ``zoo fit``)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from datapipe.index import ShardIndex
from datapipe.loader import StreamingLoader
from datapipe.plan import build_plan
from zoo.study.estimate import schedule_seconds
from zoo.study.plan import data_ladder, prepare_data, runs_of, train_command
from zoo.study.presets import PRESETS, Preset

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "omol25_sample"
ZOO = [sys.executable, "-m", "zoo.cli"]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Preset, Path, Path, Path]:
    """A preset on the smallest file of the embedded train split, its data prepared once."""
    preset = dataclasses.replace(PRESETS["quick"], name="small", train=str(SAMPLE / "train" / "data0014.aselmdb"),
                                 max_atoms=2_000, val_structures=12)
    out = tmp_path_factory.mktemp("study-small")
    train, val = prepare_data(preset, out, workers=1)
    return preset, out, train, val


def _selection(index, max_atoms):
    plan = build_plan(index, atoms_per_batch=64, shuffle=True, shuffle_buffer=64, seed=0, max_atoms=max_atoms)
    return [(shard, row) for stream in plan.streams[0] for shard, a, b in stream.pieces for row in range(a, b)]


def test_smaller_budget_selects_a_prefix_of_a_larger_one(small):
    """datapipe.plan step 2: under a budget the selection is the longest prefix of the seeded global order."""
    _, _, train, _ = small
    index = ShardIndex.load(train)
    selections = [_selection(index, d) for d in (300, 700, 1_500, 2_000)]
    for smaller, larger in zip(selections, selections[1:]):
        assert len(smaller) < len(larger)
        assert larger[:len(smaller)] == smaller
    atoms = [sum(int(index.natoms(s)[r]) for s, r in sel) for sel in selections]
    assert all(a <= d for a, d in zip(atoms, (300, 700, 1_500, 2_000)))


def test_checkpoint_ladder_is_nested_and_counted_exactly(small):
    """The k-th checkpoint of any run has seen the first s_k batches: nested sets, D_k atoms."""
    preset, _, train, _ = small
    ladder = data_ladder(preset, train)
    assert ladder["exact"] and ladder["checkpoint_steps"][-1] == ladder["steps"]
    assert ladder["atoms"] == sorted(ladder["atoms"]) and len(set(ladder["atoms"])) == len(ladder["atoms"])
    loader = StreamingLoader(train, rank=0, world_size=1, num_workers=0, atoms_per_batch=preset.atoms_per_batch, cutoff=6.0,
                             shuffle_buffer=preset.shuffle_buffer, seed=preset.seed, max_atoms=preset.max_atoms)
    assert loader.plan.plan_id == ladder["plan_id"] and loader.steps == ladder["steps"]
    seen, atoms, by_step = set(), 0, {}
    for step, batch in enumerate(loader, start=1):
        ids = list(batch.structure_id)
        assert not seen & set(ids)  # each structure once
        seen |= set(ids)
        atoms += int(batch.natoms.sum())
        by_step[step] = (frozenset(seen), atoms)
    sets = [by_step[s][0] for s in ladder["checkpoint_steps"]]
    assert all(a < b for a, b in zip(sets, sets[1:]))  # D_1 ⊂ D_2 ⊂ …
    assert [by_step[s][1] for s in ladder["checkpoint_steps"]] == ladder["atoms"]


def test_every_run_gets_the_same_data_and_validation_set(small):
    preset, out, train, val = small
    index, val_index = ShardIndex.load(train), ShardIndex.load(val)
    assert val_index.n_structures == preset.val_structures
    assert prepare_data(preset, out, workers=1)[1] == val  # idempotent: the same dirs, nothing redone
    assert ShardIndex.load(val).data_hash == val_index.data_hash
    runs = runs_of(preset, out)
    assert len(runs) == sum(len(w) for w in preset.widths.values()) == 12
    commands = [train_command(preset, r, train, val, resume=False) for r in runs]
    for cmd in commands:
        assert cmd[cmd.index("--train") + 1] == str(train) and cmd[cmd.index("--val") + 1] == str(val)
        assert cmd[cmd.index("--max-atoms") + 1] == str(preset.max_atoms)
    assert train_command(preset, runs[0], train, val, resume=True)[-2:] == ["--resume", str(runs[0].run_dir)]
    assert index.force_rms > 0 and len(index.element_references) > 0


def test_schedule_estimate_packs_longest_first():
    assert schedule_seconds([5, 4, 3, 3, 1], 2) == 8
    assert schedule_seconds([5, 4, 3, 3, 1], 1) == 16


@pytest.mark.slow
def test_paper_dry_run_prints_runs_flops_and_gpu_hours():
    out = subprocess.run([*ZOO, "study", "--preset", "paper", "--dry-run", "--out", "/nonexistent/study"],
                         capture_output=True, text=True, cwd=REPO, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "GPU-hours" in text and "MFU" in text and "3kND" in text.replace("κ", "k")
    assert sum(line.startswith(("mpnn-w", "mc-egnn-w", "gemnet-oc-w", "esen-w")) for line in text.splitlines()) >= 40


def _wait_for_checkpoint(runs_dir: Path, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if list(runs_dir.glob("*/checkpoints/step-*/metadata.json")):
            return
        if process.poll() is not None:
            raise AssertionError(f"the study ended before any checkpoint: {process.stdout.read()[-3000:]}")
        time.sleep(1)
    raise AssertionError("no checkpoint within the timeout")


@pytest.mark.slow
def test_quick_study_interrupted_resumed_fitted_and_refitted(tmp_path):
    out = tmp_path / "quick"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "160"}
    cmd = [*ZOO, "study", "--preset", "quick", "--out", str(out), "--bootstrap", "10"]
    # Ctrl-C reaches the study as it does from a terminal, even where the suite itself was started with
    # SIGINT ignored (a non-interactive shell's `make test &`), which the study would inherit
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for_checkpoint(out / "runs", first, timeout=900)
    first.send_signal(signal.SIGINT)  # Ctrl-C: the study stops its runs and exits
    log, _ = first.communicate(timeout=120)
    assert first.returncode == 130, log[-3000:]
    assert "interrupted" in log
    interrupted = [d for d in (out / "runs").iterdir() if list(d.glob("checkpoints/step-*/metadata.json"))]
    unfinished = [d for d in interrupted
                  if not any(json.loads(m.read_text())["step"] == json.loads(m.read_text())["steps_total"]
                             for m in d.glob("checkpoints/step-*/metadata.json"))]
    assert unfinished, "the interruption should leave at least one run part way"

    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    for run in unfinished:  # continued from its checkpoint, not restarted
        kinds = [json.loads(line)["kind"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert kinds.count("start") == 1 and kinds.count("resume") == 1 and kinds[-1] == "end"

    import csv

    rows = list(csv.DictReader(open(out / "runs.csv")))
    preset = PRESETS["quick"]
    assert len(rows) == 12 * len(preset.checkpoint_at)
    assert {r["run"] for r in rows} == {r.name for r in runs_of(preset, out)}
    assert len({r["data_hash"] for r in rows}) == 1 and len({r["val_data_hash"] for r in rows}) == 1
    ladders = {tuple(sorted(int(r["D"]) for r in rows if r["run"] == run)) for run in {r["run"] for r in rows}}
    assert len(ladders) == 1  # every run's checkpoints saw the same atoms
    for r in rows:
        assert float(r["L"]) > 0 and np.isclose(float(r["C"]), 3 * float(r["kappa"]) * int(r["N"]) * int(r["D"]))
        assert (out / r["checkpoint"] / "model.safetensors").is_file()

    report = (out / "report.md").read_text()
    fit = json.loads((out / "fit" / "fit.json").read_text())
    for arch, paper in (("mpnn", "0.14"), ("mc-egnn", "0.17"), ("gemnet-oc", "0.25"), ("esen", "0.4")):
        assert f"| {arch} |" in report and paper in report
        frontier = fit["groups"][arch]["frontier"]
        if frontier["converged"]:
            assert f"{frontier['gamma_c']:.3g}" in report
    assert "order" in report and (out / "learning_curves.png").stat().st_size > 10_000

    refit = subprocess.run([*ZOO, "fit", "runs.csv", "--out", "refit", "--loss-col", "L", "--group-col", "architecture",
                            "--data-unit", "atoms", "--bootstrap", "10", "--seed", "0"],
                           cwd=out, env=env, capture_output=True, text=True, timeout=1800)
    assert refit.returncode == 0, refit.stdout[-3000:] + refit.stderr[-3000:]
    again = json.loads((out / "refit" / "fit.json").read_text())
    assert again["groups"] == fit["groups"]
