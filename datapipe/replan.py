"""Re-planning the rest of an epoch for another number of ranks (elastic resume).

A run checkpointed by ``W`` ranks after ``c`` steps has consumed, on every rank, the first ``c``
batches of its planned sequence (:mod:`datapipe.plan`). Resumed on ``W'`` ranks, the rest of the
epoch is planned again so that every structure of the selection is still seen exactly once:

1. **Remaining.** For each stream of the old plan, the positions not yet emitted
   (``order[bounds[skip]:]``, ``skip`` the stream's share of the ``c`` batches in the DataLoader's
   round robin, :func:`datapipe.plan.interleave`) are put back in read order; the streams are
   concatenated in stream order. The result is the remaining structures in the old global order
   (within a shard, increasing rows).
2. **Streams.** That list is cut into ``W' * max(num_workers, 1)`` contiguous segments of nearly
   equal atoms, as :func:`datapipe.plan.build_plan` cuts a fresh selection. A segment's structures of
   one shard become one piece ``(shard, first row, last row + 1)``; the rows in between that were
   already consumed (held back by a shuffle buffer) are holes: the stream's positions number every
   row of its pieces, ``order`` lists only the remaining ones, and the reader skips the holes
   without decoding them (:func:`datapipe.loader.iter_stream_batches` reads only wanted positions).
3. **Shuffle, pack, equal steps** as in a fresh plan, seeded by ``(seed, epoch, 2 + generation,
   stream)`` where ``generation`` counts the re-plans of this epoch.

The plan of a resumed epoch is therefore a pure function of the original plan's parameters and the
``lineage``: the ``(world_size, num_workers, batches)`` of each earlier segment of the epoch. A run
resumed several times on different world sizes re-plans once per segment, in order.

>>> from datapipe.plan import Stream
>>> s = Stream(pieces=[(0, 0, 4)], natoms=np.array([3, 4, 5, 6]), order=np.array([2, 0, 3, 1]),
...            bounds=np.array([0, 2, 4]))
>>> _remaining_rows(s, 1)  # batch 0 (positions 2, 0) consumed: rows 1 and 3 of shard 0 remain
(array([0, 0]), array([1, 3]))
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from datapipe.index import ShardIndex
from datapipe.plan import (Plan, Stream, _ArraySelection, _equal_atom_cuts, _equalize, interleave_arrays, pack,
                           shuffle_order, worker_skips)


def _positions_to_rows(stream: Stream) -> tuple[np.ndarray, np.ndarray]:
    """``([n] shard, [n] row)`` of every stream position (positions number the pieces' rows)."""
    if not stream.pieces:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    shards = np.concatenate([np.full(stop - start, shard, np.int64) for shard, start, stop in stream.pieces])
    rows = np.concatenate([np.arange(start, stop, dtype=np.int64) for _, start, stop in stream.pieces])
    return shards, rows


def _remaining_rows(stream: Stream, skip: int) -> tuple[np.ndarray, np.ndarray]:
    """``(shard, row)`` of the structures ``stream`` has not emitted after its first ``skip``
    batches, in read order."""
    left = np.sort(stream.order[int(stream.bounds[skip]):]) if skip < stream.n_batches else np.zeros(0, np.int64)
    shards, rows = _positions_to_rows(stream)
    return shards[left], rows[left]


def remaining(plan: Plan, consumed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(shard [n], row [n])`` of the structures no rank has consumed after ``consumed`` steps of
    ``plan`` (every rank takes the same steps), in the plan's global read order."""
    if not 0 <= consumed <= plan.steps:
        raise ValueError(f"{consumed} consumed steps outside 0..{plan.steps}")
    shards, rows = [], []
    for streams in plan.streams:
        skips = worker_skips(interleave_arrays([s.n_batches for s in streams])[0], consumed, len(streams))
        for stream, skip in zip(streams, skips):
            a, b = _remaining_rows(stream, skip)
            shards.append(a)
            rows.append(b)
    return np.concatenate(shards), np.concatenate(rows)


def plan_rows(index: ShardIndex, shards: np.ndarray, rows: np.ndarray, *, world_size: int, num_workers: int,
              atoms_per_batch: int, shuffle: bool, shuffle_buffer: int, seed: int, epoch: int, generation: int,
              plan_id: str, config: dict) -> Plan:
    """A plan over the given structures (in global read order; a shard's rows contiguous in the
    list and increasing) for ``world_size`` ranks — steps 2-3 of the module docstring.

    Raises
    ------
    ValueError if nothing remains or the ranks cannot be given equal step counts.
    """
    if len(rows) == 0:
        raise ValueError("no structure of the epoch remains to be planned")
    natoms = _natoms_of(index, shards, rows)  # [n]
    workers = max(num_workers, 1)
    cuts = _equal_atom_cuts(_ArraySelection(natoms), world_size * workers)
    streams = []
    for s in range(world_size * workers):
        lo, hi = int(cuts[s]), int(cuts[s + 1])
        stream, kept, offset = Stream(), [], 0
        seg_shards, seg_rows = shards[lo:hi], rows[lo:hi]
        starts = np.flatnonzero(np.diff(seg_shards, prepend=-1)) if hi > lo else np.zeros(0, np.int64)
        for a, b in zip(starts, [*starts[1:], hi - lo]):
            shard, first, last = int(seg_shards[a]), int(seg_rows[a]), int(seg_rows[b - 1])
            stream.pieces.append((shard, first, last + 1))
            kept.append(offset + seg_rows[a:b] - first)
            offset += last + 1 - first
        stream.natoms = np.concatenate([index.natoms(sh)[a:b] for sh, a, b in stream.pieces]) if stream.pieces \
            else np.zeros(0, np.int64)
        kept = np.concatenate(kept) if kept else np.zeros(0, np.int64)
        if shuffle:
            rng = np.random.default_rng([seed, epoch, 2 + generation, s])
            stream.order = kept[shuffle_order(len(kept), shuffle_buffer, rng)]
        else:
            stream.order = kept
        stream.bounds = pack(stream.natoms[stream.order], atoms_per_batch)
        streams.append(stream)
    by_rank = [streams[r * workers:(r + 1) * workers] for r in range(world_size)]
    steps = max(sum(s.n_batches for s in rank_streams) for rank_streams in by_rank)
    for rank, rank_streams in enumerate(by_rank):
        _equalize(rank_streams, steps, rank)
    return Plan(by_rank, steps, len(rows), int(natoms.sum()), plan_id, config)


def _natoms_of(index: ShardIndex, shards: np.ndarray, rows: np.ndarray) -> np.ndarray:
    out = np.empty(len(rows), np.int64)
    for shard in np.unique(shards):
        mask = shards == shard
        out[mask] = index.natoms(int(shard))[rows[mask]]
    return out


def replan(index: ShardIndex, base: dict, lineage: list[dict], world_size: int, num_workers: int,
           build) -> Plan:
    """The plan of the rest of the epoch for ``world_size`` ranks after the segments of ``lineage``.

    Parameters
    ----------
    base : the keyword arguments of :func:`datapipe.plan.build_plan` of the epoch (without
        ``world_size``/``num_workers``).
    lineage : ``[{"world_size", "num_workers", "batches"}, …]``, the earlier segments of the epoch,
        first the original plan's; ``batches`` the steps every rank took in that segment.
    build : :func:`datapipe.plan.build_plan` (passed in, so that this module imports no loader).

    Returns a :class:`Plan` whose ``plan_id`` hashes the base parameters, the lineage and the new
    layout; the same inputs give the same plan on every rank.
    """
    if not lineage:
        raise ValueError("replan needs at least one earlier segment")
    first = lineage[0]
    plan = build(index, world_size=int(first["world_size"]), num_workers=int(first["num_workers"]), **base)
    for generation, segment in enumerate(lineage):
        shards, rows = remaining(plan, int(segment["batches"]))
        target = lineage[generation + 1] if generation + 1 < len(lineage) else {"world_size": world_size,
                                                                                   "num_workers": num_workers}
        config = {**plan.config, "lineage": lineage[:generation + 1], "world_size": int(target["world_size"]),
                  "num_workers": int(target["num_workers"])}
        plan_id = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
        try:
            plan = plan_rows(index, shards, rows, world_size=int(target["world_size"]),
                             num_workers=int(target["num_workers"]), atoms_per_batch=base["atoms_per_batch"],
                             shuffle=base["shuffle"], shuffle_buffer=base["shuffle_buffer"], seed=base["seed"],
                             epoch=base["epoch"], generation=generation, plan_id=plan_id, config=config)
        except ValueError as error:
            raise ValueError(f"re-planning the {len(rows)} structures left after "
                             f"{sum(int(s['batches']) for s in lineage[:generation + 1])} steps for "
                             f"{target['world_size']} rank(s): {error}") from None
    return plan
