"""Run checkpoints: the zoo's model format plus what DeepSpeed and the loader need to resume.

Layout of ``RUN_DIR/checkpoints/step-XXXXXXXX/``::

    model.safetensors, metadata.json   the self-describing model (zoo.hub.checkpoint); averaged weights
    deepspeed/state/...                engine.save_checkpoint (ZeRO partitions, optimizer state,
                                       client_state = the training counters)
    elastic/state.safetensors, .json   the same state consolidated (full fp32 weights and optimizer
                                       state), to resume on another world size (launcher.elastic)
    loader-rank00000.json, ...         each rank's StreamingLoader.state_dict() (JSON)

A checkpoint is written into ``step-XXXXXXXX.partial``, flushed to disk and renamed once every rank
has finished, so a run killed while saving leaves no half checkpoint that ``--resume`` could pick
up; a rank that cannot write (disk full) makes every rank raise :class:`CheckpointError` and
leaves the earlier checkpoints as they were.
The DeepSpeed part is DeepSpeed's own format (``torch.save``); it is only read back by
``engine.load_checkpoint`` of a resumed run — the model-facing files need no pickle.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from launcher import elastic, faults
from launcher.engine import Runtime, all_gather_objects, barrier, broadcast_object
from launcher.errors import UserError
from launcher.nodes import fsync_path
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
    ``skipped_*`` count what was not trained on (:mod:`launcher.health`): steps skipped by every
    rank (non-finite loss or gradient, a rank without readable data) and the structures/atoms of
    those steps and of unreadable shards (``--skip-bad-shards``); ``skips`` their records (the
    first :data:`launcher.health.MAX_RECORDS`); ``consecutive_skips`` the current run of skips.
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
    skipped_steps: int = 0
    skipped_structures: int = 0
    skipped_atoms: int = 0
    consecutive_skips: int = 0
    skips: list = field(default_factory=list)


def step_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def _loader_file(rank: int) -> str:
    return f"loader-rank{rank:05d}.json"


def save(run_dir, step: int, engine, eval_model, state: TrainState, loader_state: dict,
         metadata: dict, runtime: Runtime, elastic_config: dict | None = None) -> Path:
    """Write one checkpoint (collective: every rank must call it).

    Everything goes into ``step-XXXXXXXX.partial``; once every rank has written and flushed its
    files to disk (``fsync``), rank 0 renames it to ``step-XXXXXXXX`` and syncs the directory, so
    a crash at any moment (``kill -9``, power loss) leaves either the complete checkpoint or none
    (the partial directory is removed by the next save or ignored by :func:`find`).

    Parameters
    ----------
    engine : the DeepSpeed engine (its ``save_checkpoint`` is collective).
    eval_model : single-device model holding the averaged weights (written by rank 0).
    state : the counters, stored in DeepSpeed's ``client_state``.
    loader_state : this rank's ``loader.state_dict()``, JSON-serialisable.
    metadata : the checkpoint's metadata (see :mod:`zoo.hub.checkpoint`).
    elastic_config : the engine's DeepSpeed config when the run writes the consolidated state of
        :mod:`launcher.elastic` (None: it does not).

    Raises
    ------
    CheckpointError
        on every rank if any rank could not write (disk full, quota, permissions): the partial
        directory is removed and the previous checkpoints are untouched.
    """
    final = step_dir(run_dir, step)
    partial = final.with_name(final.name + ".partial")
    if runtime.is_main and partial.exists():
        shutil.rmtree(partial)
    barrier()
    error = None
    try:
        engine.save_checkpoint(str(partial / DS_DIR), tag=DS_TAG, client_state={"train_state": asdict(state)},
                               save_latest=False)
        if elastic_config is not None:  # collective gathers, written by rank 0
            elastic.save(partial, engine, runtime, asdict(state), elastic_config)
        faults.maybe_kill("kill-in-checkpoint", step, runtime.rank)
        (partial / _loader_file(runtime.rank)).write_text(json.dumps(loader_state))
        if runtime.is_main:
            faults.maybe_disk_full(step, runtime.rank, partial / "model.safetensors")
            save_checkpoint(partial, eval_model, metadata)
        _sync_tree(partial)
    except (OSError, RuntimeError) as exc:  # disk full, quota, permissions (torch.save raises RuntimeError)
        error = f"rank {runtime.rank}: {type(exc).__name__}: {exc}"
    errors = [e for e in all_gather_objects(error) if e]
    if not errors:  # every rank has written: rank 0 must see every rank's part
        errors = broadcast_object(_missing_parts(partial, runtime) if runtime.is_main else None) or []
    if errors:
        if runtime.is_main:
            shutil.rmtree(partial, ignore_errors=True)
        barrier()
        full = " (the disk is full)" if any("No space left" in e for e in errors) else ""
        raise CheckpointError(f"could not write checkpoint {final}{full}: {'; '.join(errors)}. The partial checkpoint "
                              f"was removed; earlier checkpoints are intact (latest complete: {_latest(run_dir)}). "
                              "Free space (or move the run directory), then continue with "
                              f"`--resume {Path(run_dir)}`")
    if runtime.is_main:
        if final.exists():  # the same step saved again by a resumed run
            shutil.rmtree(final)
        os.replace(partial, final)
        latest = final.parent / "latest"
        latest.with_suffix(".tmp").write_text(final.name + "\n")
        os.replace(latest.with_suffix(".tmp"), latest)
        fsync_path(final.parent)
    barrier()
    return final


def _missing_parts(partial: Path, runtime: Runtime) -> list[str]:
    """Rank 0's complaint if a rank's part of the checkpoint is not in its ``partial`` directory:
    that rank wrote to another file system (the run directory is not shared by every node)."""
    missing = [r for r in range(runtime.world_size) if not (partial / _loader_file(r)).is_file()]
    if not missing:
        return []
    return [f"rank 0: the parts of rank(s) {missing} are not in {partial}: they wrote to a file system rank 0 does not "
            "see; the run directory must be one folder shared by every node (docs/multinode.md)"]


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the message names the cause and what is intact."""


def _latest(run_dir) -> str:
    """The checkpoint a resume of ``run_dir`` would take, or ``"none yet"`` (the error message of a failed save
    names it; a failure of the first save must not be replaced by :func:`find`'s refusal)."""
    try:
        return str(find(run_dir))
    except (FileNotFoundError, UserError):
        return "none yet"




def _sync_tree(root: Path) -> None:
    """``fsync`` every file this process can see under ``root`` and the directories holding them.

    Every rank walks the whole tree while the others may still write theirs: a file gone between the
    listing and the open (another rank's temporary file, such as ``model.safetensors.tmp`` or
    DCP's ``.metadata.tmp``, renamed since) is skipped; its writer syncs it under its final name.
    """
    for folder, _, names in os.walk(root):
        for name in names:
            try:
                fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_path(Path(folder))


def find(path: str | os.PathLike) -> Path:
    """The checkpoint to resume from: ``path`` itself, or the latest one of a run dir that still holds
    its engine state (:mod:`launcher.retention` keeps it for the last ``--keep-engine-state`` only).

    Raises ``UserError`` if there is none, or if ``path`` is a checkpoint whose engine state was pruned.
    """
    path = Path(path)
    if path.name.endswith(".partial"):
        raise FileNotFoundError(f"--resume {path}: an unfinished checkpoint (written when the run stopped); "
                                f"resume from the run directory {path.parent.parent} instead")
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


def restore_loader(checkpoint: Path, loader, runtime: Runtime, refusal: str | None) -> bool:
    """Put ``loader`` where the checkpoint's run left its stream; returns whether the world size
    changed (then the rest of the epoch is re-planned, :meth:`~datapipe.loader.StreamingLoader.resume_elsewhere`,
    and :func:`load` takes the consolidated state of :mod:`launcher.elastic`).

    Raises
    ------
    UserError
        (on every rank alike) if the world size changed and ``refusal`` (the reason this engine
        cannot resume elsewhere) is set or the checkpoint holds no consolidated state.
    """
    files = sorted(checkpoint.glob("loader-rank*.json"))
    if len(files) == runtime.world_size and (checkpoint / _loader_file(runtime.rank)).is_file():
        loader.load_state_dict(json.loads((checkpoint / _loader_file(runtime.rank)).read_text()))
        return False
    where = f"--resume {checkpoint}: written by {len(files)} rank(s), this job has {runtime.world_size}"
    if refusal is not None:
        raise UserError(f"{where}; {refusal}")
    if not elastic.has_state(checkpoint):
        raise UserError(f"{where}, and the checkpoint holds no consolidated state ({elastic.ELASTIC_DIR}/: written by "
                        f"an older version, ZeRO-3 or FSDP); resume it on {len(files)} rank(s)")
    try:
        loader.resume_elsewhere([json.loads(path.read_text()) for path in files])
    except ValueError as error:
        raise UserError(f"{where}: {error}") from None
    return True


def load(checkpoint: Path, engine, runtime: Runtime, elsewhere: bool = False) -> tuple[TrainState, dict | None]:
    """Restore the engine (weights, optimizer, ZeRO partitions) and return the counters and, after
    a resume on another world size (``elsewhere``), the record of :func:`launcher.elastic.load`."""
    if elsewhere:
        state, record = elastic.load(checkpoint, engine, runtime)
        return TrainState(**state), record
    path, client = engine.load_checkpoint(str(checkpoint / DS_DIR), tag=DS_TAG, load_module_strict=True,
                                          load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load {checkpoint / DS_DIR}")
    return TrainState(**client["train_state"]), None
