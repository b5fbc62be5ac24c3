"""Streaming loader over a shard directory: exact single-epoch accounting, equal steps on every
rank, deterministic mid-epoch resume.

Usage
-----
::

    # once: python -m datapipe.convert data/omol25_sample/train --out data/shards/train --workers 2
    from datapipe.index import ShardIndex   # .element_references [Z] eV, .force_rms eV/Å, .data_hash
    from datapipe.loader import StreamingLoader
    loader = StreamingLoader("data/shards/train", rank=rank, world_size=world_size, num_workers=2,
                             atoms_per_batch=1024, cutoff=6.0, shuffle_buffer=1000, seed=0,
                             max_atoms=None, shuffle=True)
    loader.steps                # == len(loader): batches THIS epoch on every rank (all ranks equal)
    loader.total_atoms          # atoms in the epoch's selection, all ranks together
    loader.total_structures     # structures in the selection, all ranks together
    loader.rank_atoms, loader.rank_structures   # this rank's share
    for batch in loader:        # torch_geometric Batch, fields named by datapipe.keys
        batch[keys.POSITIONS]   # [N, 3] float32 Å; also ATOMIC_NUMBERS, FORCES, ENERGY, CHARGE,
                                # SPIN, NATOMS, EDGE_INDEX, BATCH, STRUCTURE_ID, SOURCE
    state = loader.state_dict() # {"plan_id", "epoch", "batches_consumed", ...}; JSON-serialisable
    loader.load_state_dict(state)   # next iteration yields exactly the batches not yet consumed
    loader.resume_elsewhere(states) # the states of EVERY rank of a run on another world size: the
                                    # rest of the epoch re-planned for this loader's ranks (datapipe.replan)
    loader.set_epoch(1)         # new permutation (and, with a budget, a new selection)

    val = StreamingLoader("data/shards/val", rank=rank, world_size=world_size, shuffle=False)

- ``max_atoms`` / ``max_structures``: a data budget; the epoch uses the longest prefix of the
  seeded global order (shard permutation, rows in order) within it. ``total_atoms`` is exact.
- ``atoms_per_batch``: a batch holds at most this many atoms, except that a structure larger
  than the budget forms a batch of its own (never dropped or cut).
- Every structure of the selection is yielded exactly once over all ranks and workers, and every
  rank yields exactly ``steps`` batches (ranks with fewer planned batches split some; none empty).
- Iterating after a partial pass resumes where it stopped; after a full pass the next iteration
  starts the epoch again. ``state_dict`` counts batches handed to the caller (a batch counts as
  consumed once yielded); ``remaining_steps`` = ``steps`` - consumed. Resume needs the same data,
  seed, world_size, num_workers and budgets (else ``load_state_dict`` raises ValueError); on
  another world size, :meth:`StreamingLoader.resume_elsewhere` re-plans the structures not yet
  consumed, each still yielded once (``steps`` then counts the epoch's steps on every world size).
- Ranks compute the same plan from ``index.json`` alone: give every rank the same shard
  directory or URL (compare ``loader.plan.plan_id`` across ranks if in doubt). Each rank keeps
  only its own streams in memory (O(structures / world_size) numpy arrays).
- Shards may stream from ``http(s)://`` URLs or ``pipe:`` commands (``StreamingLoader("https://host/
  train")``); see :mod:`datapipe.remote` for retries. Every shard must yield the rows its index
  records, or the read fails naming it: an epoch is never silently short.
- A shard missing, truncated or altered raises :class:`datapipe.shards.ShardError` naming it; with
  ``skip_bad_shards=True`` its unreadable structures are left out instead and listed in
  ``loader.last_skipped`` for the batch just yielded (a batch with nothing readable is ``None``),
  so the caller can count them: the plan, the steps and every other structure stay as they were.
- Loss means must be global: batches differ in atoms across ranks (all-reduce the counts).

The plan (which structure goes in which batch) is described in :mod:`datapipe.plan`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from datapipe import keys
from datapipe.index import ShardIndex
from datapipe.packing import batch_arrays, to_batch
from datapipe.plan import Plan, Stream, build_plan, interleave_arrays, worker_skips
from datapipe.shards import ShardError, iter_shard_retrying


def _identity(item):
    return item


def _stream_records(index: ShardIndex, stream: Stream, wanted: np.ndarray,
                    skip_bad: bool = False, retries: tuple[int, float] = (3, 1.0)) -> Iterator[tuple[int, object]]:
    """``(stream position, Record)`` for every wanted position, in read order; pieces with
    nothing wanted are not opened; a remote shard's failed read is retried ``retries = (times,
    delay s)`` as :func:`datapipe.shards.iter_shard_retrying` does. With ``skip_bad``, a piece whose shard fails to read yields
    ``(position, dict)`` for each wanted position not read yet: ``{"shard", "row", "atoms", "error"}``."""
    offset = 0
    for shard, start, stop in stream.pieces:
        mask = wanted[offset:offset + stop - start]
        if mask.any():
            natoms = index.natoms(shard)
            done = start - 1
            try:
                for row, record in iter_shard_retrying(index.shard_path(shard), natoms, start, stop, mask, *retries):
                    done = row
                    if record is not None:
                        yield offset + row - start, record
            except ShardError as error:
                if not skip_bad:
                    raise
                name = index.shards[shard]["name"]
                for row in range(done + 1, stop):
                    if mask[row - start]:
                        yield offset + row - start, {"shard": name, "row": row, "atoms": int(natoms[row]),
                                                     "error": str(error)}
        offset += stop - start


def iter_stream_batches(index: ShardIndex, stream: Stream, skip_batches: int, cutoff: float,
                        skip_bad: bool = False, retries: tuple[int, float] = (3, 1.0)) -> Iterator:
    """Yield the stream's planned batches from batch ``skip_batches`` on, as the numpy arrays of
    :func:`datapipe.packing.batch_arrays` (wrapped by :func:`datapipe.packing.to_batch` in the
    consumer); holds at most about ``shuffle_buffer`` decoded structures.

    With ``skip_bad``, structures of a shard that cannot be read are left out and listed under
    ``"unread"`` (``{"shard", "row", "atoms", "error"}`` each); a batch with nothing readable is
    ``{"empty": True, "unread": [...]}``.

    Raises
    ------
    ShardError naming the shard if one is missing, truncated or does not match the index (unless
    ``skip_bad``).
    """
    if skip_batches >= stream.n_batches:
        return
    first = int(stream.bounds[skip_batches])
    remaining = stream.order[first:]
    wanted = np.zeros(len(stream.natoms), dtype=bool)
    wanted[remaining] = True
    reader = _stream_records(index, stream, wanted, skip_bad, retries)
    pending: dict[int, object] = {}
    for b in range(skip_batches, stream.n_batches):
        records, unread = [], []
        for position in stream.order[stream.bounds[b]:stream.bounds[b + 1]].tolist():
            while position not in pending:
                try:
                    got, record = next(reader)
                except StopIteration:
                    raise ShardError(f"stream ended before position {position} was read (pieces {stream.pieces}); "
                                     "a shard is shorter than its index") from None
                pending[got] = record
            item = pending.pop(position)
            (unread if isinstance(item, dict) else records).append(item)
        arrays = batch_arrays(records, cutoff) if records else {"empty": True}
        if skip_bad:
            arrays["unread"] = unread
        yield arrays


class _RankDataset(IterableDataset):
    """One rank's streams; in a DataLoader worker ``w`` it yields stream ``w``'s batches."""

    def __init__(self, index: ShardIndex, streams: list[Stream], skips: list[int], cutoff: float, first: int,
                 skip_bad: bool = False, retries: tuple[int, float] = (3, 1.0)):
        self.index, self.streams, self.skips, self.cutoff, self.first = index, streams, skips, cutoff, first
        self.skip_bad, self.retries = skip_bad, retries

    def __iter__(self):
        info = get_worker_info()
        # DataLoader worker i serves stream (first + i) mod W: a resumed DataLoader restarts its
        # round robin at worker 0, so streams are rotated to continue the original cycle.
        w = (self.first + (0 if info is None else info.id)) % len(self.streams)
        return iter_stream_batches(self.index, self.streams[w], self.skips[w], self.cutoff, self.skip_bad, self.retries)


class StreamingLoader:
    """Streaming, rank- and worker-sharded loader of radius-graph batches packed by atom budget.

    Parameters
    ----------
    shard_dir : directory written by :func:`datapipe.convert.convert` (with ``index.json``), or
        its ``http(s)://`` URL or ``pipe:`` template (:mod:`datapipe.remote`): no shared filesystem.
    rank, world_size : this process's data-parallel rank and the number of ranks.
    num_workers : DataLoader worker processes for this rank (0: read in this process).
    atoms_per_batch : atom budget per batch (a larger structure forms its own batch).
    cutoff : radius-graph cutoff, Å (uncapped neighbour list, :func:`datapipe.graph.radius_graph`).
    shuffle_buffer : structures held by each worker's shuffle buffer (ignored if not shuffle).
    seed : seed of the shard permutation and shuffle buffers (with the epoch).
    max_atoms, max_structures : optional data budget for the epoch (see module docstring).
    shuffle : False for validation: index order, no buffer; same equal-steps guarantee.
    epoch : initial epoch (see :meth:`set_epoch`).
    prefetch_factor : batches prefetched per worker.
    pin_memory : pin each batch in page-locked memory (for GPU training; needs CUDA).
    skip_bad_shards : leave out (and list in ``last_skipped``) structures of unreadable shards.
    retries, retry_delay : a remote shard whose read fails part way is read again from the
        first row not yet delivered, at most ``retries`` times, ``retry_delay * attempt`` s apart
        (logged; then ShardError naming it).

    Raises
    ------
    FileNotFoundError if the index is missing; ShardError if a shard of the epoch's selection is
    missing or not the size the index records (every rank checks all, so all fail alike; damage
    while streaming is caught by the reader, naming the shard);
    ValueError if ranks cannot be given equal step counts or the selection is empty.
    """

    def __init__(self, shard_dir: str | os.PathLike, rank: int = 0, world_size: int = 1, num_workers: int = 2,
                 atoms_per_batch: int = 1024, cutoff: float = keys.DEFAULT_CUTOFF, shuffle_buffer: int = 1000,
                 seed: int = 0, max_atoms: int | None = None, max_structures: int | None = None,
                 shuffle: bool = True, epoch: int = 0, prefetch_factor: int = 4, pin_memory: bool = False,
                 skip_bad_shards: bool = False, retries: int = 3, retry_delay: float = 1.0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        self.index = ShardIndex.load(shard_dir)
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.atoms_per_batch, self.cutoff, self.shuffle_buffer = atoms_per_batch, float(cutoff), shuffle_buffer
        self.seed, self.max_atoms, self.max_structures, self.shuffle = seed, max_atoms, max_structures, shuffle
        self.prefetch_factor, self.pin_memory = prefetch_factor, pin_memory
        self.skip_bad_shards = bool(skip_bad_shards)
        self.retries = (int(retries), float(retry_delay))
        #: with ``skip_bad_shards``: the structures left out of the batch just yielded
        #: (``{"shard", "row", "atoms", "error"}`` each)
        self.last_skipped: list[dict] = []
        self.set_epoch(epoch)

    # --- plan ------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Plan epoch ``epoch`` (new shard permutation and buffers) and start it from batch 0."""
        self.epoch = int(epoch)
        self._use(build_plan(self.index, world_size=self.world_size, num_workers=self.num_workers,
                             rank=self.rank, **self._plan_args()), [])

    def _plan_args(self) -> dict:
        return dict(atoms_per_batch=self.atoms_per_batch, shuffle=self.shuffle, shuffle_buffer=self.shuffle_buffer,
                    seed=self.seed, epoch=self.epoch, max_atoms=self.max_atoms, max_structures=self.max_structures)

    def _use(self, plan: Plan, lineage: list[dict]) -> None:
        """Follow ``plan`` from its first batch; ``lineage``: the earlier segments of the epoch
        (:mod:`datapipe.replan`), whose steps count as consumed."""
        self.plan, self.lineage = plan, lineage
        #: steps of this epoch taken before ``plan`` (on other world sizes; 0 for the epoch's own plan)
        self.offset = sum(int(segment["batches"]) for segment in lineage)
        self._streams = self.plan.streams[self.rank]
        self._workers, self._batches = interleave_arrays([s.n_batches for s in self._streams])  # [steps] each
        self.batches_consumed = self.offset
        self._check_shards()

    def _check_shards(self) -> None:
        """Fail early (stat only) if a shard of the selection (any rank's: so that every rank fails
        alike, before any collective) is missing or not its recorded size. Remote shards are not
        probed (one request per shard per rank): they are checked row by row as they stream."""
        if self.index.directory is None:
            return
        problems = []
        for shard in sorted({piece[0] for rank in self.plan.streams for s in rank for piece in s.pieces}):
            entry, path = self.index.shards[shard], self.index.shard_path(shard)
            if not path.is_file():
                problems.append(f"{entry['name']} is missing")
            elif path.stat().st_size != entry["bytes"]:
                problems.append(f"{entry['name']} has {path.stat().st_size} bytes, index records {entry['bytes']} "
                                "(truncated or altered)")
        if problems and not self.skip_bad_shards:  # skip mode: the reader skips them, counted
            raise ShardError(f"shards in {self.index.location}: " + "; ".join(problems))

    @property
    def steps(self) -> int:
        """Batches this epoch, identical on every rank (after an elastic resume: the steps taken
        before it on the other world size(s) plus those re-planned)."""
        return self.offset + self.plan.steps

    def __len__(self) -> int:
        return self.steps

    @property
    def remaining_steps(self) -> int:
        """Batches this rank has still to yield in the current epoch."""
        return self.steps - self.batches_consumed if self.batches_consumed < self.steps else 0

    @property
    def total_atoms(self) -> int:
        """Atoms in the epoch's selection, over all ranks (exact; after an elastic resume, in the
        re-planned rest of the epoch)."""
        return self.plan.total_atoms

    @property
    def total_structures(self) -> int:
        """Structures in the epoch's selection, over all ranks (exact; after an elastic resume, in the
        re-planned rest of the epoch)."""
        return self.plan.total_structures

    @property
    def rank_atoms(self) -> int:
        """Atoms this rank yields in the epoch."""
        return self.plan.rank_atoms(self.rank)

    @property
    def rank_structures(self) -> int:
        """Structures this rank yields in the epoch."""
        return self.plan.rank_structures(self.rank)

    # --- resume ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plan identity and batches this rank has handed out this epoch (JSON-serialisable)."""
        return {"plan_id": self.plan.plan_id, "epoch": self.epoch, "batches_consumed": self.batches_consumed,
                "rank": self.rank, "world_size": self.world_size, "steps": self.steps,
                "data_hash": self.index.data_hash, "num_workers": self.num_workers, "lineage": self.lineage}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next iteration yields exactly the batches not consumed in ``state``.

        Raises ValueError if ``state`` belongs to a different plan (other data, seed, ranks,
        workers, batch budget or data budget) — resuming then would repeat or skip structures.
        """
        if int(state["epoch"]) != self.epoch:
            self.set_epoch(int(state["epoch"]))
        if state.get("lineage", []) != self.lineage:  # a run resumed before on another world size
            self._use(self._replan(state["lineage"]), state["lineage"])
        if state["plan_id"] != self.plan.plan_id:
            raise ValueError(f"loader state is for another plan (its data hash {state.get('data_hash', '?')[:12]}, "
                             f"world_size {state.get('world_size')}; this loader: {self.index.data_hash[:12]}, "
                             f"{self.world_size}); resume needs the same data, seed, ranks, workers and budgets")
        consumed = int(state["batches_consumed"])
        if not self.offset <= consumed <= self.steps:
            raise ValueError(f"batches_consumed {consumed} outside {self.offset}..{self.steps}")
        self.batches_consumed = consumed

    def _replan(self, lineage: list[dict], world_size: int | None = None, num_workers: int | None = None) -> Plan:
        from datapipe.replan import replan

        return replan(self.index, self._plan_args(), lineage, self.world_size if world_size is None else world_size,
                      self.num_workers if num_workers is None else num_workers, build_plan)

    def resume_elsewhere(self, states: list[dict]) -> None:
        """Elastic resume: continue the epoch that ``states`` (the ``state_dict`` of every rank of a
        run on another number of ranks or workers) left, re-planned for this loader's ranks so that
        every structure of the epoch is still yielded once over the whole run (:mod:`datapipe.replan`).

        Raises ValueError if the states disagree, are not every rank's, or belong to another plan.
        """
        first = states[0]
        ranks = sorted(int(s["rank"]) for s in states)
        if ranks != list(range(int(first["world_size"]))):
            raise ValueError(f"loader states of ranks {ranks}, expected one per rank of {first['world_size']}")
        for key in ("plan_id", "epoch", "batches_consumed", "lineage", "data_hash"):
            values = {json_key(s.get(key)) for s in states}
            if len(values) > 1:
                raise ValueError(f"the ranks' loader states disagree on {key}: {sorted(values)}")
        if first["data_hash"] != self.index.data_hash:
            raise ValueError(f"loader states are for data {first['data_hash'][:12]}, this loader reads "
                             f"{self.index.data_hash[:12]}")
        if int(first["epoch"]) != self.epoch:
            self.set_epoch(int(first["epoch"]))
        lineage, old_workers = list(first.get("lineage", [])), int(first.get("num_workers", self.num_workers))
        old = self._replan(lineage, int(first["world_size"]), old_workers) if lineage else \
            build_plan(self.index, world_size=int(first["world_size"]), num_workers=old_workers, **self._plan_args())
        if old.plan_id != first["plan_id"]:
            raise ValueError("the loader states are for another plan (other data, seed or budgets); resume needs "
                             "the same data, seed and budgets")
        consumed = int(first["batches_consumed"])
        done = consumed - sum(int(segment["batches"]) for segment in lineage)
        lineage = [*lineage, {"world_size": int(first["world_size"]), "num_workers": old_workers, "batches": done}]
        if done >= old.steps:  # the epoch was finished: nothing left to plan
            self._use(Plan([[Stream() for _ in range(max(self.num_workers, 1))] for _ in range(self.world_size)],
                           0, 0, 0, f"finished-{first['plan_id']}", {}), lineage)
        else:
            self._use(self._replan(lineage), lineage)

    # --- iteration -------------------------------------------------------------------------------
    def __iter__(self) -> Iterator:
        if self.batches_consumed >= self.steps:  # a finished epoch starts again (on its own plan)
            if self.lineage:
                self.set_epoch(self.epoch)
            self.batches_consumed = 0
        local = self.batches_consumed - self.offset  # batches of this plan already handed out
        skips = worker_skips(self._workers, local, len(self._streams))
        first = int(self._workers[local]) if local < self.plan.steps else 0
        dataset = _RankDataset(self.index, self._streams, skips, self.cutoff, first, self.skip_bad_shards,
                               self.retries)
        if self.num_workers > 0:
            source = iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                                     prefetch_factor=self.prefetch_factor, worker_init_fn=_worker_init))
        else:
            source = iter(dataset)
        try:
            yield from self._checked(source, local)
        finally:
            # the workers stop now, not when the garbage collector finds the iterator: after an error the
            # traceback keeps this frame (and so the iterator) alive, and a late shutdown waited for
            # workers still blocked on their queue (5 s each, in whatever ran next)
            shutdown = getattr(source, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def _checked(self, source, local: int) -> Iterator:
        """The batches of ``source`` (this rank's workers interleaved, from batch ``local`` of the plan),
        each checked against the plan."""
        expected_workers = self._workers[local:]
        expected_batches = self._batches[local:]
        count = 0
        for arrays in source:
            unread = arrays.pop("unread", [])
            batch = None if arrays.get("empty") else to_batch(arrays)
            if self.pin_memory and batch is not None:
                batch = batch.pin_memory()
            if count >= len(expected_workers):
                raise RuntimeError("loader produced more batches than planned")  # a bug, never data
            worker, b = int(expected_workers[count]), int(expected_batches[count])
            stream = self._streams[worker]
            planned = stream.natoms[stream.order[stream.bounds[b]:stream.bounds[b + 1]]]
            n_structures = len(unread) + (0 if batch is None else batch.num_graphs)
            n_atoms = sum(r["atoms"] for r in unread) + (0 if batch is None else int(batch[keys.NATOMS].sum()))
            if n_structures != len(planned) or n_atoms != int(planned.sum()):
                raise RuntimeError(f"rank {self.rank}: batch {self.batches_consumed} has {n_structures} structures / "
                                   f"{n_atoms} atoms, the plan says {len(planned)} / {int(planned.sum())}; "
                                   "the DataLoader did not interleave workers round robin")
            count += 1
            self.batches_consumed += 1  # counted when handed out, so a state saved now excludes it
            self.last_skipped = unread
            yield batch
        if count != len(expected_workers):
            raise RuntimeError(f"rank {self.rank} produced {count} of {len(expected_workers)} planned batches")
        self.batches_consumed = self.steps


def json_key(value) -> str:
    """``value`` as canonical JSON (to compare loader-state fields that are lists)."""
    return json.dumps(value, sort_keys=True)


def _worker_init(_):
    torch.set_num_threads(1)
