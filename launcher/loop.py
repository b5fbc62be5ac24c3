"""The training job: set up, then one pass over the data budget, validating and checkpointing on the way.

:func:`train` is the whole recipe on one page: :func:`launcher.job.set_up` (ranks, shards, model,
engine, counters) → for each global batch :func:`train_step` (with ``--symmetry-loss M``, M
rotated copies appended; forward, global loss, backward, step; atoms, FLOPs and time counted) →
:meth:`Window.add` (metrics lines) → at every checkpoint step (each ``checkpoint_fraction`` of the
run and the end) :func:`validate_and_save` (averaged weights → validation on rank 0, which alone holds
them, on the fixed subset, at the end also on the whole split → checkpoint with throughput, MFU and κ; the engine state of all
but the last ``--keep-engine-state`` checkpoints pruned, :mod:`launcher.retention`). Validation and
checkpoint writing show their own progress (:meth:`launcher.progress.RunLog.phase`).

Faults are met by every rank alike (:mod:`launcher.health`): an unreadable shard stops the run
naming it and the checkpoint to resume from (or, with ``--skip-bad-shards``, its structures are
skipped and counted); a non-finite loss or gradient skips the step on every rank (counted, logged
with the batch's structure ids, recorded in the checkpoint's ``skipped``; the run stops after
``--max-consecutive-skips`` in a row); a rank that dies is named by the others
(:func:`launcher.health.stop_together`). ``SYMSCALE_FAULT`` injects these faults for the tests
(:mod:`launcher.faults`).
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
from launcher import faults, health
from launcher.config import TrainConfig
from launcher.data import rejected_summary
from launcher.engine import all_gather_objects, all_reduce_sum
from launcher.finetune import init_metadata
from launcher.job import Job, make_loader, set_up
from launcher.loss import global_loss, loss_terms
from launcher.materialise import evaluation_model
from launcher.sharding import engine_record, precision_record
from launcher.optim import averaged_weights
from launcher.retention import gb, prune_engine_state
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
    tick, cpu_tick = time.time(), time.process_time()
    with health.stop_together(job.runtime.rank, job.runtime.world_size, lambda: job.state.step, job.run_dir):
        for batch in health.batches(job.loader):  # an unreadable shard: a DataFault, met by every rank
            faults.maybe_kill("exit", job.state.step + 1, job.runtime.rank)
            step = train_step(job, batch)
            now, cpu_now = time.time(), time.process_time()
            step.seconds, step.cpu_seconds, tick, cpu_tick = now - tick, cpu_now - cpu_tick, now, cpu_now
            count(job, step)
            window.add(step)
            if job.state.step % job.cfg.log_every == 0 or job.state.step in job.schedule:
                window = window.report(job)
            if job.state.step in job.schedule:
                job.state.wall_time_s = job.wall_time()
                metrics = validate_and_save(job, final=job.state.step == job.total)
                tick, cpu_tick = time.time(), time.process_time()
            if kill_at and job.state.step == kill_at and job.runtime.is_main:
                os.kill(os.getpid(), signal.SIGKILL)
    return finish(job, metrics)


@dataclass
class Step:
    """What one training step did, global over ranks."""

    loss: dict  # global loss terms (normalised units): loss, energy_loss, force_loss, atoms, …
    structures: int  # original training structures trained on (rotated copies not counted)
    atoms: int  # original training atoms trained on
    model_atoms: float  # atoms the model was evaluated on (× (M + 1) with the symmetry loss)
    flops: int  # FLOPs of the step (forward, loss, backward; those spent on a skipped step)
    forward_flops: int
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's CPU time in the step
    skip: dict | None = None  # the record of a step every rank skipped (launcher.health.skip_record)
    unread: tuple[int, int] = (0, 0)  # (structures, atoms) of unreadable shards skipped (--skip-bad-shards)
    unread_records: list = field(default_factory=list)


def rotation_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The generator of the symmetry loss's rotations at ``step`` on ``rank``: a function of
    (seed, rank, step) only, so a resumed run draws the same rotations as an uninterrupted one."""
    state = np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


def train_step(job: Job, batch) -> Step:
    """Forward, global loss, backward and optimizer step on one batch (collective).

    Every rank takes the same decision (:mod:`launcher.health`): stop if a rank's data failed,
    skip the step if a rank has no readable structure, or if the global loss or any gradient is
    not finite.
    """
    cfg, runtime, step_number = job.cfg, job.runtime, job.state.step + 1
    unread_local = job.loader.last_skipped if cfg.skip_bad_shards else []
    if not health.agree_on_batch(batch, runtime.rank, runtime.device, step_number, job.run_dir):
        own = [] if batch is None else list(batch[keys.STRUCTURE_ID])
        return skipped_step(job, "a rank's whole batch was in unreadable shards", 0, unread_local, batch, own)
    original = [float(batch.num_graphs), float(batch[keys.NATOMS].sum())]
    unread = [float(len(unread_local)), float(sum(r["atoms"] for r in unread_local))]
    ids, plain = list(batch[keys.STRUCTURE_ID]), batch
    if cfg.symmetry_loss:  # original + M rotated copies; the global mean loss averages over them
        batch = with_rotated_copies(batch, cfg.symmetry_loss, rotation_generator(cfg.seed, step_number, runtime.rank))
    batch = batch.to(runtime.device)
    parts = job.counter.breakdown(batch)
    prediction = faults.maybe_poison(job.engine(batch), step_number, runtime.rank)
    terms = loss_terms(prediction, batch, job.force_rms, strict=False)
    loss, stats = global_loss(terms, extra=[*original, float(parts["total"]), float(parts["forward"]), *unread])
    structures, atoms, flops, forward, *unread = (round(v) for v in stats["extra"])
    if stats["nonfinite"]:  # the same global count on every rank: all skip backward and step
        return skipped_step(job, "non-finite loss", forward, unread_local, plain, ids, sorted(set(terms.nonfinite)))
    job.engine.backward(loss)
    if job.gradient_watch.global_count(runtime.device):
        health.discard_gradients(job.engine)
        return skipped_step(job, "non-finite gradient", flops, unread_local, plain, ids)
    job.engine.step()
    faults.record_ids(step_number, runtime.rank, ids)
    records = unread_records(unread_local) if unread[0] else []
    return Step(loss=stats, structures=structures, atoms=atoms, model_atoms=stats["atoms"], flops=flops,
                forward_flops=forward, unread=tuple(unread), unread_records=records)


def skipped_step(job: Job, reason: str, flops: int, unread_local: list, batch, ids: list,
                 flagged: list | None = None) -> Step:
    """Collective: the :class:`Step` of a step every rank skips; its structures are counted as skipped.

    ``batch`` is this rank's original batch (None: nothing readable), ``ids`` its structure ids,
    ``flagged`` those with a non-finite error.
    """
    own = [0.0, 0.0] if batch is None else [float(batch.num_graphs), float(batch[keys.NATOMS].sum())]
    unread = [float(len(unread_local)), float(sum(r["atoms"] for r in unread_local))]
    structures, atoms, *unread = (round(v) for v in all_reduce_sum([*own, *unread], job.runtime.device))
    record = health.skip_record(job.state.step + 1, reason, ids, structures, atoms, flagged)
    job.log.say(f"[yellow]step {record['step']} skipped on every rank: {reason}[/] ({structures} structures, "
                f"{atoms} atoms not trained on; {len(record['flagged_ids'])} flagged: {record['flagged_ids'][:4]})")
    return Step(loss={}, structures=0, atoms=0, model_atoms=0, flops=flops, forward_flops=0, skip=record,
                unread=tuple(unread), unread_records=unread_records(unread_local))


def unread_records(local: list) -> list:
    """Collective: the unreadable structures of this step on every rank, one record per shard."""
    every = [r for part in all_gather_objects(local) for r in part]
    by_shard: dict = {}
    for r in every:
        entry = by_shard.setdefault(r["shard"], {"shard": r["shard"], "rows": [], "atoms": 0, "error": r["error"]})
        entry["rows"].append(r["row"])
        entry["atoms"] += r["atoms"]
    return list(by_shard.values())


def count(job: Job, step: Step) -> None:
    """Add one step to the run's counters (the checkpointed :class:`launcher.checkpoint.TrainState`)."""
    state = job.state
    state.step += 1
    state.samples_seen += step.structures
    state.atoms_seen += step.atoms
    state.model_atoms += step.model_atoms
    state.train_time_s += step.seconds
    state.train_cpu_time_s += step.cpu_seconds * job.runtime.world_size
    if state.flops is not None:  # None: resumed from a run that did not count from its start
        state.flops += step.flops
    if state.forward_flops is not None:  # None: resumed from a checkpoint before κ was measured
        state.forward_flops += step.forward_flops
    state.skipped_structures += step.unread[0]  # unreadable structures (--skip-bad-shards): never in D
    state.skipped_atoms += step.unread[1]
    new = [{"step": state.step, "reason": "unreadable shard", **r} for r in step.unread_records]
    if step.skip is None:
        state.consecutive_skips = 0
    else:
        state.skipped_steps += 1
        state.consecutive_skips += 1
        state.skipped_structures += step.skip["structures"]
        state.skipped_atoms += step.skip["atoms"]
        new.append(step.skip)
        job.log.record("skip", consecutive=state.consecutive_skips, **step.skip)
    for record in new[:max(0, health.MAX_RECORDS - len(state.skips))]:
        state.skips.append(record)
    if step.unread_records:
        job.log.record("unread", step=state.step, shards=step.unread_records)
        job.log.say(f"[yellow]step {state.step}: skipped {step.unread[0]} unreadable structures ({step.unread[1]} "
                    f"atoms) of {', '.join(r['shard'] for r in step.unread_records)}[/]")
    if step.skip is not None:
        health.check_consecutive(state.consecutive_skips, job.cfg.max_consecutive_skips, step.skip, job.run_dir)


@dataclass
class Window:
    """Accumulators between two ``train`` records (their ``step_flops`` sum to the cumulative count)."""

    seconds: float = 0.0
    cpu_seconds: float = 0.0
    atoms: int = 0
    structures: int = 0
    loss: float = 0.0
    steps: int = 0
    flops: int = 0
    step_flops: list = field(default_factory=list)
    last: Step | None = None

    def add(self, step: Step) -> None:
        if step.skip is not None:  # spent compute, nothing trained: FLOPs only (they sum to the count)
            self.step_flops.append(step.flops)
            self.flops += step.flops
            self.seconds += step.seconds
            self.cpu_seconds += step.cpu_seconds
            return
        self.step_flops.append(step.flops)
        self.seconds += step.seconds
        self.cpu_seconds += step.cpu_seconds
        self.atoms += step.atoms
        self.structures += step.structures
        self.loss += step.loss["loss"]
        self.steps += 1
        self.flops += step.flops
        self.last = step

    def report(self, job: Job) -> Window:
        """Write the ``train`` record and the progress line; returns a fresh window (this one, kept,
        when every step since the last record was skipped)."""
        if self.last is None:
            return self
        state, stats = job.state, self.last.loss
        cpu = self.cpu_seconds * job.runtime.world_size if job.cpu_time_mfu else None
        speed = rates(self.seconds, self.atoms, self.structures, self.flops, job.peak, cpu)
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
    eval_model = evaluation_model(cfg, job) if runtime.is_main else None  # one rank holds the full weights
    averaged_weights(job.engine, eval_model)  # collective gathers
    val_loader = make_loader(splits.val, cfg, runtime, job.cutoff, train=False, max_structures=cfg.max_val_structures,
                             single=True) if runtime.is_main else []
    with log.phase(f"step {state.step}: validation", _structures(val_loader), "structures") as ph:
        metrics = validate(eval_model, val_loader, runtime.device, job.force_rms, progress=ph.advance)
    log.record("val", step=state.step, samples_seen=state.samples_seen, atoms_seen=state.atoms_seen,
               flops=state.flops, **metrics)
    log.say(f"step {state.step}: val loss {metrics['loss']:.4f}, energy MAE "
            f"{metrics['energy_mae_mev_per_atom']:.2f} meV/atom, force MAE {metrics['force_mae_mev_per_A']:.1f} "
            f"meV/Å (zero-force {metrics['zero_force_mae_mev_per_A']:.1f})")
    full = validate_full(job, eval_model, metrics) if final else None
    size = job.disk["weights_bytes"] + job.disk["engine_bytes"]
    with log.phase(f"step {state.step}: writing checkpoint (≈{gb(size)})"):
        path = ckpt.save(job.run_dir, state.step, job.engine, eval_model, state,
                         _jsonable(job.loader.state_dict()), checkpoint_metadata(job, metrics, full), runtime,
                         elastic_config=job.ds_config if job.elastic_refusal is None else None)
        if runtime.is_main:
            prune_engine_state(path.parent, cfg.keep_engine_state)
    log.record("checkpoint", step=state.step, path=str(path))
    return metrics if full is None else {**metrics, "full": full}


def validate_full(job: Job, eval_model, subset: dict) -> dict:
    """The whole validation split once, at the end (the fixed subset stays the scaling fits' L)."""
    cfg, state = job.cfg, job.state
    started = time.time()
    if cfg.max_val_structures is None:
        full = dict(subset)
    else:
        loader = make_loader(job.splits.val, cfg, job.runtime, job.cutoff, train=False,
                             single=True) if job.runtime.is_main else []
        with job.log.phase(f"step {state.step}: validation on the whole split", _structures(loader),
                           "structures") as ph:
            full = validate(eval_model, loader, job.runtime.device, job.force_rms, progress=ph.advance)
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
              "val_data_hash": job.splits.val.data_hash, "train_shards": job.splits.train.location,
              "val_shards": job.splits.val.location}
    return CheckpointMetadata(
        architecture=cfg.model, width=cfg.width, config=config, N=job.n_params, samples_seen=state.samples_seen,
        atoms_seen=state.atoms_seen, step=state.step, flops=state.flops, validation=metrics,
        data_hash=job.splits.train.data_hash, code_version=job.code_version, wall_time_s=state.wall_time_s,
        steps_total=job.total, validation_full=full, world_size=job.runtime.world_size,
        throughput=run_summary(state, job.peak, job.peak_source, job.n_params, job.counter, job.cpu_time_mfu),
        symmetry_loss=cfg.symmetry_loss, val_data_hash=job.splits.val.data_hash,
        data_rejected=rejected_summary(job.splits), engine=engine_record(cfg, job.ds_config),
        precision=precision_record(cfg, job.ds_config), init_from=init_metadata(cfg), elastic=elastic_record(job),
        atoms_seen_note="original training atoms; rotated copies of the symmetry loss not counted"
        if cfg.symmetry_loss else None,
        flops_note=None if state.flops is not None else "resumed from a run that did not count FLOPs from its start",
        skipped={"steps": state.skipped_steps, "structures": state.skipped_structures, "atoms": state.skipped_atoms,
                 "records": state.skips},
        extra={job.hook.metadata_key: job.pretrain} if job.hook is not None else {},
    ).to_json()


def elastic_record(job: Job) -> dict:
    """Where the checkpoint can resume (``state``: the consolidated state, or ``refused`` the reason it
    resumes on its own world size only) and the world sizes of the run so far (``segments``)."""
    loader, runtime = job.loader, job.runtime
    here = {"world_size": runtime.world_size, "num_workers": job.cfg.num_workers,
            "batches": job.state.step - loader.offset}
    return {"state": "elastic/" if job.elastic_refusal is None else None, "refused": job.elastic_refusal,
            "segments": [*loader.lineage, here]}


def finish(job: Job, metrics: dict) -> dict:
    """The ``end`` record and the closing line; returns the final validation metrics."""
    state = job.state
    state.wall_time_s = job.wall_time()
    peak_memory = torch.cuda.max_memory_allocated(job.runtime.device) if job.runtime.device.type == "cuda" else None
    job.log.record("end", step=state.step, wall_time_s=state.wall_time_s, validation=metrics,
                   throughput=run_summary(state, job.peak, job.peak_source, job.n_params, job.counter,
                                          job.cpu_time_mfu),
                   peak_memory_bytes=peak_memory, planned_memory_bytes=(job.memory_plan or {}).get("estimate_bytes"))
    full = metrics.get("full", metrics)
    job.log.say(f"done: {state.step} steps, {state.atoms_seen:,} atoms, {state.wall_time_s:.0f} s; "
                f"val force MAE {metrics.get('force_mae_mev_per_A', float('nan')):.1f} meV/Å "
                f"(zero-force {metrics.get('zero_force_mae_mev_per_A', float('nan')):.1f}); full split "
                f"({full.get('structures', 0)} structures): {full.get('force_mae_mev_per_A', float('nan')):.1f} "
                f"meV/Å (zero-force {full.get('zero_force_mae_mev_per_A', float('nan')):.1f})")
    if state.skipped_steps or state.skipped_structures:
        job.log.say(f"[yellow]not trained on: {state.skipped_steps} skipped steps, {state.skipped_structures} "
                    f"structures ({state.skipped_atoms} atoms); recorded in the checkpoints' metadata (skipped)[/]")
    job.log.close()
    if job.lock is not None:
        job.lock.release()
    return metrics


def _structures(loader) -> int:
    """Structures a validation loader holds on this rank (rank 0 validates alone; others hold none)."""
    return getattr(loader, "rank_structures", 0)


def _jsonable(value):
    """Loader state as plain JSON types (numpy scalars → Python numbers)."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else list(v)))
