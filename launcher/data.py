"""The job's data: raw splits converted to shards once (cached), then streamed per rank.

``--train``/``--val`` may name a shard directory (holding ``index.json``) or raw inputs (an
``.aselmdb`` file or a directory of them, as OMol25 ships). Raw inputs are converted by rank 0
with :func:`datapipe.convert.convert` (a progress bar over the input files; the other ranks wait at
a barrier and then read the same index) into

- the project's own shard cache, by default: ``<cache>/<split>-<key>`` where ``<cache>`` is
  ``$SYMSCALE_CACHE/shards`` or ``.cache/shards`` in the repository (git-ignored) and ``<key>`` a
  hash of the inputs' identity (resolved paths, sizes, modification times) and the shard size — so
  different data never shares a directory and nothing in the user's own folders is written;
- or ``--shards DIR`` (``DIR/train``, ``DIR/val``), which is refused if it holds anything but a
  conversion of the same input files (:func:`datapipe.convert.convert` never clobbers other data).

Structures the conversion rejected are counted per reason in the index; :func:`rejected_summary`
gives the run log and the checkpoints' metadata their counts. Convert a large corpus beforehand
with ``python -m datapipe.convert``: a barrier waits at most torch.distributed's timeout.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from datapipe.index import INDEX_NAME, ShardIndex
from datapipe.remote import is_remote, join
from launcher.config import REPO, TrainConfig
from launcher.engine import Runtime, barrier
from launcher.errors import UserError
from launcher.nodes import agree
from launcher.progress import Phase

#: structures per shard when the job converts raw inputs itself
SHARD_SIZE = 500
#: environment variable naming the project's cache directory (default: ``.cache`` in the repository)
CACHE_ENV = "SYMSCALE_CACHE"


@dataclass
class Splits:
    """Shard indices of the two splits."""

    train: ShardIndex
    val: ShardIndex


def cache_root() -> Path:
    """``$SYMSCALE_CACHE/shards``, else ``<repository>/.cache/shards``."""
    return Path(os.environ.get(CACHE_ENV) or REPO / ".cache") / "shards"


def input_key(split: str | os.PathLike, shard_size: int = SHARD_SIZE) -> str:
    """Hash (hex, 16 characters) of the identity of raw inputs: resolved paths, sizes, mtimes, shard size."""
    from datapipe.sources import expand_inputs  # reads ASE databases: imported only for raw inputs

    files = expand_inputs([split])
    identity = [[os.fspath(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    return hashlib.sha256(json.dumps([identity, shard_size]).encode()).hexdigest()[:16]


def shard_dir(split: str, name: str, cfg: TrainConfig) -> tuple[Path, bool]:
    """(shard directory, holds raw inputs) of one split (``name`` is ``train`` or ``val``); a
    ``http(s)://`` or ``pipe:`` location holds converted shards (:mod:`datapipe.remote`)."""
    if is_remote(split):
        return split, False
    path = Path(split)
    if (path / INDEX_NAME).is_file():
        return path, False
    if cfg.shards:
        return Path(cfg.shards) / name, True
    return cache_root() / f"{name}-{input_key(split)}", True


def _convert(split: str, directory: Path, name: str, workers: int) -> None:
    """Convert one raw split into ``directory`` (rank 0) with a progress bar over its input files."""
    from datapipe.convert import cached, convert  # ASE and SciPy (~2 s of imports): only for raw inputs
    from datapipe.sources import expand_inputs

    if cached([split], directory, SHARD_SIZE) is not None:
        return
    files = expand_inputs([split])
    sizes = {os.fspath(p): p.stat().st_size for p in files}
    total_mb = sum(sizes.values()) / 1e6
    with Phase(f"converting the {name} split", total=total_mb, unit="MB",
               detail=f"from {len(files)} files into {directory} (once)") as phase:
        convert([split], directory, shard_size=SHARD_SIZE, workers=workers,
                progress=lambda path, _: phase.advance(sizes[os.fspath(path)] / 1e6))


def prepare(cfg: TrainConfig, runtime: Runtime, workers: int | None = None) -> Splits:
    """Convert the splits if needed (rank 0) and load their indices on every rank.

    Raises
    ------
    UserError on every rank (so no rank hangs at the barrier) for missing or unreadable inputs,
    a ``--shards`` directory holding other data, or a split with no usable structure.
    """
    if workers is None:  # the other ranks wait at the barrier meanwhile: use the cores
        workers = max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))
    dirs = {}
    error = None
    for name, split in (("train", cfg.train), ("val", cfg.val)):
        if error is not None:
            break
        try:
            directory, raw = shard_dir(split, name, cfg)
            dirs[name] = directory
            if raw and runtime.is_main:
                _convert(split, directory, name, workers)
        except (OSError, ValueError, RuntimeError) as exc:
            flag = f"--shards {cfg.shards}" if isinstance(exc, FileExistsError) else f"--{name} {split}"
            error = f"{flag}: {exc}"
    agree(runtime, error)  # every rank raises (naming the ranks, on several nodes): none waits at the barrier
    barrier()
    splits = Splits(ShardIndex.load(dirs["train"]), ShardIndex.load(dirs["val"]))
    for name, index in (("train", splits.train), ("val", splits.val)):
        if index.n_structures < 1:
            raise UserError(f"--{name} {getattr(cfg, name)}: no usable structure "
                            f"({len(index.rejected)} rejected: {index.rejected_counts}; see {join(index.location, INDEX_NAME)})")
    return splits


def rejected_summary(splits: Splits) -> dict:
    """``{split: {"structures", "rejected", "reasons": {reason: n}, "index"}}``: what conversion dropped."""
    return {name: {"structures": index.n_structures, "rejected": len(index.rejected),
                   "reasons": dict(index.rejected_counts), "index": join(index.location, INDEX_NAME)}
            for name, index in (("train", splits.train), ("val", splits.val))}
