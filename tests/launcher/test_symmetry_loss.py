"""``--symmetry-loss M``: the model sees each batch and M rotated copies, FLOPs are counted on the
extended batch (× (M+1)), atoms seen count the original data only, and the rotations are a
function of (seed, rank, step) so that a resumed run draws the same ones."""

import json

import pytest
import torch
from jobs import PYTHON, TINY, run

from datapipe import keys
from datapipe.loader import StreamingLoader
from launcher.loop import rotation_generator
from zoo.hub.checkpoint import read_metadata
from zoo.flops.trace import count_step
from zoo.registry import build
from zoo.models.symmetry import with_rotated_copies

M = 2


@pytest.mark.slow
def test_symmetry_loss_counts(data, tmp_path):
    run_dir = tmp_path / "sym"
    result = run([PYTHON, "launcher/train.py", *TINY, "--train", str(data["train"]), "--val", str(data["val"]),
                  "--atoms-per-batch", "100", "--max-atoms", "300", "--symmetry-loss", str(M), "--log-every", "1",
                  "--checkpoint-fraction", "1", "--max-val-structures", "4", "--run-dir", str(run_dir)])
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["kind"] == "train"]
    meta = read_metadata(max((run_dir / "checkpoints").glob("step-????????")))
    assert meta["symmetry_loss"] == M and meta["config"]["symmetry_loss"] == M

    # the same stream the job read (rank 0 of 1), and the step FLOPs of its extended batches
    model = build("mpnn", 8, num_layers=1)
    loader = StreamingLoader(data["train"], rank=0, world_size=1, num_workers=0, atoms_per_batch=100,
                             cutoff=model.cutoff, shuffle_buffer=256, seed=0, max_atoms=300, shuffle=True)
    batches = list(loader)
    assert len(batches) == len(train) == meta["step"]
    atoms = sum(int(b[keys.NATOMS].sum()) for b in batches)
    assert meta["atoms_seen"] == atoms and meta["samples_seen"] == sum(b.num_graphs for b in batches)
    for step, (batch, record) in enumerate(zip(batches, train), start=1):
        extended = with_rotated_copies(batch, M, rotation_generator(0, step, 0))
        assert extended.num_graphs == (M + 1) * batch.num_graphs
        # the copies are the original turned by the step's rotations, the same ones on every call
        again = with_rotated_copies(batch, M, rotation_generator(0, step, 0))
        assert torch.equal(extended[keys.POSITIONS], again[keys.POSITIONS])
        counted = count_step(model, extended)
        total = counted.forward + counted.force_backward + counted.backward + counted.loss
        assert record["step_flops"] == [total]
        plain = count_step(model, batch)
        ratio = total / (plain.forward + plain.force_backward + plain.backward + plain.loss)
        assert ratio == pytest.approx(M + 1, rel=1e-3)
    # κ: forward FLOPs over the atoms the model saw (× (M+1)), not the data's atoms
    assert meta["throughput"]["kappa"] > 0
    assert meta["flops"] == sum(r["step_flops"][0] for r in train)
