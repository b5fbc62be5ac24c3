"""The training job: build everything, then one pass over the data budget.

``train(cfg)`` reads as the recipe: set up ranks → shards → model with the data's normalisation
(and, for GemNet-OC, scale factors fitted on the same batches on every rank) → schedule-free AdamW →
DeepSpeed engine → (resume) → for each global batch: (with ``--symmetry-loss M``, M rotated copies
appended) forward, global loss, backward, step, count atoms, FLOPs and time → at every checkpoint
step (each ``checkpoint_fraction`` of the run and the end): averaged weights → validation on the
fixed subset (at the end also on the whole split) → checkpoint with throughput, MFU and κ
(:mod:`launcher.throughput`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from datapipe import keys
from launcher import checkpoint as ckpt
from launcher.config import REPO, TrainConfig, deepspeed_config
from launcher.data import prepare
from launcher.engine import broadcast_object, build_engine, init_distributed
from launcher.loss import global_loss, loss_terms
from launcher.optim import averaged_weights, build_optimizer
from launcher.progress import RunLog
from launcher.scales import (
    FIT_BATCHES,
    fit_on_train_shards,
    has_scale_factors,
    set_scale_factors,
)
from launcher.throughput import device_peak, rates, run_summary
from launcher.validate import validate
from zoo.checkpoint import read_metadata
from zoo.registry import build, get_spec
from zoo.symmetry import with_rotated_copies

#: test hook: ``SYMSCALE_KILL_AT_STEP=N`` sends SIGKILL to this process right after step N
#: (rank 0 only), to test ``--resume`` after a hard crash.
KILL_ENV = "SYMSCALE_KILL_AT_STEP"


def code_version() -> str:
    """``git describe --always --dirty --tags`` of this repository, else the installed package version.

    Only when the launcher's own directory is the top of a git work tree (an installed copy inside
    some other repository must not report that repository's commit). ``--dirty`` marks modified
    tracked files; untracked files are not reflected.
    """
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None

    top = git("rev-parse", "--show-toplevel")
    if top is not None and Path(top).resolve() == REPO.resolve():
        described = git("describe", "--always", "--dirty", "--tags")
        if described:
            return described
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"symscale {version('symscale')}"
    except PackageNotFoundError:
        return "unknown"


def rotation_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The generator of the symmetry loss's rotations at ``step`` on ``rank``: a function of
    (seed, rank, step) only, so a resumed run draws the same rotations as an uninterrupted one."""
    state = np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


def checkpoint_steps(total: int, fraction: float) -> set[int]:
    """Steps after which to validate and checkpoint: every ``fraction`` of ``total``, and the last."""
    count = max(1, round(1.0 / fraction))
    return {max(1, round(k * total / count)) for k in range(1, count + 1)} | {total}


def make_flop_counter(model, direct_forces: bool):
    """The zoo's per-step FLOP counter (:class:`zoo.flop_counter.StepFlopCounter`) for ``model``."""
    from zoo.flop_counter import StepFlopCounter

    return StepFlopCounter(model, direct_forces=direct_forces)


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
    scales = _scale_factors(cfg, model, splits, cutoff, runtime, resume_from)
    loader = make_loader(splits.train, cfg, runtime, cutoff, train=True, max_atoms=cfg.max_atoms)
    total = int(loader.steps)
    lr = cfg.learning_rate(cfg.width)
    optimizer = build_optimizer(model, lr, cfg.betas, cfg.weight_decay, round(cfg.warmup_fraction * total))
    engine, ds_config = build_engine(cfg, model, optimizer, runtime)
    eval_model = build(cfg.model, cfg.width, direct_forces=cfg.direct_forces, **cfg.model_overrides)
    eval_model.set_normalization(splits.train.element_references, sigma)
    if scales is not None:
        set_scale_factors(eval_model, scales["factors"])
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
    if counter is not None and state.step == 0:
        state.flops, state.forward_flops = 0, 0
    peak, peak_source = device_peak(runtime.device, ds_config["bf16"]["enabled"], runtime.world_size,
                                    runtime.is_main)
    run = RunInfo(cfg, run_dir, splits, ds_config, runtime, n_params, cutoff, total, code_version(), peak,
                  peak_source, counter, scales)
    schedule = checkpoint_steps(total, cfg.checkpoint_fraction)
    log = RunLog(run_dir, total, state.step, runtime.is_main)
    log.record("resume" if resume_from else "start", step=state.step, steps=total, world_size=runtime.world_size,
               N=n_params, lr=lr, zero_stage=ds_config["zero_optimization"]["stage"],
               bf16=ds_config["bf16"]["enabled"], device=str(runtime.device), data_hash=splits.train.data_hash,
               train_structures=splits.train.n_structures, train_atoms=splits.train.n_atoms,
               checkpoint=str(resume_from) if resume_from else None, flops_counted=counter is not None,
               peak_flops=peak, peak_source=peak_source, symmetry_loss=cfg.symmetry_loss,
               code_version=run.code_version, scale_factors=scales)
    log.say(f"[bold]{cfg.model}[/] width {cfg.width}: N = {n_params:,} parameters, {total} steps × "
            f"{runtime.world_size} rank(s), lr {lr:.3g}, ZeRO-{ds_config['zero_optimization']['stage']}, "
            f"{'bf16' if ds_config['bf16']['enabled'] else 'fp32'} on {runtime.device}; run dir {run_dir}")
    log.say(f"MFU against {peak:.3g} FLOP/s: {peak_source}")
    if scales is not None:
        log.say(f"scale factors: {scales['note']}")
    if cfg.symmetry_loss:
        log.say(f"symmetry loss: {cfg.symmetry_loss} rotated copies per batch (FLOPs × {cfg.symmetry_loss + 1}; "
                "atoms seen count the original batch)")
    kill_at = int(os.environ.get(KILL_ENV, "0"))
    metrics = {}
    window = _new_window()
    if state.step >= total:  # resumed from the final checkpoint: nothing left (never a 2nd epoch)
        log.say(f"{resume_from} is the end of the run ({total} steps); nothing to do")
        log.close()
        return read_metadata(resume_from)["validation"]

    engine.train()
    tick = time.time()
    for batch in loader:
        original = [float(batch.num_graphs), float(batch[keys.NATOMS].sum())]
        if cfg.symmetry_loss:  # original + M rotated copies; the global mean loss averages over them
            batch = with_rotated_copies(batch, cfg.symmetry_loss,
                                        rotation_generator(cfg.seed, state.step + 1, runtime.rank))
        batch = batch.to(runtime.device)
        parts = counter.breakdown(batch) if counter is not None else {"total": 0, "forward": 0}
        prediction = engine(batch)
        terms = loss_terms(prediction, batch, sigma)
        loss, stats = global_loss(terms, extra=[*original, float(parts["total"]), float(parts["forward"])])
        engine.backward(loss)
        engine.step()
        structures, atoms, flops, forward = (round(v) for v in stats["extra"])
        now = time.time()
        seconds, tick = now - tick, now
        state.step += 1
        state.samples_seen += structures
        state.atoms_seen += atoms
        state.model_atoms += stats["atoms"]
        state.train_time_s += seconds
        if counter is not None:
            window["step_flops"].append(flops)
            if state.flops is not None:  # None: resumed from a run that did not count from its start
                state.flops += flops
            if state.forward_flops is not None:  # None: resumed from a checkpoint before κ was measured
                state.forward_flops += forward
        for key, value in (("atoms", atoms), ("structures", structures), ("loss", stats["loss"]), ("steps", 1),
                           ("flops", flops), ("seconds", seconds)):
            window[key] += value
        if state.step % cfg.log_every == 0 or state.step in schedule:
            speed = rates(window["seconds"], window["atoms"], window["structures"],
                          window["flops"] if counter is not None else None, peak)
            log.record("train", step=state.step, loss=stats["loss"], energy_loss=stats["energy_loss"],
                       force_loss=stats["force_loss"], mean_loss=window["loss"] / window["steps"], **speed,
                       samples_seen=state.samples_seen, atoms_seen=state.atoms_seen, flops=state.flops,
                       pflops=None if state.flops is None else state.flops / 1e15,
                       step_flops=window["step_flops"] if counter is not None else None,
                       flops_since_last=window["flops"] if counter is not None else None)
            mfu_text = "" if speed["mfu"] is None else f"  MFU {100 * speed['mfu']:.2f}%"
            log.step(state.step, f"loss {window['loss'] / window['steps']:.4f}  "
                                 f"{speed['atoms_per_s']:,.0f} atoms/s{mfu_text}")
            window = _new_window()
        if state.step in schedule:
            state.wall_time_s = wall_offset + time.time() - start_time
            metrics = _validate_and_save(run, engine, eval_model, loader, state, log, final=state.step == total)
            tick = time.time()
        if kill_at and state.step == kill_at and runtime.is_main:
            os.kill(os.getpid(), signal.SIGKILL)

    state.wall_time_s = wall_offset + time.time() - start_time
    log.record("end", step=state.step, wall_time_s=state.wall_time_s, validation=metrics,
               throughput=run_summary(state, peak, peak_source, n_params, counter))
    full = metrics.get("full", metrics)
    log.say(f"done: {state.step} steps, {state.atoms_seen:,} atoms, {state.wall_time_s:.0f} s; "
            f"val force MAE {metrics.get('force_mae_mev_per_A', float('nan')):.1f} meV/Å "
            f"(zero-force {metrics.get('zero_force_mae_mev_per_A', float('nan')):.1f}); full split "
            f"({full.get('structures', 0)} structures): {full.get('force_mae_mev_per_A', float('nan')):.1f} "
            f"meV/Å (zero-force {full.get('zero_force_mae_mev_per_A', float('nan')):.1f})")
    log.close()
    return metrics


@dataclass
class RunInfo:
    """What a checkpoint needs to describe the run besides the counters."""

    cfg: TrainConfig
    run_dir: Path
    splits: object
    ds_config: dict
    runtime: object
    n_params: int
    cutoff: float
    total: int
    code_version: str
    peak: float
    peak_source: str
    counter: object
    scales: dict | None


def _scale_factors(cfg, model, splits, cutoff, runtime, resume_from) -> dict | None:
    """Fit the model's scale factors on a fresh run (same batches on every rank) or read the
    checkpoint's record on resume; None for models without them (see :mod:`launcher.scales`)."""
    if not has_scale_factors(model):
        return None
    if resume_from is not None:
        saved = read_metadata(resume_from).get("scale_factors")
        if saved is None:
            raise ValueError(f"--resume {resume_from}: the checkpoint records no scale factors for {cfg.model}")
        return saved
    started = time.time()
    factors = fit_on_train_shards(model, splits.train.directory, cfg.atoms_per_batch, cutoff, runtime.device)
    return {"factors": factors, "seconds": time.time() - started,
            "note": f"fitted before deepspeed.initialize on the first {FIT_BATCHES} batches of the train "
                    f"shards (index order, {cfg.atoms_per_batch} atoms per batch), identical on every rank; "
                    "restored from the checkpoint on resume"}


def _new_window() -> dict:
    """Accumulators between two ``train`` records (their ``step_flops`` sum to the cumulative count)."""
    return {"seconds": 0.0, "atoms": 0, "structures": 0, "loss": 0.0, "steps": 0, "flops": 0, "step_flops": []}


def _validate_and_save(run: RunInfo, engine, eval_model, loader, state, log, final: bool) -> dict:
    """Averaged weights → validation on the fixed subset (and the full split at the end) → checkpoint."""
    cfg, runtime, splits = run.cfg, run.runtime, run.splits
    averaged_weights(engine, eval_model)
    val_loader = make_loader(splits.val, cfg, runtime, run.cutoff, train=False, max_structures=cfg.max_val_structures)
    metrics = validate(eval_model, val_loader, runtime.device, splits.train.force_rms)
    log.record("val", step=state.step, samples_seen=state.samples_seen, atoms_seen=state.atoms_seen,
               flops=state.flops, **metrics)
    log.say(f"step {state.step}: val loss {metrics['loss']:.4f}, energy MAE "
            f"{metrics['energy_mae_mev_per_atom']:.2f} meV/atom, force MAE {metrics['force_mae_mev_per_A']:.1f} "
            f"meV/Å (zero-force {metrics['zero_force_mae_mev_per_A']:.1f})")
    full = None
    if final:  # the whole validation split once, at the end (the subset stays the scaling fits' L)
        started = time.time()
        if cfg.max_val_structures is None:
            full = dict(metrics)
        else:
            full_loader = make_loader(splits.val, cfg, runtime, run.cutoff, train=False)
            full = validate(eval_model, full_loader, runtime.device, splits.train.force_rms)
        full["seconds"] = time.time() - started
        log.record("val_full", step=state.step, **full)
        log.say(f"step {state.step}: full validation split ({full['structures']} structures, {full['atoms']} atoms, "
                f"{full['seconds']:.1f} s): energy MAE {full['energy_mae_mev_per_atom']:.2f} meV/atom, force MAE "
                f"{full['force_mae_mev_per_A']:.1f} meV/Å (zero-force {full['zero_force_mae_mev_per_A']:.1f})")
    config = {**cfg.to_json(), "width": cfg.width, "world_size": runtime.world_size, "deepspeed": run.ds_config,
              "graph_cutoff": run.cutoff, "lr_effective": cfg.learning_rate(cfg.width),
              "model_overrides": {"direct_forces": cfg.direct_forces, **cfg.model_overrides},
              "val_data_hash": splits.val.data_hash, "train_shards": str(splits.train.directory)}
    metadata = {
        "architecture": cfg.model,
        "width": cfg.width,
        "config": config,
        "N": run.n_params,
        "samples_seen": state.samples_seen,
        "atoms_seen": state.atoms_seen,
        "atoms_seen_note": "original training atoms; rotated copies of the symmetry loss not counted"
        if cfg.symmetry_loss else None,
        "step": state.step,
        "steps_total": run.total,
        "flops": state.flops,
        "flops_note": None if state.flops is not None else "no FLOP counter (zoo.flop_counter) was available",
        "throughput": run_summary(state, run.peak, run.peak_source, run.n_params, run.counter),
        "symmetry_loss": cfg.symmetry_loss,
        "scale_factors": run.scales,
        "validation": metrics,
        "validation_full": full,
        "data_hash": splits.train.data_hash,
        "code_version": run.code_version,
        "wall_time_s": state.wall_time_s,
        "world_size": runtime.world_size,
    }
    path = ckpt.save(run.run_dir, state.step, engine, eval_model, state, _jsonable(loader.state_dict()),
                     metadata, runtime)
    log.record("checkpoint", step=state.step, path=str(path))
    if full is not None:
        metrics = {**metrics, "full": full}
    return metrics


def _jsonable(value):
    """Loader state as plain JSON types (numpy scalars → Python numbers)."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else list(v)))

