"""Run checkpoints: the zoo's model format plus what DeepSpeed and the loader need to resume.

Layout of ``RUN_DIR/checkpoints/step-XXXXXXXX/``::

    model.safetensors, metadata.json   the self-describing model (zoo.hub.checkpoint); averaged weights
    deepspeed/state/...                engine.save_checkpoint (ZeRO partitions, optimizer state,
                                       client_state = the training counters)
    loader-rank00000.json, ...         each rank's StreamingLoader.state_dict() (JSON)

A checkpoint is written into ``step-XXXXXXXX.partial`` and renamed once every rank has finished,
so a run killed while saving leaves no half checkpoint that ``--resume`` could pick up.
The DeepSpeed part is DeepSpeed's own format (``torch.save``); it is only read back by
``engine.load_checkpoint`` of a resumed run — the model-facing files need no pickle.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from launcher.engine import Runtime, barrier
from launcher.errors import UserError
from zoo.hub.checkpoint import METADATA, save_checkpoint

DS_DIR = "deepspeed"
DS_TAG = "state"


@dataclass
class TrainState:
    """Counters of a run (global over ranks). ``flops`` is None while no FLOP counter exists.

    ``samples_seen``/``atoms_seen`` count training data (original structures only with the
    symmetry loss); ``model_atoms`` the atoms the model was evaluated on (× (M+1) with it) and
    ``forward_flops`` their forward FLOPs (for the measured κ); ``train_time_s`` the rank-0 time
    spent in training steps (loading included; validation and checkpoints excluded),
    ``train_cpu_time_s`` the CPU time of all ranks in them (rank 0's process CPU time × world size).
    """

    step: int = 0
    samples_seen: int = 0
    atoms_seen: int = 0
    flops: int | None = None
    wall_time_s: float = 0.0
    forward_flops: int | None = None
    model_atoms: int = 0
    train_time_s: float = 0.0
    train_cpu_time_s: float = 0.0


def step_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def _loader_file(rank: int) -> str:
    return f"loader-rank{rank:05d}.json"


def save(run_dir, step: int, engine, eval_model, state: TrainState, loader_state: dict,
         metadata: dict, runtime: Runtime) -> Path:
    """Write one checkpoint (collective: every rank must call it).

    Parameters
    ----------
    engine : the DeepSpeed engine (its ``save_checkpoint`` is collective).
    eval_model : single-device model holding the averaged weights (written by rank 0).
    state : the counters, stored in DeepSpeed's ``client_state``.
    loader_state : this rank's ``loader.state_dict()``, JSON-serialisable.
    metadata : the checkpoint's metadata (see :mod:`zoo.hub.checkpoint`).
    """
    final = step_dir(run_dir, step)
    partial = final.with_name(final.name + ".partial")
    if runtime.is_main and partial.exists():
        shutil.rmtree(partial)
    barrier()
    engine.save_checkpoint(str(partial / DS_DIR), tag=DS_TAG, client_state={"train_state": asdict(state)},
                           save_latest=False)
    (partial / _loader_file(runtime.rank)).write_text(json.dumps(loader_state))
    if runtime.is_main:
        save_checkpoint(partial, eval_model, metadata)
    barrier()
    if runtime.is_main:
        if final.exists():  # the same step saved again by a resumed run
            shutil.rmtree(final)
        os.replace(partial, final)
        latest = final.parent / "latest"
        latest.with_suffix(".tmp").write_text(final.name + "\n")
        os.replace(latest.with_suffix(".tmp"), latest)
    barrier()
    return final


def find(path: str | os.PathLike) -> Path:
    """The checkpoint to resume from: ``path`` itself, or the latest one of a run dir that still holds
    its engine state (:mod:`launcher.retention` keeps it for the last ``--keep-engine-state`` only).

    Raises ``UserError`` if there is none, or if ``path`` is a checkpoint whose engine state was pruned.
    """
    path = Path(path)
    if (path / METADATA).is_file():
        if (path / DS_DIR).is_dir():
            return path
        raise UserError(f"--resume {path}: this checkpoint keeps its weights only (its engine state was "
                        f"pruned, --keep-engine-state); resume from the run directory {run_dir_of(path)} instead")
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    done = sorted(d for d in folder.glob("step-*")
                  if d.is_dir() and not d.name.endswith(".partial") and (d / METADATA).is_file()
                  and (d / DS_DIR).is_dir())
    if not done:
        raise UserError(f"--resume {path}: no complete checkpoint with engine state (step-*/metadata.json "
                        "and step-*/deepspeed/) found")
    return done[-1]


def run_dir_of(checkpoint: Path) -> Path:
    """``RUN_DIR`` of ``RUN_DIR/checkpoints/step-X``."""
    return checkpoint.resolve().parent.parent


def load(checkpoint: Path, engine, runtime: Runtime) -> tuple[TrainState, dict]:
    """Restore the engine (weights, optimizer, ZeRO partitions) and return counters and loader state.

    Raises
    ------
    UserError
        if this rank's loader state is missing (the run was saved with another world size).
    """
    loader_path = checkpoint / _loader_file(runtime.rank)
    saved_ranks = len(list(checkpoint.glob("loader-rank*.json")))
    if saved_ranks != runtime.world_size or not loader_path.is_file():
        raise UserError(
            f"--resume {checkpoint}: written by {saved_ranks} ranks; resume it with the same number "
            f"(this job has {runtime.world_size})"
        )
    path, client = engine.load_checkpoint(str(checkpoint / DS_DIR), tag=DS_TAG, load_module_strict=True,
                                          load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load {checkpoint / DS_DIR}")
    state = TrainState(**client["train_state"])
    return state, json.loads(loader_path.read_text())
