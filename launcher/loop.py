"""The training job: set up, then one pass over the data budget, validating and checkpointing on the way.

:func:`train` is the whole recipe on one page: :func:`launcher.job.set_up` (ranks, shards, model,
engine, counters) → for each global batch :func:`train_step` (with ``--symmetry-loss M``, M
rotated copies appended; forward, global loss, backward, step; atoms, FLOPs and time counted) →
:meth:`Window.add` (metrics lines) → at every checkpoint step (each ``checkpoint_fraction`` of the
run and the end) :func:`validate_and_save` (averaged weights → validation on the fixed subset, at
the end also on the whole split → checkpoint with throughput, MFU and κ).
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from datapipe import keys
from launcher import checkpoint as ckpt
from launcher.config import TrainConfig
from launcher.finetune import init_metadata
from launcher.job import Job, make_loader, set_up
from launcher.loss import global_loss, loss_terms
from launcher.optim import averaged_weights
from launcher.throughput import rates, run_summary
from launcher.validate import validate
from zoo.hub.checkpoint import read_metadata
from zoo.hub.metadata import CheckpointMetadata
from zoo.models.symmetry import with_rotated_copies

#: test hook: ``SYMSCALE_KILL_AT_STEP=N`` sends SIGKILL to this process right after step N
#: (rank 0 only), to test ``--resume`` after a hard crash.
KILL_ENV = "SYMSCALE_KILL_AT_STEP"


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) one training job; returns the final validation metrics (every rank)."""
    job = set_up(cfg)
    if job.state.step >= job.total:  # resumed from the final checkpoint: nothing left (never a 2nd epoch)
        job.log.say(f"{job.resume_from} is the end of the run ({job.total} steps); nothing to do")
        job.log.close()
        return read_metadata(job.resume_from)["validation"]
    kill_at = int(os.environ.get(KILL_ENV, "0"))
    metrics, window = {}, Window()
    job.engine.train()
    tick = time.time()
    for batch in job.loader:
        step = train_step(job, batch)
        now = time.time()
        step.seconds, tick = now - tick, now
        count(job, step)
        window.add(step)
        if job.state.step % job.cfg.log_every == 0 or job.state.step in job.schedule:
            window = window.report(job)
        if job.state.step in job.schedule:
            job.state.wall_time_s = job.wall_time()
            metrics = validate_and_save(job, final=job.state.step == job.total)
            tick = time.time()
        if kill_at and job.state.step == kill_at and job.runtime.is_main:
            os.kill(os.getpid(), signal.SIGKILL)
    return finish(job, metrics)


@dataclass
class Step:
    """What one training step did, global over ranks."""

    loss: dict  # global loss terms (normalised units): loss, energy_loss, force_loss, atoms, …
    structures: int  # original training structures (rotated copies not counted)
    atoms: int  # original training atoms
    model_atoms: float  # atoms the model was evaluated on (× (M + 1) with the symmetry loss)
    flops: int  # FLOPs of the step (forward, loss, backward)
    forward_flops: int
    seconds: float = 0.0


def rotation_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The generator of the symmetry loss's rotations at ``step`` on ``rank``: a function of
    (seed, rank, step) only, so a resumed run draws the same rotations as an uninterrupted one."""
    state = np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


def train_step(job: Job, batch) -> Step:
    """Forward, global loss, backward and optimizer step on one batch (collective)."""
    cfg, runtime = job.cfg, job.runtime
    original = [float(batch.num_graphs), float(batch[keys.NATOMS].sum())]
    if cfg.symmetry_loss:  # original + M rotated copies; the global mean loss averages over them
        batch = with_rotated_copies(batch, cfg.symmetry_loss,
                                    rotation_generator(cfg.seed, job.state.step + 1, runtime.rank))
    batch = batch.to(runtime.device)
    parts = job.counter.breakdown(batch)
    prediction = job.engine(batch)
    terms = loss_terms(prediction, batch, job.force_rms)
    loss, stats = global_loss(terms, extra=[*original, float(parts["total"]), float(parts["forward"])])
    job.engine.backward(loss)
    job.engine.step()
    structures, atoms, flops, forward = (round(v) for v in stats["extra"])
    return Step(loss=stats, structures=structures, atoms=atoms, model_atoms=stats["atoms"], flops=flops,
                forward_flops=forward)


def count(job: Job, step: Step) -> None:
    """Add one step to the run's counters (the checkpointed :class:`launcher.checkpoint.TrainState`)."""
    state = job.state
    state.step += 1
    state.samples_seen += step.structures
    state.atoms_seen += step.atoms
    state.model_atoms += step.model_atoms
    state.train_time_s += step.seconds
    if state.flops is not None:  # None: resumed from a run that did not count from its start
        state.flops += step.flops
    if state.forward_flops is not None:  # None: resumed from a checkpoint before κ was measured
        state.forward_flops += step.forward_flops


@dataclass
class Window:
    """Accumulators between two ``train`` records (their ``step_flops`` sum to the cumulative count)."""

    seconds: float = 0.0
    atoms: int = 0
    structures: int = 0
    loss: float = 0.0
    steps: int = 0
    flops: int = 0
    step_flops: list = field(default_factory=list)
    last: Step | None = None

    def add(self, step: Step) -> None:
        self.step_flops.append(step.flops)
        self.seconds += step.seconds
        self.atoms += step.atoms
        self.structures += step.structures
        self.loss += step.loss["loss"]
        self.steps += 1
        self.flops += step.flops
        self.last = step

    def report(self, job: Job) -> Window:
        """Write the ``train`` record and the progress line; returns a fresh window."""
        state, stats = job.state, self.last.loss
        speed = rates(self.seconds, self.atoms, self.structures, self.flops, job.peak)
        job.log.record("train", step=state.step, loss=stats["loss"], energy_loss=stats["energy_loss"],
                       force_loss=stats["force_loss"], mean_loss=self.loss / self.steps, **speed,
                       samples_seen=state.samples_seen, atoms_seen=state.atoms_seen, flops=state.flops,
                       pflops=None if state.flops is None else state.flops / 1e15,
                       step_flops=self.step_flops, flops_since_last=self.flops)
        mfu = "" if speed["mfu"] is None else f"  MFU {100 * speed['mfu']:.2f}%"
        job.log.step(state.step, f"loss {self.loss / self.steps:.4f}  {speed['atoms_per_s']:,.0f} atoms/s{mfu}")
        return Window()


def validate_and_save(job: Job, final: bool) -> dict:
    """Averaged weights → validation on the fixed subset (and the full split at the end) → checkpoint."""
    cfg, runtime, splits, state, log = job.cfg, job.runtime, job.splits, job.state, job.log
    averaged_weights(job.engine, job.eval_model)
    val_loader = make_loader(splits.val, cfg, runtime, job.cutoff, train=False, max_structures=cfg.max_val_structures)
    metrics = validate(job.eval_model, val_loader, runtime.device, job.force_rms)
    log.record("val", step=state.step, samples_seen=state.samples_seen, atoms_seen=state.atoms_seen,
               flops=state.flops, **metrics)
    log.say(f"step {state.step}: val loss {metrics['loss']:.4f}, energy MAE "
            f"{metrics['energy_mae_mev_per_atom']:.2f} meV/atom, force MAE {metrics['force_mae_mev_per_A']:.1f} "
            f"meV/Å (zero-force {metrics['zero_force_mae_mev_per_A']:.1f})")
    full = validate_full(job, metrics) if final else None
    path = ckpt.save(job.run_dir, state.step, job.engine, job.eval_model, state, _jsonable(job.loader.state_dict()),
                     checkpoint_metadata(job, metrics, full), runtime)
    log.record("checkpoint", step=state.step, path=str(path))
    return metrics if full is None else {**metrics, "full": full}


def validate_full(job: Job, subset: dict) -> dict:
    """The whole validation split once, at the end (the fixed subset stays the scaling fits' L)."""
    cfg, state = job.cfg, job.state
    started = time.time()
    if cfg.max_val_structures is None:
        full = dict(subset)
    else:
        loader = make_loader(job.splits.val, cfg, job.runtime, job.cutoff, train=False)
        full = validate(job.eval_model, loader, job.runtime.device, job.force_rms)
    full["seconds"] = time.time() - started
    job.log.record("val_full", step=state.step, **full)
    job.log.say(f"step {state.step}: full validation split ({full['structures']} structures, {full['atoms']} atoms, "
                f"{full['seconds']:.1f} s): energy MAE {full['energy_mae_mev_per_atom']:.2f} meV/atom, force MAE "
                f"{full['force_mae_mev_per_A']:.1f} meV/Å (zero-force {full['zero_force_mae_mev_per_A']:.1f})")
    return full


def checkpoint_metadata(job: Job, metrics: dict, full: dict | None) -> dict:
    """The checkpoint's ``metadata.json`` (schema: :mod:`zoo.hub.metadata`)."""
    cfg, state = job.cfg, job.state
    config = {**cfg.to_json(), "width": cfg.width, "world_size": job.runtime.world_size, "deepspeed": job.ds_config,
              "graph_cutoff": job.cutoff, "lr_effective": cfg.learning_rate(cfg.width),
              "model_overrides": {"direct_forces": cfg.direct_forces, **cfg.model_overrides},
              "val_data_hash": job.splits.val.data_hash, "train_shards": str(job.splits.train.directory)}
    return CheckpointMetadata(
        architecture=cfg.model, width=cfg.width, config=config, N=job.n_params, samples_seen=state.samples_seen,
        atoms_seen=state.atoms_seen, step=state.step, flops=state.flops, validation=metrics,
        data_hash=job.splits.train.data_hash, code_version=job.code_version, wall_time_s=state.wall_time_s,
        steps_total=job.total, validation_full=full, world_size=job.runtime.world_size,
        throughput=run_summary(state, job.peak, job.peak_source, job.n_params, job.counter),
        symmetry_loss=cfg.symmetry_loss, init_from=init_metadata(cfg),
        atoms_seen_note="original training atoms; rotated copies of the symmetry loss not counted"
        if cfg.symmetry_loss else None,
        flops_note=None if state.flops is not None else "resumed from a run that did not count FLOPs from its start",
        extra={job.hook.metadata_key: job.pretrain} if job.hook is not None else {},
    ).to_json()


def finish(job: Job, metrics: dict) -> dict:
    """The ``end`` record and the closing line; returns the final validation metrics."""
    state = job.state
    state.wall_time_s = job.wall_time()
    job.log.record("end", step=state.step, wall_time_s=state.wall_time_s, validation=metrics,
                   throughput=run_summary(state, job.peak, job.peak_source, job.n_params, job.counter))
    full = metrics.get("full", metrics)
    job.log.say(f"done: {state.step} steps, {state.atoms_seen:,} atoms, {state.wall_time_s:.0f} s; "
                f"val force MAE {metrics.get('force_mae_mev_per_A', float('nan')):.1f} meV/Å "
                f"(zero-force {metrics.get('zero_force_mae_mev_per_A', float('nan')):.1f}); full split "
                f"({full.get('structures', 0)} structures): {full.get('force_mae_mev_per_A', float('nan')):.1f} "
                f"meV/Å (zero-force {full.get('zero_force_mae_mev_per_A', float('nan')):.1f})")
    job.log.close()
    return metrics


def _jsonable(value):
    """Loader state as plain JSON types (numpy scalars → Python numbers)."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else list(v)))
