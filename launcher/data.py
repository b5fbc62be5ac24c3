"""The job's data: raw splits converted to shards once (cached), then streamed per rank.

``--train``/``--val`` may name a shard directory (holding ``index.json``) or raw inputs (an
``.aselmdb`` file or a directory of them, as OMol25 ships). Raw inputs are converted by rank 0
into ``<shards>/train`` and ``<shards>/val`` (default ``<train>/../shards``, git-ignored) with
:func:`datapipe.convert.convert`, which redoes nothing when the cache already matches its inputs;
the other ranks wait at a barrier and then read the same index. (Convert a large corpus beforehand
with ``python -m datapipe.convert``: a barrier waits at most torch.distributed's timeout.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from datapipe.convert import convert
from datapipe.index import INDEX_NAME, ShardIndex
from launcher.config import TrainConfig
from launcher.engine import Runtime, barrier, broadcast_object

#: structures per shard when the job converts raw inputs itself
SHARD_SIZE = 500


@dataclass
class Splits:
    """Shard indices of the two splits."""

    train: ShardIndex
    val: ShardIndex


def _shard_dir(split: str, name: str, cfg: TrainConfig) -> tuple[Path, bool]:
    """(shard directory, needs conversion) of one split."""
    path = Path(split)
    if (path / INDEX_NAME).is_file():
        return path, False
    root = Path(cfg.shards) if cfg.shards else Path(cfg.train).resolve().parent / "shards"
    return root / name, True


def prepare(cfg: TrainConfig, runtime: Runtime, workers: int | None = None) -> Splits:
    """Convert the splits if needed (rank 0) and load their indices on every rank.

    Raises
    ------
    FileNotFoundError / ValueError from :func:`datapipe.convert.convert` for missing or unreadable
    inputs (raised on rank 0 and re-raised on every rank, so no rank hangs at the barrier).
    """
    if workers is None:  # the other ranks wait at the barrier meanwhile: use the cores
        workers = max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))
    dirs = {}
    error = None
    for name, split in (("train", cfg.train), ("val", cfg.val)):
        directory, raw = _shard_dir(split, name, cfg)
        dirs[name] = directory
        if raw and runtime.is_main and error is None:
            try:
                convert([split], directory, shard_size=SHARD_SIZE, workers=workers)
            except Exception as exc:  # noqa: BLE001 - re-raised below on every rank
                error = f"converting {name} split {split!r}: {type(exc).__name__}: {exc}"
    error = broadcast_object(error)
    if error:
        raise RuntimeError(error)
    barrier()
    return Splits(ShardIndex.load(dirs["train"]), ShardIndex.load(dirs["val"]))
