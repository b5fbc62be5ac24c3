"""One rank of the engine checks (run by tests/launcher/test_engines.py under torchrun).

argv: DB OUT CASE [CASE …], each CASE ``ENGINE:STAGE:FORCES:MODEL:WIDTH[:ac][:offload]`` or ``zero:STAGE``
(:func:`zero_worker.check`: the MPNN under the launcher's own DeepSpeed engine, ZeRO-``STAGE``), checked one
after the other in the same two ranks (their start-up is paid once), all of one ENGINE (the process
group is set up for it; ``zero`` cases are DeepSpeed's). ENGINE ``deepspeed`` (ZeRO STAGE, parameter
persistence threshold 0 so that ZeRO-3 really partitions every tensor; built inside
``zero.Init`` as the launcher does) or ``fsdp`` (the launcher's sharding plan for FORCES
``direct``/``conservative``; built on the meta device and filled from rank 0). ``ac``: with
per-block activation checkpointing; ``offload``: DeepSpeed optimizer offload (and parameter offload
under ZeRO-3) to the CPU, with the schedule-free client optimizer; FSDP2's ``CPUOffloadPolicy``. Each rank takes an uneven share of one global batch; for three
steps the global loss and the full gradients are compared with a one-process reference (plain
schedule-free AdamW on the whole batch, same seed). Writes the largest relative differences and
what was partitioned as JSON to OUT (rank 0), ``{CASE: {...}}``.
"""

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from launcher.engine import setup_environment

setup_environment()

import ase.db
import torch

from datapipe.graph import batch_from_atoms
from launcher.config import TrainConfig
from launcher.dsconfig import deepspeed_config
from launcher.engine import build_engine, init_distributed
from launcher.loss import global_loss, loss_terms
from launcher.materialise import build_training_model
from launcher.optim import build_optimizer
from launcher.parallelize import checkpoint_blocks
from zoo.registry import build

REFS, RMS, LR = [0.0] + [-10.0] * 20, 0.7, 1e-3


def rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def main(db_path: str, out: str, cases: list[str]) -> None:
    engines = {"deepspeed" if case.startswith("zero:") else case.split(":")[0] for case in cases}
    if len(engines) != 1:
        raise SystemExit(f"one engine per launch, got {sorted(engines)}")
    runtime = init_distributed(engine=engines.pop())
    with ase.db.connect(db_path) as db:
        atoms = [row.toatoms() for row in db.select(limit=7)]
    for a in atoms:  # neutral, lowest multiplicity that fits the electron count (datapipe.charge_spin)
        a.info.update(charge=0, spin=1 + int(a.numbers.sum()) % 2)
    results = {}
    for case in cases:
        if case.startswith("zero:"):
            import zero_worker  # beside this script; imports DeepSpeed, which an FSDP launch never does

            results[case] = zero_worker.check(atoms, int(case.split(":")[1]), runtime)
            continue
        engine_name, stage, forces, name, width, *extra = case.split(":")
        results[case] = check(atoms, runtime, engine_name, int(stage), forces, name, int(width), "ac" in extra,
                              "offload" in extra)
    if runtime.is_main:
        Path(out).write_text(json.dumps(results))


def check(atoms, runtime, engine_name, stage, forces, name, width, ac, offload) -> dict:
    """Three steps of one engine configuration against the one-process reference: the largest differences."""
    direct = forces == "direct"

    def fresh():
        model = build(name, width, direct_forces=direct)
        model.set_normalization(REFS, RMS)
        return model

    torch.manual_seed(0)
    reference = fresh()
    ref_opt = build_optimizer(reference, LR)
    cfg = TrainConfig(model=name, width=width, direct_forces=direct, zero_stage=stage, precision="fp32",
                      deepspeed_overrides={"zero_stage": stage, "precision": "fp32"},
                      offload_optimizer=offload, offload_params=offload and stage == 3)
    partitioned = 0
    if engine_name == "deepspeed":
        config = Path(tempfile.mkdtemp()) / "ds.json"
        config.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
        cfg.deepspeed_config = str(config)
        model = build_training_model(cfg, deepspeed_config(cfg, False))
        model.set_normalization(REFS, RMS)
        if ac:
            checkpoint_blocks(model)
        engine, _ = build_engine(cfg, model, build_optimizer(model, LR), runtime)
        from deepspeed.utils import safe_get_full_grad

        def grads():
            return {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters()}
        if stage == 3:
            partitioned = sum(p.ds_tensor.numel() < p.ds_numel for p in engine.module.parameters())
    else:
        from launcher.fsdp import build_fsdp_engine

        engine, _ = build_fsdp_engine(cfg, runtime, LR, 0, (REFS, RMS))
        if ac:
            checkpoint_blocks(engine.module)

        def grads():
            return {n: None if p.grad is None else p.grad.full_tensor() for n, p in engine.module.named_parameters()}
        partitioned = sum(p.to_local().numel() < p.numel() for p in engine.module.parameters())
    shares = [atoms[:2], atoms[2:]]  # uneven: 2 and 5 structures
    local, full = batch_from_atoms(shares[runtime.rank]), batch_from_atoms(atoms)
    worst = {"loss": 0.0, "grad": 0.0, "partitioned": int(partitioned),
             "parameters": len(list(reference.parameters()))}
    for _ in range(3):
        loss, stats = global_loss(loss_terms(engine(local), local, RMS))
        engine.backward(loss)
        got = grads()
        ref_opt.zero_grad()
        t = loss_terms(reference(full), full, RMS)
        ref_loss = t.energy_sum / t.structures + t.force_sum / t.atoms
        ref_loss.backward()
        worst["loss"] = max(worst["loss"], abs(stats["loss"] - ref_loss.item()) / ref_loss.item())
        for n, p in reference.named_parameters():
            if p.grad is None:  # unused in this force mode (e.g. a direct head under conservative forces)
                assert got[n] is None or not got[n].any(), n
                continue
            worst["grad"] = max(worst["grad"], rel(got[n], p.grad))
        engine.step()
        ref_opt.step()
    return worst


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
