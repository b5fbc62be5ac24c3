"""The training job: build everything, then one pass over the data budget.

``train(cfg)`` reads as the recipe: set up ranks → shards → model with the data's normalisation →
schedule-free AdamW → DeepSpeed engine → (resume) → for each global batch: forward, global loss,
backward, step, count → at every checkpoint step (each ``checkpoint_fraction`` of the run and the
end): averaged weights → validation → checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import torch

from launcher import checkpoint as ckpt
from launcher.config import REPO, TrainConfig, deepspeed_config
from launcher.data import prepare
from launcher.engine import broadcast_object, build_engine, init_distributed
from launcher.loss import global_loss, loss_terms
from launcher.optim import averaged_weights, build_optimizer
from launcher.progress import RunLog
from launcher.validate import validate
from zoo.checkpoint import read_metadata
from zoo.registry import build, get_spec

#: test hook: ``SYMSCALE_KILL_AT_STEP=N`` sends SIGKILL to this process right after step N
#: (rank 0 only), to test ``--resume`` after a hard crash.
KILL_ENV = "SYMSCALE_KILL_AT_STEP"


def code_version() -> str:
    """``git describe --always --dirty`` of the repository, else the installed package version."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=REPO,
                             capture_output=True, text=True, timeout=10, check=False)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"symscale {version('symscale')}"
    except PackageNotFoundError:
        return "unknown"


def checkpoint_steps(total: int, fraction: float) -> set[int]:
    """Steps after which to validate and checkpoint: every ``fraction`` of ``total``, and the last."""
    count = max(1, round(1.0 / fraction))
    return {max(1, round(k * total / count)) for k in range(1, count + 1)} | {total}


def make_flop_counter(model, direct_forces: bool):
    """The zoo's ``StepFlopCounter`` (issue 5) when it exists, else None (FLOPs are then not counted)."""
    try:
        from zoo.flop_counter import StepFlopCounter
    except ImportError:
        try:
            from zoo.flops import StepFlopCounter
        except ImportError:
            return None
    return StepFlopCounter(model, direct_forces=direct_forces)


def step_flops(counter, batch) -> int | None:
    """FLOPs of one whole training step (forward + backward) of this rank's ``batch``."""
    return None if counter is None else int(counter.step_flops(batch))


def make_loader(index, cfg: TrainConfig, runtime, cutoff: float, train: bool, max_atoms=None,
                max_structures=None):
    """This rank's loader: the training stream (shuffled, budget ``max_atoms``) or the validation
    set (index order; the first ``max_structures`` structures, the same subset at every checkpoint
    and for any number of ranks)."""
    from datapipe.loader import StreamingLoader

    return StreamingLoader(
        index.directory,
        rank=runtime.rank,
        world_size=runtime.world_size,
        num_workers=cfg.num_workers,
        atoms_per_batch=cfg.atoms_per_batch,
        cutoff=cutoff,
        shuffle_buffer=cfg.shuffle_buffer,
        seed=cfg.seed,
        max_atoms=max_atoms,
        max_structures=max_structures,
        shuffle=train,
    )


def _resolve_run(cfg: TrainConfig, runtime) -> tuple[TrainConfig, Path, Path | None]:
    """(config, run dir, checkpoint to resume or None); a resumed run takes its saved config."""
    if cfg.resume:
        checkpoint = ckpt.find(cfg.resume)
        run_dir = ckpt.run_dir_of(checkpoint)
        saved = TrainConfig.from_json(json.loads((run_dir / "config.json").read_text()))
        saved.resume = str(checkpoint)
        return saved, run_dir, checkpoint
    width = cfg.width or get_spec(cfg.model).default_width
    cfg.width = width
    name = cfg.run_dir or broadcast_object(
        str(REPO / "runs" / f"{cfg.model}-w{width}-{time.strftime('%Y%m%d-%H%M%S')}"))
    return cfg, Path(name), None


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) one training job; returns the final validation metrics (every rank)."""
    runtime = init_distributed()
    start_time = time.time()
    cfg, run_dir, resume_from = _resolve_run(cfg, runtime)
    deepspeed_config(cfg, runtime.bf16_supported)  # refuse a bad engine configuration before any work
    splits = prepare(cfg, runtime)
    torch.manual_seed(cfg.seed)
    model = build(cfg.model, cfg.width, direct_forces=cfg.direct_forces, **cfg.model_overrides)
    model.set_normalization(splits.train.element_references, splits.train.force_rms)
    sigma = splits.train.force_rms
    cutoff = float(max(getattr(model, "graph_cutoffs", (model.cutoff,))))
    loader = make_loader(splits.train, cfg, runtime, cutoff, train=True, max_atoms=cfg.max_atoms)
    total = int(loader.steps)
    lr = cfg.learning_rate(cfg.width)
    optimizer = build_optimizer(model, lr, cfg.betas, cfg.weight_decay, round(cfg.warmup_fraction * total))
    engine, ds_config = build_engine(cfg, model, optimizer, runtime)
    eval_model = build(cfg.model, cfg.width, direct_forces=cfg.direct_forces, **cfg.model_overrides)
    eval_model.set_normalization(splits.train.element_references, sigma)
    eval_model.to(runtime.device)
    n_params = sum(p.numel() for p in eval_model.parameters() if p.requires_grad)

    state = ckpt.TrainState()
    if resume_from is not None:
        saved_hash = read_metadata(resume_from)["data_hash"]
        if saved_hash != splits.train.data_hash:
            raise ValueError(f"--resume {resume_from}: the training shards changed (data hash {saved_hash[:12]} "
                             f"in the checkpoint, {splits.train.data_hash[:12]} now); a resumed run needs the same data")
        state, loader_state = ckpt.load(resume_from, engine, runtime)
        loader.load_state_dict(loader_state)
    elif runtime.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_json(), indent=1) + "\n")
    wall_offset = state.wall_time_s
    counter = make_flop_counter(eval_model, cfg.direct_forces)
    if counter is not None and state.flops is None:
        state.flops = 0
    schedule = checkpoint_steps(total, cfg.checkpoint_fraction)
    log = RunLog(run_dir, total, state.step, runtime.is_main)
    log.record("resume" if resume_from else "start", step=state.step, steps=total, world_size=runtime.world_size,
               N=n_params, lr=lr, zero_stage=ds_config["zero_optimization"]["stage"],
               bf16=ds_config["bf16"]["enabled"], device=str(runtime.device), data_hash=splits.train.data_hash,
               train_structures=splits.train.n_structures, train_atoms=splits.train.n_atoms,
               checkpoint=str(resume_from) if resume_from else None, flops_counted=counter is not None)
    log.say(f"[bold]{cfg.model}[/] width {cfg.width}: N = {n_params:,} parameters, {total} steps × "
            f"{runtime.world_size} rank(s), lr {lr:.3g}, ZeRO-{ds_config['zero_optimization']['stage']}, "
            f"{'bf16' if ds_config['bf16']['enabled'] else 'fp32'} on {runtime.device}; run dir {run_dir}")
    kill_at = int(os.environ.get(KILL_ENV, "0"))
    metrics = {}
    window = _new_window()
    if state.step >= total:  # resumed from the final checkpoint: nothing left (never a 2nd epoch)
        log.say(f"{resume_from} is the end of the run ({total} steps); nothing to do")
        log.close()
        return read_metadata(resume_from)["validation"]

    engine.train()
    for batch in loader:
        batch = batch.to(runtime.device)
        flops = step_flops(counter, batch)
        prediction = engine(batch)
        terms = loss_terms(prediction, batch, sigma)
        loss, stats = global_loss(terms, extra=[float(flops or 0)])
        engine.backward(loss)
        engine.step()
        state.step += 1
        state.samples_seen += stats["structures"]
        state.atoms_seen += stats["atoms"]
        if state.flops is not None:
            state.flops += int(stats["extra"][0])
        for key, value in (("atoms", stats["atoms"]), ("structures", stats["structures"]),
                           ("loss", stats["loss"]), ("steps", 1), ("flops", stats["extra"][0])):
            window[key] += value
        if state.step % cfg.log_every == 0 or state.step in schedule:
            seconds = max(time.time() - window["time"], 1e-9)
            log.record("train", step=state.step, loss=stats["loss"], energy_loss=stats["energy_loss"],
                       force_loss=stats["force_loss"], mean_loss=window["loss"] / window["steps"],
                       atoms_per_s=window["atoms"] / seconds, structures_per_s=window["structures"] / seconds,
                       samples_seen=state.samples_seen, atoms_seen=state.atoms_seen, flops=state.flops,
                       flops_since_last=int(window["flops"]) if counter is not None else None,
                       flops_per_s=window["flops"] / seconds if counter is not None else None)
            log.step(state.step, f"loss {window['loss'] / window['steps']:.4f}  "
                                 f"{window['atoms'] / seconds:,.0f} atoms/s")
            window = _new_window()
        if state.step in schedule:
            state.wall_time_s = wall_offset + time.time() - start_time
            metrics = _validate_and_save(cfg, run_dir, engine, eval_model, loader, splits, state, ds_config,
                                         runtime, log, n_params, cutoff)
        if kill_at and state.step == kill_at and runtime.is_main:
            os.kill(os.getpid(), signal.SIGKILL)

    state.wall_time_s = wall_offset + time.time() - start_time
    log.record("end", step=state.step, wall_time_s=state.wall_time_s, validation=metrics)
    log.say(f"done: {state.step} steps, {state.atoms_seen:,} atoms, {state.wall_time_s:.0f} s; "
            f"val force MAE {metrics.get('force_mae_mev_per_A', float('nan')):.1f} meV/Å "
            f"(zero-force {metrics.get('zero_force_mae_mev_per_A', float('nan')):.1f})")
    log.close()
    return metrics


def _new_window() -> dict:
    """Accumulators between two ``train`` records (their FLOPs sum to the cumulative count)."""
    return {"time": time.time(), "atoms": 0, "structures": 0, "loss": 0.0, "steps": 0, "flops": 0.0}


def _validate_and_save(cfg, run_dir, engine, eval_model, loader, splits, state, ds_config, runtime, log,
                       n_params, cutoff) -> dict:
    """Averaged weights → validation on the held-out split → checkpoint."""
    averaged_weights(engine, eval_model)
    val_loader = make_loader(splits.val, cfg, runtime, cutoff, train=False, max_structures=cfg.max_val_structures)
    metrics = validate(eval_model, val_loader, runtime.device, splits.train.force_rms)
    log.record("val", step=state.step, samples_seen=state.samples_seen, atoms_seen=state.atoms_seen,
               flops=state.flops, **metrics)
    log.say(f"step {state.step}: val loss {metrics['loss']:.4f}, energy MAE "
            f"{metrics['energy_mae_mev_per_atom']:.2f} meV/atom, force MAE {metrics['force_mae_mev_per_A']:.1f} "
            f"meV/Å (zero-force {metrics['zero_force_mae_mev_per_A']:.1f})")
    config = {**cfg.to_json(), "width": cfg.width, "world_size": runtime.world_size, "deepspeed": ds_config,
              "graph_cutoff": cutoff, "lr_effective": cfg.learning_rate(cfg.width),
              "model_overrides": {"direct_forces": cfg.direct_forces, **cfg.model_overrides},
              "val_data_hash": splits.val.data_hash, "train_shards": str(splits.train.directory)}
    metadata = {
        "architecture": cfg.model,
        "width": cfg.width,
        "config": config,
        "N": n_params,
        "samples_seen": state.samples_seen,
        "atoms_seen": state.atoms_seen,
        "step": state.step,
        "steps_total": int(loader.steps),
        "flops": state.flops,
        "flops_note": None if state.flops is not None else "no FLOP counter (zoo.flops) was available",
        "validation": metrics,
        "data_hash": splits.train.data_hash,
        "code_version": code_version(),
        "wall_time_s": state.wall_time_s,
        "world_size": runtime.world_size,
    }
    path = ckpt.save(run_dir, state.step, engine, eval_model, state, _jsonable(loader.state_dict()),
                     metadata, runtime)
    log.record("checkpoint", step=state.step, path=str(path))
    return metrics


def _jsonable(value):
    """Loader state as plain JSON types (numpy scalars → Python numbers)."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else list(v)))

