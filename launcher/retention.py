"""Checkpoint retention and the disk a run needs, checked before its first step.

Every checkpoint keeps its weights and metadata (``model.safetensors`` + ``metadata.json``: the zoo
and ``zoo fit`` need each one), but only the last ``--keep-engine-state K`` (default 2) keep the
resumable engine state (``deepspeed/`` — ZeRO partitions, fp32 master weights and optimizer state —
and the loaders' positions), which is about four times the size of the weights. ``--resume`` takes
the latest checkpoint that still has it.

Sizes (bytes per trainable parameter), as DeepSpeed writes them for this launcher's schedule-free
AdamW:

- weights: 4 (fp32 safetensors of the averaged weights);
- engine state: module weights (4 in fp32, 2 in bf16) + fp32 master copy (4) + the optimizer's two
  fp32 state tensors per parameter (``z`` and ``exp_avg_sq``: 8) = 16 (fp32) or 14 (bf16).

>>> plan = disk_plan(n_params=1_000_000, checkpoints=10, keep=2, bf16=False)
>>> plan["weights_bytes"], plan["engine_bytes"], plan["needed_bytes"]
(4000000, 16000000, 88000000)
"""

from __future__ import annotations

import shutil
from pathlib import Path

from launcher.errors import UserError

#: bytes per parameter of the model-facing checkpoint (fp32 safetensors)
WEIGHT_BYTES = 4
#: bytes per parameter of the optimizer's state (schedule-free AdamW: z and exp_avg_sq, fp32)
OPTIMIZER_BYTES = 8
#: bytes per parameter of the fp32 master copy DeepSpeed's ZeRO optimizer keeps
MASTER_BYTES = 4
#: headroom kept free beyond the estimate (metadata, loader states, file-system slack)
MARGIN = 1.1
#: engine-state files of a checkpoint directory
ENGINE_FILES = ("deepspeed", "elastic", "loader-rank*.json")
#: bytes per parameter of the consolidated state for elastic resume (y, z, exp_avg_sq in fp32)
ELASTIC_BYTES = 12


def disk_plan(n_params: int, checkpoints: int, keep: int, bf16: bool, elastic: bool = False) -> dict:
    """Bytes a run will write: ``checkpoints`` weights + at most ``keep + 1`` engine states at once
    (with ``elastic``, each also holds the consolidated state of :mod:`launcher.elastic`).

    The ``+ 1``: a new checkpoint is complete (and the run resumable from it) before the oldest
    engine state beyond ``keep`` is deleted.
    """
    weights = WEIGHT_BYTES * n_params
    engine = ((2 if bf16 else 4) + MASTER_BYTES + OPTIMIZER_BYTES + (ELASTIC_BYTES if elastic else 0)) * n_params
    states = min(checkpoints, keep + 1)
    return {"checkpoints": checkpoints, "keep_engine_state": keep, "weights_bytes": weights,
            "engine_bytes": engine, "needed_bytes": checkpoints * weights + states * engine}


def check_disk(run_dir: Path, plan: dict) -> dict:
    """Add ``free_bytes`` (of the file system holding ``run_dir``) to ``plan``; refuse if too little.

    Raises
    ------
    UserError when the checkpoints would need more than the free space (with a margin of 10 %).
    """
    probe = Path(run_dir)
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    plan = {**plan, "free_bytes": free}
    if plan["needed_bytes"] * MARGIN > free:
        raise UserError(
            f"{run_dir}: the run's checkpoints need ≈{gb(plan['needed_bytes'])} ({plan['checkpoints']} × "
            f"{gb(plan['weights_bytes'])} of weights + up to {min(plan['checkpoints'], plan['keep_engine_state'] + 1)}"
            f" × {gb(plan['engine_bytes'])} of engine state) but only {gb(free)} is free; write fewer "
            "checkpoints (--checkpoint-fraction), keep fewer engine states (--keep-engine-state 1) or "
            "choose another --run-dir")
    return plan


def gb(n_bytes: float) -> str:
    """``n_bytes`` as a short human figure (``'7.7 GB'``, ``'310 MB'``, ``'42 kB'``)."""
    if n_bytes >= 1e9:
        return f"{n_bytes / 1e9:.1f} GB"
    return f"{n_bytes / 1e6:.0f} MB" if n_bytes >= 1e6 else f"{n_bytes / 1e3:.0f} kB"


def prune_engine_state(checkpoints_dir: Path, keep: int) -> list[Path]:
    """Delete the engine state of every complete checkpoint but the last ``keep``; returns those pruned.

    Weights and metadata stay. Call on rank 0 after a checkpoint is complete.
    """
    done = sorted(d for d in Path(checkpoints_dir).glob("step-*")
                  if d.is_dir() and not d.name.endswith(".partial") and (d / "deepspeed").is_dir())
    pruned = []
    for directory in done[:-keep] if keep > 0 else done:
        for pattern in ENGINE_FILES:
            for item in directory.glob(pattern):
                if item.is_dir():
                    shutil.rmtree(item)
                else:
                    item.unlink()
        pruned.append(directory)
    return pruned
