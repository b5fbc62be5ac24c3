"""``launcher/train.py --init-from``: a run started from a checkpoint, under one process and 2 ranks with
ZeRO-1 and ZeRO-2. Frozen parameters end bit-identical to the pretrained ones (so the weights were
loaded and the freeze held through the engine); the others moved; the metadata records the start."""

from __future__ import annotations

import pytest
from jobs import PYTHON, free_port, run
from safetensors.torch import load_file

from zoo.hub.checkpoint import read_metadata


def common(data, run_dir):
    return ["--train", str(data["train"]), "--val", str(data["val"]), "--atoms-per-batch", "100",
            "--checkpoint-fraction", "1", "--run-dir", str(run_dir), "--max-atoms", "1500",
            "--max-val-structures", "8"]


@pytest.fixture(scope="module")
def pretrained(tiny_run):
    """The last checkpoint of a finished run of :data:`jobs.TINY` (the ``tiny_run`` fixture)."""
    return sorted((tiny_run / "checkpoints").glob("step-????????"))[-1]


LAUNCH = {
    "one-process-zero2": lambda: [PYTHON, "launcher/train.py", "--zero-stage", "2"],
    "two-ranks-zero1": lambda: [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                                free_port(), "launcher/train.py", "--zero-stage", "1"],
    "two-ranks-zero2": lambda: [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                                free_port(), "launcher/train.py", "--zero-stage", "2"],
}


@pytest.mark.slow
@pytest.mark.parametrize("engine", sorted(LAUNCH))
def test_init_from_loads_freezes_and_records(data, pretrained, tmp_path, engine):
    run_dir = tmp_path / "ft"
    result = run([*LAUNCH[engine](), "--init-from", str(pretrained), "--freeze", "atom_embedding.*",
                  "--freeze", "layers.0.update.*", *common(data, run_dir)])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    final = sorted((run_dir / "checkpoints").glob("step-????????"))[-1]
    before, after = load_file(pretrained / "model.safetensors"), load_file(final / "model.safetensors")
    frozen = [k for k in before if k.startswith(("atom_embedding.", "layers.0.update."))]
    assert frozen and all((before[k] == after[k]).all() for k in frozen)
    trained = [k for k in before if k.startswith("layers.0.target.")]
    assert trained and all((before[k] != after[k]).any() for k in trained)
    meta, pre = read_metadata(final), read_metadata(pretrained)
    record = meta["init_from"]
    assert record["weights_sha256"] == pre["weights_sha256"] and record["freeze"] == ["atom_embedding.*", "layers.0.update.*"]
    assert record["frozen_parameters"] > 0 and "re-fitted" in record["normalization"]
    assert meta["architecture"] == "mpnn" and meta["width"] == 8
    assert meta["config"]["lr_effective"] == pytest.approx(0.3 * pre["config"]["lr_effective"])


@pytest.mark.slow  # a job of its own, after the pretraining job of `tiny_run`
def test_contradicting_flags_refused(data, pretrained, tmp_path):
    result = run([PYTHON, "launcher/train.py", "--init-from", str(pretrained), "--width", "16",
                  *common(data, tmp_path / "x")])
    assert result.returncode != 0
    assert "--width 16 (checkpoint: 8)" in result.stderr


@pytest.mark.slow  # a job of its own, after the pretraining job of `tiny_run`
def test_freeze_pattern_matching_nothing_refused(data, pretrained, tmp_path):
    result = run([PYTHON, "launcher/train.py", "--init-from", str(pretrained), "--freeze", "nothing.*",
                  *common(data, tmp_path / "x")])
    assert result.returncode != 0 and "matches no parameter" in result.stderr


@pytest.mark.slow  # a job of its own, after the pretraining job of `tiny_run`
def test_keep_normalization_keeps_the_pretrained_references(data, pretrained, tmp_path):
    """Fine-tuned on other data (the validation split), whose own references differ from the pretrained ones."""
    import torch

    from datapipe.index import ShardIndex

    run_dir = tmp_path / "keep"
    args = common(data, run_dir)
    args[1] = str(data["val"])  # --train
    result = run([PYTHON, "launcher/train.py", "--init-from", str(pretrained), "--keep-normalization", *args])
    assert result.returncode == 0, result.stderr[-3000:]
    final = sorted((run_dir / "checkpoints").glob("step-????????"))[-1]
    key = "normalization.element_references"
    kept, pre = load_file(final / "model.safetensors")[key], load_file(pretrained / "model.safetensors")[key]
    assert (kept == pre).all()
    refit = torch.tensor(ShardIndex.load(data["val"]).element_references, dtype=torch.float64)
    assert not torch.allclose(refit, pre)
    assert read_metadata(final)["init_from"]["normalization"] == "kept from the checkpoint"


@pytest.mark.slow  # a job of its own (refused at start), after the pretraining job of `tiny_run`
def test_a_fresh_run_in_another_runs_directory_is_refused(data, pretrained):
    """``--run-dir`` of an existing run (here the pretraining run, ``tiny_run``: mpnn width 8 with one layer) for
    a run of another width is refused at start naming the run that owns it; its config is left as it was
    (continuing a run goes through --resume, tested in test_resume.py and test_faults.py)."""
    run_dir = pretrained.parent.parent
    config, listing = (run_dir / "config.json").read_text(), sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    result = run([PYTHON, "launcher/train.py", "--model", "mpnn", "--width", "16", *common(data, run_dir)])
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert f"--run-dir {run_dir}: it holds another run, mpnn width 8" in last, last
    assert "width 8 there, 16 now" in last and f"--resume {run_dir}" in last, last
    assert (run_dir / "config.json").read_text() == config
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == listing
