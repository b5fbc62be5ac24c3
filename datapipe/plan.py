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

Scale: every step is vectorised with numpy (no Python object per structure; the selection and the
stream cuts are found shard by shard from per-shard atom sums), and ``build_plan(..., rank=r)``
keeps only rank ``r``'s streams, so a rank holds O(structures / world_size) arrays; the plan is the
same, array for array, as the per-structure algorithm 2 it replaced (see docs/data.md for the
measured time and memory at 10^8 structures).

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
    natoms : ``[n]`` int32 atoms per stream position.
    order : ``[n]`` int64 stream positions in emission order.
    bounds : ``[n_batches + 1]`` int64 offsets into ``order``; batch ``b`` is
        ``order[bounds[b]:bounds[b+1]]``.
    """

    pieces: list[tuple[int, int, int]] = field(default_factory=list)
    natoms: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
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
    structures_per_rank: list[int] = field(default_factory=list)
    atoms_per_rank: list[int] = field(default_factory=list)

    def rank_structures(self, rank: int) -> int:
        if self.structures_per_rank:
            return int(self.structures_per_rank[rank])
        return int(sum(len(s.order) for s in self.streams[rank]))  # a re-planned rest (datapipe.replan)

    def rank_atoms(self, rank: int) -> int:
        if self.atoms_per_rank:
            return int(self.atoms_per_rank[rank])
        return int(sum(s.natoms[s.order].sum() for s in self.streams[rank]))  # planned positions only


def shuffle_order(n: int, buffer: int, rng: np.random.Generator, chunk: int = 1 << 20) -> np.ndarray:
    """Emission order of a shuffle buffer of size ``buffer`` over ``n`` items read in order.

    The buffer is filled with items ``0..buffer-1``; at step ``t`` a slot ``j_t`` drawn uniformly
    emits its item and takes item ``buffer + t``; at the end the held items drain in a random
    permutation. Vectorised: the item a slot holds at step ``t`` is ``buffer + t'`` for the last
    earlier step ``t'`` that drew the same slot (or the slot's first item), found with a stable
    sort of the draws, ``chunk`` draws at a time (memory O(chunk + buffer), not O(n) Python objects).

    Returns ``[n]`` int64, a permutation of ``0..n-1`` in which item ``t`` is emitted at or after
    step ``t - buffer`` (so a reader holds at most ``buffer`` pending items).

    >>> shuffle_order(6, 2, np.random.default_rng(0)).tolist()
    [1, 2, 3, 0, 4, 5]
    """
    if n == 0:
        return np.zeros(0, np.int64)
    buffer = max(1, min(int(buffer), n))
    held = np.arange(buffer, dtype=np.int64)  # [buffer] item in each slot
    out = np.empty(n, np.int64)
    small = np.uint16 if buffer <= 1 << 16 else np.int64  # 16-bit keys sort by radix (linear time)
    for t0 in range(0, n - buffer, chunk):
        draws = rng.integers(0, buffer, size=min(chunk, n - buffer - t0))  # [c] slots, same stream as one call
        idx = np.argsort(draws.astype(small), kind="stable")  # [c] steps grouped by slot, in time order
        slots = draws[idx]
        same = slots[1:] == slots[:-1]  # [c - 1] consecutive draws of one slot
        previous = np.full(len(draws), -1, np.int64)
        previous[idx[1:][same]] = idx[:-1][same]
        out[t0:t0 + len(draws)] = np.where(previous >= 0, buffer + t0 + previous, held[draws])
        last = np.append(~same, True)  # [c] the last draw of each slot in this chunk
        held[slots[last]] = buffer + t0 + idx[last]
    out[n - buffer:] = held[rng.permutation(buffer)]
    return out


def pack(natoms: np.ndarray, budget: int, window: int = 1 << 20) -> np.ndarray:
    """Greedy packing of ``natoms`` (in emission order) into consecutive batches of at most
    ``budget`` atoms; a structure above the budget is a batch alone. Returns bounds ``[b + 1]``.

    A batch starting at ``s`` ends before the first ``e`` whose prefix sum from ``s`` exceeds the
    budget: one vectorised ``searchsorted`` per window of ``window`` structures finds every
    candidate end, and a loop over batches (not structures) follows them.

    >>> pack(np.array([3, 3, 5, 1, 9, 2]), 6).tolist()
    [0, 2, 4, 5, 6]
    """
    n = len(natoms)
    bounds, s = [0], 0
    while s < n:
        lo, hi = s, min(n, s + window)
        cumulative = np.cumsum(natoms[lo:hi], dtype=np.int64)  # [w] atoms of positions lo..i
        before = np.concatenate([[0], cumulative[:-1]])  # [w] atoms before position i
        ends = np.maximum(np.searchsorted(cumulative, before + budget, side="right"), np.arange(1, hi - lo + 1))
        i = 0
        while True:
            e = int(ends[i])
            if e >= hi - lo and hi < n:  # the batch may run past the window: next window starts here
                break
            bounds.append(lo + e)
            i = e
            if lo + e >= n:
                break
        if lo + i == s and hi < n:
            window *= 2  # one batch longer than the window
        s = lo + i
    return np.asarray(bounds, np.int64)


def interleave_arrays(counts) -> tuple[np.ndarray, np.ndarray]:
    """``(worker [T], batch [T])`` int64 arrays of the sequence a torch DataLoader yields from
    workers with ``counts`` batches: round robin in worker order, exhausted workers dropped, i.e.
    the pairs ``(w, b)``, ``b < counts[w]``, sorted by ``b`` then ``w``.

    >>> [a.tolist() for a in interleave_arrays([3, 1, 2])]
    [[0, 1, 2, 0, 2, 0], [0, 0, 0, 1, 1, 2]]
    """
    counts = np.asarray(counts, np.int64)
    worker = np.repeat(np.arange(len(counts)), counts)  # [T] grouped by worker
    batch = np.arange(len(worker)) - np.repeat(np.cumsum(counts) - counts, counts)
    order = np.lexsort((worker, batch))
    return worker[order], batch[order]


def worker_skips(workers: np.ndarray, consumed: int, n_workers: int) -> list[int]:
    """Batches each worker has handed out after the first ``consumed`` steps of the interleaved
    sequence ``workers`` (``[T]``, from :func:`interleave_arrays`).

    >>> worker_skips(interleave_arrays([3, 1, 2])[0], 4, 3)
    [2, 1, 1]
    """
    return np.bincount(workers[:consumed], minlength=n_workers).tolist()


def interleave(counts: list[int]) -> list[tuple[int, int]]:
    """:func:`interleave_arrays` as a list of ``(worker, batch)`` pairs (for small counts)."""
    worker, batch = interleave_arrays(counts)
    return list(zip(worker.tolist(), batch.tolist()))


class _Selection:
    """The epoch's selection as pieces ``(shard, start, stop)`` in global order, with offsets.

    ``offsets [P + 1]``: structures before each piece; ``prefix [P + 1]``: atoms before each
    piece. Positions are read from the index one piece at a time, never all at once."""

    def __init__(self, index: ShardIndex, pieces: list[tuple[int, int, int]], atoms: list[int]):
        self.index, self.pieces = index, pieces
        self.offsets = np.concatenate([[0], np.cumsum([b - a for _, a, b in pieces])]).astype(np.int64)
        self.prefix = np.concatenate([[0], np.cumsum(atoms)]).astype(np.int64)

    def natoms(self, p: int) -> np.ndarray:
        shard, start, stop = self.pieces[p]
        return self.index.natoms(shard)[start:stop]

    def cumulative(self, position: int) -> int:
        """Atoms of the selection's positions ``0..position-1``."""
        p = min(int(np.searchsorted(self.offsets, position, side="right")) - 1, len(self.pieces) - 1)
        return int(self.prefix[p] + self.natoms(p)[:position - self.offsets[p]].sum())

    def first_reaching(self, target: float) -> int:
        """Smallest position ``q`` with ``cumulative(q) >= target`` (``target > 0``)."""
        p = min(int(np.searchsorted(self.prefix[1:], target, side="left")), len(self.pieces) - 1)
        local = np.cumsum(self.natoms(p))
        return int(self.offsets[p] + np.searchsorted(local, target - self.prefix[p], side="left") + 1)


class _ArraySelection(_Selection):
    """A selection given as one array of per-structure atom counts ``[n]`` (the structures a
    re-plan distributes, :mod:`datapipe.replan`), for :func:`_equal_atom_cuts`."""

    def __init__(self, natoms: np.ndarray):
        self.array = np.asarray(natoms)
        super().__init__(None, [(-1, 0, len(self.array))], [int(self.array.sum())])

    def natoms(self, p: int) -> np.ndarray:
        return self.array


def _select(index: ShardIndex, shard_order: np.ndarray, max_atoms, max_structures) -> _Selection:
    """The longest prefix of the global order within the budget (the last shard may be cut)."""
    atoms = index.shard_atoms[shard_order]  # [S] in global order
    structures = index.shard_structures[shard_order]
    full = len(shard_order)
    if max_atoms is not None:
        full = min(full, int(np.searchsorted(np.cumsum(atoms), int(max_atoms), side="right")))
    if max_structures is not None:
        full = min(full, int(np.searchsorted(np.cumsum(structures), int(max_structures), side="right")))
    pieces = [(s, 0, n) for s, n in zip(shard_order[:full].tolist(), structures[:full].tolist())]
    piece_atoms = atoms[:full].tolist()
    if full < len(shard_order):
        shard = int(shard_order[full])
        natoms = index.natoms(shard)
        cumulative = np.cumsum(natoms)
        atoms_left = math.inf if max_atoms is None else int(max_atoms) - int(atoms[:full].sum())
        structures_left = math.inf if max_structures is None else int(max_structures) - int(structures[:full].sum())
        take = int(min(min(int(np.searchsorted(cumulative, atoms_left, side="right")), len(natoms)), structures_left))
        if take > 0:
            pieces.append((shard, 0, take))
            piece_atoms.append(int(cumulative[take - 1]))
    return _Selection(index, pieces, piece_atoms)


def _equal_atom_cuts(selection: _Selection, parts: int) -> np.ndarray:
    """Offsets ``[parts + 1]`` cutting the selection into ``parts`` contiguous segments of nearly
    equal atom sums; every segment is non-empty when there are at least ``parts`` structures.
    Each cut is the position whose atom prefix is nearest to ``k/parts`` of the total (ties: the
    earlier), found piece by piece."""
    n, total = int(selection.offsets[-1]), selection.prefix[-1]
    targets = total * np.arange(1, parts) / parts
    cuts = np.zeros(parts + 1, np.int64)
    cuts[-1] = n
    for k, target in enumerate(targets.tolist(), start=1):
        right = min(max(selection.first_reaching(target), 1), n)
        left = right - 1
        cum_left, cum_right = selection.cumulative(left), selection.cumulative(right)
        cuts[k] = left if target - cum_left <= cum_right - target else right
    if n >= parts:  # strictly increasing, leaving room for the segments after
        for k in range(1, parts):
            cuts[k] = min(max(cuts[k], cuts[k - 1] + 1), n - (parts - k))
    return cuts


def _split_error(rank: int, target: int, structures: int, count: int) -> ValueError:
    return ValueError(
        f"cannot give rank {rank} {target} batches: it holds {structures} "
        f"structures in {count} batches that cannot be split further; use fewer ranks or workers, "
        "a smaller atoms_per_batch, or more data")


def _equalize(streams: list[Stream], target: int, rank: int) -> None:
    """Split the largest multi-structure batches (by atoms; ties: worker, then start) at their
    atom midpoint until the rank has ``target`` batches. Only the ``target - count`` largest
    batches can ever be split (halves are never larger than their parent), so only they enter
    the heap."""
    count = sum(s.n_batches for s in streams)
    deficit = target - count
    if deficit <= 0:
        return
    candidates = []
    for w, stream in enumerate(streams):
        atoms, sizes = stream.batch_atoms(), np.diff(stream.bounds)
        multi = np.flatnonzero(sizes > 1)
        candidates.append((atoms[multi], np.full(len(multi), w), stream.bounds[multi], stream.bounds[multi + 1]))
    atoms, workers, starts, stops = (np.concatenate(c) for c in zip(*candidates))
    top = np.lexsort((starts, workers, -atoms))[:deficit]
    heap = [(-int(atoms[i]), int(workers[i]), int(starts[i]), int(stops[i])) for i in top]
    heapq.heapify(heap)
    cuts = [[] for _ in streams]
    while count < target:
        if not heap:
            raise _split_error(rank, target, sum(len(s.order) for s in streams), count)
        _, w, start, stop = heapq.heappop(heap)
        sizes = streams[w].natoms[streams[w].order[start:stop]]
        cumulative = np.cumsum(sizes)
        cut = int(np.argmin(np.abs(cumulative[:-1] - cumulative[-1] / 2))) + 1 + start  # both halves non-empty
        cuts[w].append(cut)
        for a, b in ((start, cut), (cut, stop)):
            if b - a > 1:
                heapq.heappush(heap, (-int(sizes[a - start:b - start].sum()), w, a, b))
        count += 1
    for w, stream in enumerate(streams):
        if cuts[w]:
            stream.bounds = np.union1d(stream.bounds, np.asarray(cuts[w], np.int64))


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
    rank: int | None = None,
) -> Plan:
    """The deterministic epoch plan (see the module docstring for the algorithm).

    ``rank``: keep only that rank's streams in full (the others keep their pieces; their batch
    and structure counts are still computed, so the steps and errors are those of the full
    plan); None keeps every rank's. Memory is then O(structures / world_size) per rank, and no
    Python object is made per structure.

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
    selection = _select(index, shard_order, max_atoms, max_structures)
    pieces, total_structures = selection.pieces, int(selection.offsets[-1])
    if total_structures == 0:
        raise ValueError(f"the selection is empty ({index.n_structures} structures in the index, "
                         f"max_atoms={max_atoms}, max_structures={max_structures})")

    workers = max(num_workers, 1)
    n_streams = world_size * workers
    cuts = _equal_atom_cuts(selection, n_streams)  # [n_streams + 1] offsets into the selection
    streams = [Stream() for _ in range(n_streams)]
    offsets = selection.offsets
    batches, structures, atoms = np.zeros(world_size, np.int64), np.zeros(world_size, np.int64), np.zeros(world_size, np.int64)
    for s, stream in enumerate(streams):
        lo, hi = int(cuts[s]), int(cuts[s + 1])
        first = int(np.searchsorted(offsets, lo, side="right")) - 1
        parts = []
        for p in range(max(first, 0), len(pieces)):
            if offsets[p] >= hi:
                break
            shard, start, _ = pieces[p]
            a, b = max(lo, int(offsets[p])), min(hi, int(offsets[p + 1]))
            if b > a:
                stream.pieces.append((shard, start + a - int(offsets[p]), start + b - int(offsets[p])))
                parts.append(selection.natoms(p)[a - int(offsets[p]):b - int(offsets[p])])
        natoms = np.concatenate(parts, dtype=np.int32) if parts else np.zeros(0, np.int32)  # [hi - lo]
        if shuffle:
            order = shuffle_order(len(natoms), shuffle_buffer, np.random.default_rng([seed, epoch, 1, s]))
        else:
            order = np.arange(len(natoms), dtype=np.int64)
        bounds = pack(natoms[order], atoms_per_batch)
        r = s // workers
        batches[r] += len(bounds) - 1
        structures[r] += len(natoms)
        atoms[r] += int(natoms.sum())
        if rank is None or r == rank:
            stream.natoms, stream.order, stream.bounds = natoms, order, bounds

    by_rank = [streams[r * workers:(r + 1) * workers] for r in range(world_size)]
    steps = int(batches.max())
    for r, rank_streams in enumerate(by_rank):
        if rank is None or r == rank:
            _equalize(rank_streams, steps, r)
        elif structures[r] < steps:  # splitting can reach any count up to one structure per batch
            raise _split_error(r, steps, int(structures[r]), int(batches[r]))
    return Plan(by_rank, steps, total_structures, int(atoms.sum()), plan_id, config,
                structures.tolist(), atoms.tolist())
