"""Setting up a training job: everything :func:`launcher.loop.train` needs before its first step.

:func:`set_up` reads as the recipe's first half: ranks → run directory (fresh or resumed) → shards →
model with the data's normalisation → the architecture's pre-training hook (if its registry spec
has one, e.g. fitted scale factors, computed on the same batches on every rank) → training
stream → schedule-free AdamW → engine → evaluation copy → counters (restored on resume) → FLOP
counter, device peak and run log. Nothing here names an architecture: what differs between them
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
from launcher.config import REPO, TrainConfig, deepspeed_config
from launcher.data import Splits, prepare
from launcher.engine import Runtime, broadcast_object, build_engine, init_distributed
from launcher.optim import build_optimizer
from launcher.progress import RunLog
from launcher.throughput import device_peak
from zoo.flops.counter import StepFlopCounter
from zoo.hub.checkpoint import read_metadata
from zoo.models.base import ForceField, PretrainHook
from zoo.registry import build, get_spec


@dataclass
class Job:
    """A running job: its configuration, data, engine, counters and log (one per rank)."""

    cfg: TrainConfig
    runtime: Runtime
    run_dir: Path
    resume_from: Path | None
    splits: Splits
    engine: object  # the DeepSpeed engine wrapping the training model
    eval_model: ForceField  # single-device copy that receives the averaged weights
    loader: object  # this rank's training stream (datapipe.loader.StreamingLoader)
    ds_config: dict
    n_params: int
    cutoff: float  # Å, the data graph's cutoff (the model's data_cutoff)
    total: int  # steps of the whole run
    lr: float
    state: ckpt.TrainState
    counter: StepFlopCounter
    peak: float  # FLOP/s of the whole job, for MFU
    peak_source: str
    hook: PretrainHook | None
    pretrain: dict | None  # the hook's record (fitted now, or read from the checkpoint)
    code_version: str
    schedule: set[int]  # steps after which to validate and checkpoint
    log: RunLog
    start_time: float  # time.time() when this process started the job
    wall_offset: float  # wall time of the run before this process (resumes)

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


def make_loader(index, cfg: TrainConfig, runtime, cutoff: float, train: bool, max_atoms=None,
                max_structures=None, single: bool = False):
    """A loader over ``index``: the training stream (shuffled, budget ``max_atoms``), the
    validation set (index order; the first ``max_structures`` structures, the same subset at every
    checkpoint and for any number of ranks), or with ``single`` the stream as rank 0 of 1 sees it
    in index order, in process (the same batches on every rank, for pre-training hooks)."""
    from datapipe.loader import StreamingLoader

    return StreamingLoader(
        index.directory,
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
    )


def resolve_run(cfg: TrainConfig) -> tuple[TrainConfig, Path, Path | None]:
    """(config, run dir, checkpoint to resume or None); a resumed run takes its saved config."""
    if cfg.resume:
        checkpoint = ckpt.find(cfg.resume)
        run_dir = ckpt.run_dir_of(checkpoint)
        saved = TrainConfig.from_json(json.loads((run_dir / "config.json").read_text()))
        saved.resume = str(checkpoint)
        return saved, run_dir, checkpoint
    cfg.width = cfg.width or get_spec(cfg.model).default_width
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
            raise ValueError(f"--resume {resume_from}: the checkpoint records no {hook.metadata_key} "
                             f"for {cfg.model}")
        return saved
    loader = make_loader(splits.train, cfg, runtime, model.data_cutoff, train=True, single=True)
    batches = [b.to(runtime.device) for b in itertools.islice(iter(loader), hook.batches)]
    model.to(runtime.device)
    record = hook.fit(model, batches)
    record["note"] = (f"fitted before the engine was built on the first {hook.batches} batches of the train "
                      f"shards (index order, {cfg.atoms_per_batch} atoms per batch), identical on every rank; "
                      "restored from the checkpoint on resume")
    return record


def set_up(cfg: TrainConfig) -> Job:
    """Build everything of a run (or of its resumption) on this rank; see the module docstring."""
    runtime = init_distributed()
    start_time = time.time()
    cfg, run_dir, resume_from = resolve_run(cfg)
    deepspeed_config(cfg, runtime.bf16_supported)  # refuse a bad engine configuration before any work
    splits = prepare(cfg, runtime)
    spec = get_spec(cfg.model)

    torch.manual_seed(cfg.seed)
    model = build(cfg.model, cfg.width, direct_forces=cfg.direct_forces, **cfg.model_overrides)
    model.set_normalization(splits.train.element_references, splits.train.force_rms)
    cutoff = model.data_cutoff
    pretrain = run_pretrain_hook(spec.pretrain, cfg, model, splits, runtime, resume_from)
    loader = make_loader(splits.train, cfg, runtime, cutoff, train=True, max_atoms=cfg.max_atoms)
    total = int(loader.steps)
    lr = cfg.learning_rate(cfg.width)
    optimizer = build_optimizer(model, lr, cfg.betas, cfg.weight_decay, round(cfg.warmup_fraction * total))
    if cfg.compile:  # after the pre-training hook, before the engine wraps it; checked by parse()
        model.enable_compile()
    engine, ds_config = build_engine(cfg, model, optimizer, runtime)

    eval_model = build(cfg.model, cfg.width, direct_forces=cfg.direct_forces, **cfg.model_overrides)
    eval_model.set_normalization(splits.train.element_references, splits.train.force_rms)
    if pretrain is not None:
        spec.pretrain.restore(eval_model, pretrain)
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
    counter = StepFlopCounter(eval_model, direct_forces=cfg.direct_forces)
    if state.step == 0:
        state.flops, state.forward_flops = 0, 0
    peak, peak_source = device_peak(runtime.device, ds_config["bf16"]["enabled"], runtime.world_size,
                                    runtime.is_main)
    job = Job(cfg=cfg, runtime=runtime, run_dir=run_dir, resume_from=resume_from, splits=splits, engine=engine,
              eval_model=eval_model, loader=loader, ds_config=ds_config, n_params=n_params, cutoff=cutoff,
              total=total, lr=lr, state=state, counter=counter, peak=peak, peak_source=peak_source,
              hook=spec.pretrain, pretrain=pretrain, code_version=code_version(),
              schedule=checkpoint_steps(total, cfg.checkpoint_fraction),
              log=RunLog(run_dir, total, state.step, runtime.is_main), start_time=start_time,
              wall_offset=state.wall_time_s)
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
                   code_version=job.code_version, **hook_record)
    job.log.say(f"[bold]{cfg.model}[/] width {cfg.width}: N = {job.n_params:,} parameters, {job.total} steps × "
                f"{runtime.world_size} rank(s), lr {job.lr:.3g}, ZeRO-{ds['zero_optimization']['stage']}, "
                f"{'bf16' if ds['bf16']['enabled'] else 'fp32'} on {runtime.device}; run dir {job.run_dir}")
    job.log.say(f"MFU against {job.peak:.3g} FLOP/s: {job.peak_source}")
    if job.pretrain is not None:
        job.log.say(f"{job.hook.description}: {job.pretrain.get('note', 'restored from the checkpoint')}")
    if cfg.symmetry_loss:
        job.log.say(f"symmetry loss: {cfg.symmetry_loss} rotated copies per batch (FLOPs × "
                    f"{cfg.symmetry_loss + 1}; atoms seen count the original batch)")
