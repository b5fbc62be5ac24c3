"""The epoch plan: which structures every (rank, worker) stream emits, in which order and batches.

Every rank computes the same plan from the shard index alone (atoms per structure), so ranks
agree on the number of steps without communicating. The plan is built in five deterministic steps:

1. **Global order.** Shards in a seeded permutation (``shuffle=False``: index order); within a
   shard, rows in stored order. This order does not depend on ranks or workers.
2. **Selection.** With a data budget (``max_atoms`` and/or ``max_structures``), the longest
   prefix of the global order that stays within it; the last shard may be cut part way. The
   selection is the same for any number of ranks and workers.
3. **Streams.** The selection, in global order, is cut into ``world_size * max(num_workers, 1)``
   contiguous segments of (as nearly as possible) equal atoms; segment ``s`` is stream ``s``,
   i.e. worker ``s % W`` of rank ``s // W``. A segment is a list of pieces, each a row range of one
   shard; a shard cut between two streams is read by both, each skipping the other's rows without
   decoding them. This also covers fewer shards than streams: a shard is then split over several
   streams. Ranks thus hold equal atoms to within about one structure.
4. **Shuffle and pack.** Each stream simulates a shuffle buffer of ``shuffle_buffer`` structures
   (fill; then each new structure replaces a uniformly drawn one, which is emitted; at the end
   the rest drain in random order), seeded by ``(seed, epoch, stream)``, then packs the emitted
   sequence greedily into batches of at most ``atoms_per_batch`` atoms. A structure larger than
   the budget is a batch of its own (it is never dropped or cut).
5. **Equal steps.** Every rank must yield the same number of batches ``T`` (the largest count).
   A rank with fewer splits its largest multi-structure batch (by atoms, ties: first) in two at
   the atom midpoint, repeatedly, until it has ``T``. No batch is ever empty; if a rank runs out
   of batches to split (fewer structures than ``T``), planning fails with a clear error.

The runtime reader (:mod:`datapipe.loader`) emits exactly these batches: the emission order is a
pure function of the seed and stream length, so the reader follows the planned order holding at
most about ``shuffle_buffer`` decoded structures.

A torch DataLoader with ``W`` workers yields their batches round robin (worker 0, 1, …, W-1,
0, …), dropping a worker from the rotation once it is exhausted; :func:`interleave` reproduces
that order, which makes a rank's batch sequence, and its resume point, deterministic.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
from dataclasses import dataclass, field

import numpy as np

from datapipe.index import ShardIndex


@dataclass
class Stream:
    """What one (rank, worker) reads and emits.

    pieces : list of ``(shard, start, stop)`` row ranges, read in this order; the stream's
        positions ``0..n-1`` number their rows consecutively.
    natoms : ``[n]`` int64 atoms per stream position.
    order : ``[n]`` int64 stream positions in emission order.
    bounds : ``[n_batches + 1]`` int64 offsets into ``order``; batch ``b`` is
        ``order[bounds[b]:bounds[b+1]]``.
    """

    pieces: list[tuple[int, int, int]] = field(default_factory=list)
    natoms: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    order: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    bounds: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))

    @property
    def n_batches(self) -> int:
        return len(self.bounds) - 1

    def batch_atoms(self) -> np.ndarray:
        """``[n_batches]`` atoms in each batch."""
        cumulative = np.concatenate([[0], np.cumsum(self.natoms[self.order])])
        return cumulative[self.bounds[1:]] - cumulative[self.bounds[:-1]]


@dataclass
class Plan:
    """The epoch plan for all ranks (see module docstring). ``streams[rank][worker]``."""

    streams: list[list[Stream]]
    steps: int
    total_structures: int
    total_atoms: int
    plan_id: str
    config: dict

    def rank_structures(self, rank: int) -> int:
        return int(sum(len(s.order) for s in self.streams[rank]))

    def rank_atoms(self, rank: int) -> int:
        return int(sum(s.natoms[s.order].sum() for s in self.streams[rank]))


def shuffle_order(n: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """Emission order of a shuffle buffer of size ``buffer`` over ``n`` items read in order.

    Returns ``[n]`` int64, a permutation of ``0..n-1`` in which item ``t`` is emitted at or after
    step ``t - buffer`` (so a reader holds at most ``buffer`` pending items).
    """
    if n == 0:
        return np.zeros(0, np.int64)
    buffer = max(1, min(int(buffer), n))
    held = list(range(buffer))
    draws = rng.integers(0, buffer, size=n - buffer) if n > buffer else []
    out = np.empty(n, np.int64)
    for t, j in enumerate(draws):
        out[t] = held[j]
        held[j] = buffer + t
    out[n - buffer:] = np.asarray(held, np.int64)[rng.permutation(buffer)]
    return out


def pack(natoms: np.ndarray, budget: int) -> np.ndarray:
    """Greedy packing of ``natoms`` (in emission order) into consecutive batches of at most
    ``budget`` atoms; a structure above the budget is a batch alone. Returns bounds ``[b + 1]``."""
    bounds, current = [0], 0
    for i, n in enumerate(natoms.tolist()):
        if current and current + n > budget:
            bounds.append(i)
            current = 0
        current += n
    if len(natoms):
        bounds.append(len(natoms))
    return np.asarray(bounds, np.int64)


def interleave(counts: list[int]) -> list[tuple[int, int]]:
    """``(worker, batch)`` sequence a torch DataLoader yields from workers with ``counts``
    batches: round robin in worker order, exhausted workers dropped."""
    out, taken = [], [0] * len(counts)
    while len(out) < sum(counts):
        for w, c in enumerate(counts):
            if taken[w] < c:
                out.append((w, taken[w]))
                taken[w] += 1
    return out


def _equal_atom_cuts(natoms: np.ndarray, parts: int) -> np.ndarray:
    """Offsets ``[parts + 1]`` cutting ``natoms`` into ``parts`` contiguous segments of nearly
    equal atom sums; every segment is non-empty when there are at least ``parts`` structures."""
    n = len(natoms)
    cumulative = np.concatenate([[0], np.cumsum(natoms)])  # [n + 1]
    targets = cumulative[-1] * np.arange(1, parts) / parts
    right = np.clip(np.searchsorted(cumulative, targets, side="left"), 1, n)
    left = right - 1
    cuts = np.where(targets - cumulative[left] <= cumulative[right] - targets, left, right)
    cuts = np.concatenate([[0], cuts, [n]]).astype(np.int64)
    if n >= parts:  # strictly increasing, leaving room for the segments after
        for k in range(1, parts):
            cuts[k] = min(max(cuts[k], cuts[k - 1] + 1), n - (parts - k))
    return cuts


def _equalize(streams: list[Stream], target: int, rank: int) -> None:
    count = sum(s.n_batches for s in streams)
    if count >= target:
        return
    heap = []  # (-atoms, worker, start) of multi-structure batches
    starts = [{} for _ in streams]  # start -> stop, per worker
    for w, stream in enumerate(streams):
        atoms = stream.batch_atoms()
        for b in range(stream.n_batches):
            start, stop = int(stream.bounds[b]), int(stream.bounds[b + 1])
            starts[w][start] = stop
            if stop - start > 1:
                heapq.heappush(heap, (-int(atoms[b]), w, start))
    while count < target:
        if not heap:
            raise ValueError(
                f"cannot give rank {rank} {target} batches: it holds {sum(len(s.order) for s in streams)} "
                f"structures in {count} batches that cannot be split further; use fewer ranks or workers, "
                "a smaller atoms_per_batch, or more data")
        _, w, start = heapq.heappop(heap)
        stop = starts[w][start]
        sizes = streams[w].natoms[streams[w].order[start:stop]]
        cumulative = np.cumsum(sizes)
        cut = int(np.argmin(np.abs(cumulative[:-1] - cumulative[-1] / 2))) + 1 + start  # both halves non-empty
        starts[w][start], starts[w][cut] = cut, stop
        for a, b in ((start, cut), (cut, stop)):
            if b - a > 1:
                heapq.heappush(heap, (-int(sizes[a - start:b - start].sum()), w, a))
        count += 1
    for w, stream in enumerate(streams):
        stream.bounds = np.asarray(sorted(starts[w]) + [len(stream.order)] if starts[w] else [0], np.int64)


def build_plan(
    index: ShardIndex,
    *,
    world_size: int = 1,
    num_workers: int = 0,
    atoms_per_batch: int = 1024,
    shuffle: bool = True,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    epoch: int = 0,
    max_atoms: int | None = None,
    max_structures: int | None = None,
) -> Plan:
    """The deterministic epoch plan (see the module docstring for the algorithm).

    Raises
    ------
    ValueError if the selection is empty or the ranks cannot be given equal step counts.
    """
    if atoms_per_batch < 1 or world_size < 1 or num_workers < 0:
        raise ValueError(f"need atoms_per_batch >= 1, world_size >= 1, num_workers >= 0; got "
                         f"{atoms_per_batch}, {world_size}, {num_workers}")
    config = {"data_hash": index.data_hash, "world_size": world_size, "num_workers": num_workers,
              "atoms_per_batch": atoms_per_batch, "shuffle": shuffle, "shuffle_buffer": shuffle_buffer if shuffle else 0,
              "seed": seed, "epoch": epoch, "max_atoms": max_atoms, "max_structures": max_structures,
              "algorithm": 2}
    plan_id = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    n_shards = len(index.shards)
    rng = np.random.default_rng([seed, epoch, 0])
    shard_order = rng.permutation(n_shards) if shuffle else np.arange(n_shards)

    pieces, atoms_left = [], math.inf if max_atoms is None else int(max_atoms)
    structures_left = math.inf if max_structures is None else int(max_structures)
    for shard in shard_order.tolist():
        natoms = index.natoms(shard)
        cumulative = np.cumsum(natoms)
        take = min(int(np.searchsorted(cumulative, atoms_left, side="right")), len(natoms))
        take = int(min(take, structures_left))
        if take > 0:
            pieces.append((shard, 0, take))
            atoms_left -= int(cumulative[take - 1])
            structures_left -= take
        if take < len(natoms):
            break
    total_structures = sum(stop - start for _, start, stop in pieces)
    if total_structures == 0:
        raise ValueError(f"the selection is empty ({index.n_structures} structures in the index, "
                         f"max_atoms={max_atoms}, max_structures={max_structures})")

    workers = max(num_workers, 1)
    n_streams = world_size * workers
    selected = np.concatenate([index.natoms(shard)[start:stop] for shard, start, stop in pieces])  # [n]
    cuts = _equal_atom_cuts(selected, n_streams)  # [n_streams + 1] offsets into the selection
    streams = [Stream() for _ in range(n_streams)]
    piece_offsets = np.cumsum([0] + [stop - start for _, start, stop in pieces])
    for s, stream in enumerate(streams):
        lo, hi = int(cuts[s]), int(cuts[s + 1])
        first = int(np.searchsorted(piece_offsets, lo, side="right")) - 1
        for p in range(max(first, 0), len(pieces)):
            if piece_offsets[p] >= hi:
                break
            shard, start, _ = pieces[p]
            a, b = max(lo, piece_offsets[p]), min(hi, piece_offsets[p + 1])
            if b > a:
                stream.pieces.append((shard, start + int(a - piece_offsets[p]), start + int(b - piece_offsets[p])))
        stream.natoms = selected[lo:hi]

    for s, stream in enumerate(streams):
        n = len(stream.natoms)
        if shuffle:
            stream.order = shuffle_order(n, shuffle_buffer, np.random.default_rng([seed, epoch, 1, s]))
        else:
            stream.order = np.arange(n, dtype=np.int64)
        stream.bounds = pack(stream.natoms[stream.order], atoms_per_batch)

    by_rank = [streams[r * workers:(r + 1) * workers] for r in range(world_size)]
    steps = max(sum(s.n_batches for s in rank_streams) for rank_streams in by_rank)
    for rank, rank_streams in enumerate(by_rank):
        _equalize(rank_streams, steps, rank)
    total_atoms = int(sum(s.natoms.sum() for s in streams))
    return Plan(by_rank, steps, total_structures, total_atoms, plan_id, config)
