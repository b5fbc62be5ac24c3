"""One rank of the multi-process check (run by tests/launcher/test_engines.py under torchrun, as the
``zero:STAGE`` cases of shard_worker.py, in the same launch as the other DeepSpeed cases).

Each rank takes an uneven share of one fixed global batch, builds the launcher's DeepSpeed engine
(for each ZeRO stage of argv, one after the other in the same ranks: one launch serves them all) and,
for two steps, compares with a one-process reference trained with plain schedule-free AdamW on the
whole batch:

- the global loss the ranks report equals the reference's loss;
- the full gradients (``safe_get_full_grad``) equal the reference's gradients of the global mean;
- the schedule-free averaged weights (``launcher.optim.averaged_weights``) equal the weights of
  the reference after ``optimizer.eval()``.

Run alone, argv: DB STAGES OUT, STAGES comma-separated (``1,2,3``). Writes ``{stage: largest relative
differences}`` as JSON to OUT (rank 0).
"""

import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from launcher.engine import setup_environment

setup_environment()

import ase.db
import torch
from deepspeed.utils import safe_get_full_grad

from datapipe.graph import batch_from_atoms
from launcher.config import TrainConfig
from launcher.engine import build_engine, init_distributed
from launcher.loss import global_loss, loss_terms
from launcher.optim import averaged_weights, build_optimizer
from zoo.registry import build


def rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def main(db_path: str, stages: list[int], out: str) -> None:
    runtime = init_distributed()
    with ase.db.connect(db_path) as db:
        atoms = [row.toatoms() for row in db.select(limit=7)]
    for a in atoms:
        a.info.update(charge=0, spin=1 + int(a.numbers.sum()) % 2)  # multiplicity fits Σ Z
    results = {str(stage): check(atoms, stage, runtime) for stage in stages}
    if runtime.is_main:
        Path(out).write_text(json.dumps(results))


def check(atoms, stage: int, runtime) -> dict:
    """The largest relative differences of one ZeRO stage's engine from the one-process reference."""
    shares = [atoms[:2], atoms[2:]]  # uneven: 2 and 5 structures
    torch.manual_seed(0)
    model = build("mpnn", 8, num_layers=1)
    model.set_normalization([0.0] + [-10.0] * 20, 0.7)
    reference = copy.deepcopy(model)
    eval_model = copy.deepcopy(model)
    cfg = TrainConfig(model="mpnn", width=8, zero_stage=stage, deepspeed_overrides={"zero_stage": stage})
    engine, _ = build_engine(cfg, model, build_optimizer(model, 1e-2), runtime)
    ref_opt = build_optimizer(reference, 1e-2)
    local = batch_from_atoms(shares[runtime.rank])
    full = batch_from_atoms(atoms)
    worst = {"loss": 0.0, "grad": 0.0, "averaged": 0.0}
    for _ in range(2):
        out_local = engine(local)
        loss, stats = global_loss(loss_terms(out_local, local, 0.7))
        engine.backward(loss)
        grads = {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters()}
        ref_opt.zero_grad()
        t = loss_terms(reference(full), full, 0.7)
        ref_loss = t.energy_sum / t.structures + t.force_sum / t.atoms
        ref_loss.backward()
        worst["loss"] = max(worst["loss"], abs(stats["loss"] - ref_loss.item()) / ref_loss.item())
        for n, p in reference.named_parameters():
            worst["grad"] = max(worst["grad"], rel(grads[n], p.grad))
        engine.step()
        ref_opt.step()
    averaged_weights(engine, eval_model)
    ref_opt.eval()
    for (n, p), (_, q) in zip(eval_model.named_parameters(), reference.named_parameters()):
        worst["averaged"] = max(worst["averaged"], rel(p, q))
    return worst


if __name__ == "__main__":
    main(sys.argv[1], [int(s) for s in sys.argv[2].split(",")], sys.argv[3])
