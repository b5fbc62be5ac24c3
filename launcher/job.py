"""Setting up a training job: everything :func:`launcher.loop.train` needs before its first step.

:func:`set_up` reads as the recipe's first half: ranks (all checked in within ``--dist-timeout``) → run directory (fresh or resumed; locked against a
second job; seen by every rank, :mod:`launcher.nodes`) → shards (the same index on every rank) →
model with the data's normalisation → the architecture's pre-training hook (if its registry spec
has one, e.g. fitted scale factors, computed on the same batches on every rank) → training
stream (on resume: where the run left it; re-planned on another world size, :mod:`launcher.elastic`) →
schedule-free AdamW → engine → counters (restored on resume) → FLOP counter (on a weightless
meta-device copy), device peak, the disk the checkpoints need (checked against the free space,
:mod:`launcher.retention`) and run log. Phases that take a while show progress on rank 0
(:class:`launcher.progress.Phase`). Under ZeRO-3 the model is partitioned while it is built, and no
rank keeps an evaluation copy (:mod:`launcher.materialise`). Nothing here names an architecture: what differs between them
comes from :data:`zoo.registry.MODELS`.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from launcher import checkpoint as ckpt
from launcher import elastic, nodes
from launcher import sharding
from launcher.config import REPO, TrainConfig
from launcher.data import Splits, prepare, rejected_summary
from launcher.engine import Runtime, broadcast_object, init_distributed
from launcher.errors import UserError
from launcher.finetune import apply_init, resolve_init
from launcher.health import GradientWatch
from launcher.materialise import counting_model, materialised_counting_model
from launcher.progress import Phase, RunLog
from launcher.retention import check_disk, disk_plan, gb
from launcher.runlock import RunDirectoryLocked, RunLock, check_owner
from launcher.throughput import device_peak
from zoo.flops.counter import StepFlopCounter
from zoo.hub.checkpoint import read_metadata
from zoo.models.base import ForceField, PretrainHook
from zoo.registry import get_spec


#: how the run log names each engine
ENGINE_NAMES = {"deepspeed": "DeepSpeed", "fsdp": "FSDP2"}


@dataclass
class Job:
    """A running job: its configuration, data, engine, counters and log (one per rank)."""

    cfg: TrainConfig
    runtime: Runtime
    run_dir: Path
    resume_from: Path | None
    splits: Splits
    engine: object  # the DeepSpeed engine wrapping the training model
    loader: object  # this rank's training stream (datapipe.loader.StreamingLoader)
    ds_config: dict
    n_params: int
    cutoff: float  # Å, the data graph's cutoff (the model's data_cutoff)
    total: int  # steps of the whole run
    lr: float
    state: ckpt.TrainState
    counter: StepFlopCounter
    peak: float  # FLOP/s of the whole job (GPU) or FLOP per CPU-second (CPU), for MFU
    peak_source: str
    cpu_time_mfu: bool  # MFU against CPU time (launcher.throughput)
    disk: dict  # launcher.retention.disk_plan + free space
    hook: PretrainHook | None
    pretrain: dict | None  # the hook's record (fitted now, or read from the checkpoint)
    code_version: str
    schedule: set[int]  # steps after which to validate and checkpoint
    log: RunLog
    start_time: float  # time.time() when this process started the job
    wall_offset: float  # wall time of the run before this process (resumes)
    gradient_watch: GradientWatch | None = None  # flags non-finite gradients (launcher.health)
    lock: RunLock | None = None  # rank 0's hold on the run directory (launcher.runlock)
    memory_plan: dict | None = None  # the planner's per-rank estimate of this configuration (zoo.plan)
    normalisation: tuple | None = None  # (element references [Z] eV, force RMS eV/Å) the model trains with
    elastic_refusal: str | None = None  # why checkpoints cannot resume on another world size (launcher.elastic)
    resumed_elsewhere: dict | None = None  # launcher.elastic.load's record of a resume on another world size

    @property
    def force_rms(self) -> float:
        """σ of the training split (eV/Å): the loss's force unit."""
        return self.splits.train.force_rms

    def wall_time(self) -> float:
        """Seconds of the run so far, resumes included."""
        return self.wall_offset + time.time() - self.start_time


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


def checkpoint_steps(total: int, fraction: float) -> set[int]:
    """Steps after which to validate and checkpoint: every ``fraction`` of ``total``, and the last."""
    count = max(1, round(1.0 / fraction))
    return {max(1, round(k * total / count)) for k in range(1, count + 1)} | {total}


def checkpoint_steps_at(total: int, fractions) -> set[int]:
    """Steps after which to validate and checkpoint: at each of ``fractions`` of ``total``, and the last.

    >>> sorted(checkpoint_steps_at(40, [0.125, 0.25, 0.5]))
    [5, 10, 20, 40]
    """
    return {min(total, max(1, round(f * total))) for f in fractions} | {total}


def lock_run_dir(run_dir: Path, runtime: Runtime, config: dict | None = None) -> RunLock | None:
    """Rank 0 locks ``run_dir`` (:mod:`launcher.runlock`); every rank raises if another job holds it.
    With the ``config`` of a fresh start, every rank also raises a ``UserError`` if the directory
    holds another run (:func:`launcher.runlock.check_owner`)."""
    lock, error, taken = None, None, None
    if runtime.is_main:
        try:
            lock = RunLock.acquire(run_dir)
            if config is not None:
                check_owner(run_dir, config, ignore=(*OPERATIONAL, "run_dir", "resume"))
        except RunDirectoryLocked as exc:
            error = str(exc)
        except UserError as exc:
            taken = str(exc)
    error, taken = broadcast_object((error, taken))
    if error:
        raise RunDirectoryLocked(error)
    if taken:
        raise UserError(taken)
    return lock


def make_loader(index, cfg: TrainConfig, runtime, cutoff: float, train: bool, max_atoms=None,
                max_structures=None, single: bool = False, skip_bad_shards: bool = False):
    """A loader over ``index``: the training stream (shuffled, budget ``max_atoms``), the
    validation set (index order; the first ``max_structures`` structures, the same subset at every
    checkpoint and for any number of ranks), or with ``single`` the stream as rank 0 of 1 sees it
    in index order, in process (the same batches on every rank, for pre-training hooks)."""
    from datapipe.loader import StreamingLoader

    return StreamingLoader(
        index.location,
        rank=0 if single else runtime.rank,
        world_size=1 if single else runtime.world_size,
        num_workers=0 if single else cfg.num_workers,
        atoms_per_batch=cfg.atoms_per_batch,
        cutoff=cutoff,
        shuffle_buffer=cfg.shuffle_buffer,
        seed=cfg.seed,
        max_atoms=max_atoms,
        max_structures=max_structures,
        shuffle=train and not single,
        skip_bad_shards=skip_bad_shards,
    )


#: options a resumed run takes from its own command line rather than from the run's saved config
OPERATIONAL = ("skip_bad_shards", "max_consecutive_skips", "dist_timeout_s")


def resolve_run(cfg: TrainConfig) -> tuple[TrainConfig, Path, Path | None]:
    """(config, run dir, checkpoint to resume or None); a resumed run takes its saved config, except
    the :data:`OPERATIONAL` options, which come from this command line."""
    if cfg.resume:
        checkpoint = ckpt.find(cfg.resume)
        run_dir = ckpt.run_dir_of(checkpoint)
        if not (run_dir / "config.json").is_file():
            raise UserError(f"--resume {cfg.resume}: {run_dir} holds no config.json (not a run directory)")
        saved = TrainConfig.from_json(json.loads((run_dir / "config.json").read_text()))
        saved.resume = str(checkpoint)
        for name in OPERATIONAL:  # how to meet faults is chosen per invocation, not fixed by the run
            setattr(saved, name, getattr(cfg, name))
        return saved, run_dir, checkpoint
    if cfg.width is None:
        cfg.width = get_spec(cfg.model).default_width
    name = cfg.run_dir or broadcast_object(
        str(REPO / "runs" / f"{cfg.model}-w{cfg.width}-{time.strftime('%Y%m%d-%H%M%S')}"))
    return cfg, Path(name), None


def run_pretrain_hook(hook: PretrainHook | None, cfg: TrainConfig, model: ForceField, splits: Splits,
                      runtime: Runtime, resume_from: Path | None) -> dict | None:
    """The hook's record: fitted on a fresh run (the first ``hook.batches`` training batches in index
    order, identical on every rank, before the engine exists), read from the checkpoint on resume."""
    if hook is None:
        return None
    if resume_from is not None:
        saved = read_metadata(resume_from).get(hook.metadata_key)
        if saved is None:
            raise UserError(f"--resume {resume_from}: the checkpoint records no {hook.metadata_key} "
                             f"for {cfg.model}")
        return saved
    loader = make_loader(splits.train, cfg, runtime, model.data_cutoff, train=True, single=True)
    batches = [b.to(runtime.device) for b in itertools.islice(iter(loader), hook.batches)]
    model.to(runtime.device)
    with Phase(f"{hook.description}: fitting on {len(batches)} batches", unit="passes",
               enabled=runtime.is_main) as phase:
        def progress(done: int, total: int) -> None:
            phase.total = total
            phase.advance(done - phase.done)

        record = hook.fit(model, batches, progress=progress)
    record["note"] = (f"fitted before the engine was built on the first {hook.batches} batches of the train "
                      f"shards (index order, {cfg.atoms_per_batch} atoms per batch), identical on every rank; "
                      "restored from the checkpoint on resume")
    return record


def set_up(cfg: TrainConfig) -> Job:
    """Build everything of a run (or of its resumption) on this rank; see the module docstring."""
    runtime = init_distributed(cfg.dist_timeout_s, cfg.engine)
    start_time = time.time()
    cfg, run_dir, resume_from = nodes.together(runtime, resolve_run, resolve_init(cfg, runtime))
    # a resumed run keeps its own choice (config.json); zoo.models.dense reads the switch at each product
    torch.backends.mkldnn.enabled = cfg.cpu_matmul == "onednn"
    lock = lock_run_dir(run_dir, runtime, cfg.to_json() if resume_from is None else None)
    nodes.check_run_dir(run_dir, runtime)  # every node must see it: each rank writes its checkpoint parts there
    # refuse a bad engine configuration before any work
    planned_config = nodes.together(runtime, sharding.engine_config, cfg, runtime.bf16_supported)
    bf16 = planned_config["bf16"]["enabled"]
    if bf16 and runtime.device.type == "cuda" and not runtime.bf16_supported:
        raise UserError(f"--precision bf16: {torch.cuda.get_device_name(runtime.device)} does not compute bf16 "
                        "(use --precision fp32)")
    splits = nodes.together(runtime, prepare, cfg, runtime)
    for name, index in (("train", splits.train), ("val", splits.val)):  # every rank plans from its own index
        nodes.check_same(runtime, f"the {name} shards' index (data hash)", index.data_hash,
                         f"give every node the same --{name} shards")
    memory_plan = sharding.memory_check(cfg, runtime, planned_config)  # refuses what cannot fit (CUDA)
    spec = get_spec(cfg.model)

    if cfg.init_record is not None and (cfg.engine == "fsdp" or planned_config["zero_optimization"]["stage"] == 3):
        raise UserError("--init-from loads full weights before the engine is built; it is tested with one process "
                        "and ZeRO-1/2, not yet with --zero-stage 3 or --engine fsdp: use --zero-stage 1 or 2")
    normalisation = (splits.train.element_references, splits.train.force_rms)
    model = sharding.prepare_model(cfg, planned_config, normalisation)  # ZeRO-3: partitioned while built
    pretrain = apply_init(cfg, model, spec.pretrain)  # --init-from: pretrained weights, frozen groups
    if model is not None:  # the normalisation the run trains with (pretrained or re-fitted)
        normalisation = (model.element_references.tolist(), model.force_rms)
    counted = counting_model(cfg)  # meta device: no memory
    cutoff = counted.data_cutoff
    n_params = sum(p.numel() for p in counted.parameters() if p.requires_grad)
    loader = nodes.together(runtime, make_loader, splits.train, cfg, runtime, cutoff, train=True,
                            max_atoms=cfg.max_atoms, skip_bad_shards=cfg.skip_bad_shards)
    refusal = elastic.unsupported(cfg, planned_config)  # None: checkpoints resume on any world size
    elsewhere = False
    if resume_from is not None:  # the stream first: on another world size the rest is re-planned
        saved_hash = read_metadata(resume_from)["data_hash"]
        if saved_hash != splits.train.data_hash:
            raise UserError(f"--resume {resume_from}: the training shards changed (data hash {saved_hash[:12]} in "
                            f"the checkpoint, {splits.train.data_hash[:12]} now); a resumed run needs the same data")
        elsewhere = ckpt.restore_loader(resume_from, loader, runtime, refusal)
    total = int(loader.steps)
    schedule = (checkpoint_steps_at(total, cfg.checkpoint_at) if cfg.checkpoint_at
                else checkpoint_steps(total, cfg.checkpoint_fraction))
    first_step = read_metadata(resume_from)["step"] if resume_from is not None else 0
    # every rank checks (one file system holds the run dir), so all refuse alike, before any long phase
    disk = check_disk(run_dir, disk_plan(n_params, sum(1 for s in schedule if s > first_step),
                                         cfg.keep_engine_state, bf16, elastic=refusal is None))
    if cfg.init_record is None:
        pretrain = run_pretrain_hook(spec.pretrain, cfg, model, splits, runtime, resume_from)
    lr = cfg.learning_rate(cfg.width)
    if cfg.compile:  # after the pre-training hook, before the engine wraps it; parse() checks the named model
        if model is None:
            raise UserError("--compile is offered with --engine deepspeed (FSDP builds its model on the meta "
                            "device inside the engine); drop --compile or use --engine deepspeed")
        try:
            model.enable_compile()
        except RuntimeError as error:  # an architecture that does not compile (its compile_refusal)
            raise UserError(f"--compile: {error}") from None
    with Phase(f"building the {ENGINE_NAMES[cfg.engine]} engine", enabled=runtime.is_main):
        engine, ds_config = sharding.build(cfg, model, runtime, lr, round(cfg.warmup_fraction * total),
                                           normalisation)

    state, resumed_elsewhere = ckpt.TrainState(), None
    if resume_from is not None:
        with Phase(f"loading {resume_from}", enabled=runtime.is_main):
            state, resumed_elsewhere = ckpt.load(resume_from, engine, runtime, elsewhere)
    if resume_from is None and runtime.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_json(), indent=1) + "\n")
    counter = StepFlopCounter(counted, direct_forces=cfg.direct_forces,
                              materialise=lambda: materialised_counting_model(cfg).to(runtime.device))
    if state.step == 0:
        state.flops, state.forward_flops = 0, 0
    peak, peak_source, cpu_time_mfu = device_peak(runtime.device, ds_config["bf16"]["enabled"],
                                                  runtime.world_size, runtime.is_main)
    job = Job(cfg=cfg, runtime=runtime, run_dir=run_dir, resume_from=resume_from, splits=splits, engine=engine,
              loader=loader, ds_config=ds_config, n_params=n_params, cutoff=cutoff,
              total=total, lr=lr, state=state, counter=counter, peak=peak, peak_source=peak_source,
              cpu_time_mfu=cpu_time_mfu, disk=disk, hook=spec.pretrain, pretrain=pretrain,
              code_version=code_version(), schedule=schedule,
              log=RunLog(run_dir, total, state.step, runtime.is_main), start_time=start_time,
              wall_offset=state.wall_time_s, gradient_watch=GradientWatch(engine.module), lock=lock,
              memory_plan=memory_plan, normalisation=normalisation, elastic_refusal=refusal,
              resumed_elsewhere=resumed_elsewhere)
    announce(job)
    return job


def announce(job: Job) -> None:
    """The run's ``start``/``resume`` record and its opening lines on the terminal."""
    cfg, runtime, ds = job.cfg, job.runtime, job.ds_config
    hook_record = {job.hook.metadata_key: job.pretrain} if job.hook is not None else {}
    job.log.record("resume" if job.resume_from else "start", step=job.state.step, steps=job.total,
                   world_size=runtime.world_size, N=job.n_params, lr=job.lr,
                   zero_stage=ds["zero_optimization"]["stage"], bf16=ds["bf16"]["enabled"],
                   device=str(runtime.device), data_hash=job.splits.train.data_hash,
                   train_structures=job.splits.train.n_structures, train_atoms=job.splits.train.n_atoms,
                   checkpoint=str(job.resume_from) if job.resume_from else None, flops_counted=True,
                   peak_flops=job.peak, peak_source=job.peak_source, symmetry_loss=cfg.symmetry_loss,
                   code_version=job.code_version, data_rejected=rejected_summary(job.splits), disk=job.disk,
                   engine=sharding.engine_record(cfg, ds), precision=sharding.precision_record(cfg, ds),
                   memory_plan=job.memory_plan, elastic=job.resumed_elsewhere, lineage=job.loader.lineage,
                   **hook_record)
    job.log.say(f"[bold]{cfg.model}[/] width {cfg.width}: N = {job.n_params:,} parameters, {job.total} steps × "
                f"{runtime.world_size} rank(s), lr {job.lr:.3g}, {sharding.engine_record(cfg, ds)['summary']}, "
                f"{'bf16 (fp32 islands)' if ds['bf16']['enabled'] else 'fp32'} on {runtime.device}; run dir {job.run_dir}")
    job.log.say(f"MFU against {job.peak_source}")
    if job.resumed_elsewhere is not None:
        moved = job.resumed_elsewhere
        job.log.say(f"resumed on {moved['to_world_size']} rank(s) from a checkpoint of {moved['from_world_size']}: "
                    f"weights and optimizer state loaded bitwise (read back, sha256 {moved['sha256'][:12]}); the "
                    f"{job.loader.plan.total_structures} structures not yet trained on re-planned in "
                    f"{job.loader.plan.steps} steps")
    for name, split in rejected_summary(job.splits).items():
        if split["rejected"]:
            reasons = ", ".join(f"{reason}: {n}" for reason, n in split["reasons"].items())
            job.log.say(f"[yellow]{name} split: conversion rejected {split['rejected']} structure(s) "
                        f"({reasons}); kept {split['structures']}; listed in {split['index']}[/]")
    disk = job.disk
    job.log.say(f"checkpoints: {disk['checkpoints']} to write, ≈{gb(disk['weights_bytes'])} of weights each (all "
                f"kept) + ≈{gb(disk['engine_bytes'])} of engine state (the last {disk['keep_engine_state']} kept); "
                f"≈{gb(disk['needed_bytes'])} needed, {gb(disk['free_bytes'])} free")
    if job.pretrain is not None:
        job.log.say(f"{job.hook.description}: {job.pretrain.get('note', 'restored from the checkpoint')}")
    if cfg.symmetry_loss:
        job.log.say(f"symmetry loss: {cfg.symmetry_loss} rotated copies per batch (FLOPs × "
                    f"{cfg.symmetry_loss + 1}; atoms seen count the original batch)")
