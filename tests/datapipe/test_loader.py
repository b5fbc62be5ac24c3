"""The streaming loader: exactly-once epochs over ranks and workers, equal steps, atom budgets,
resume mid-epoch, and clear errors for damaged shards. Ranks are simulated in one process."""

from __future__ import annotations

import collections
import shutil

import numpy as np
import pytest

from datapipe import keys
from datapipe.convert import convert
from datapipe.index import ShardIndex
from datapipe.loader import StreamingLoader
from datapipe.plan import build_plan, interleave, shuffle_order
from datapipe.shards import ShardError


def _epoch(shard_dir, world_size, num_workers, **kwargs):
    """Per rank: the list of batches, each the list of its structure ids; and the loaders."""
    loaders = [StreamingLoader(shard_dir, rank=r, world_size=world_size, num_workers=num_workers, **kwargs)
               for r in range(world_size)]
    return [[list(b[keys.STRUCTURE_ID]) for b in loader] for loader in loaders], loaders


def _ids(batches_per_rank):
    return [i for batches in batches_per_rank for batch in batches for i in batch]


def test_one_rank_and_two_ranks_two_workers_see_each_structure_once(shard_dir):
    index = ShardIndex.load(shard_dir)
    single, (loader,) = _epoch(shard_dir, 1, 0, atoms_per_batch=200, shuffle_buffer=50, seed=3)
    double, loaders = _epoch(shard_dir, 2, 2, atoms_per_batch=200, shuffle_buffer=50, seed=3)
    ids1, ids2 = _ids(single), _ids(double)
    assert len(ids1) == len(set(ids1)) == index.n_structures
    assert len(ids2) == len(set(ids2)) and set(ids1) == set(ids2)
    assert [len(b) for b in double] == [loaders[0].steps] * 2 == [len(loaders[1])] * 2
    assert len(single[0]) == loader.steps
    assert sum(ld.rank_structures for ld in loaders) == loaders[0].total_structures == index.n_structures
    assert sum(ld.rank_atoms for ld in loaders) == loaders[0].total_atoms == index.n_atoms


def test_atom_budget_and_data_budget(shard_dir):
    index = ShardIndex.load(shard_dir)
    natoms = {}
    for i, shard in enumerate(index.shards):
        for k, n in enumerate(index.natoms(i).tolist()):
            natoms[(shard["name"], k)] = n
    budget = index.n_atoms // 3
    loaders = [StreamingLoader(shard_dir, rank=r, world_size=2, num_workers=0, atoms_per_batch=20,
                               shuffle_buffer=30, max_atoms=budget) for r in range(2)]
    seen, oversize = [], 0
    for loader in loaders:
        count = 0
        for batch in loader:
            count += 1
            sizes = batch[keys.NATOMS]
            assert len(sizes) >= 1 and batch[keys.POSITIONS].shape == (int(sizes.sum()), 3)
            assert int(sizes.sum()) <= 20 or len(sizes) == 1  # larger structures ride alone
            oversize += int(sizes.sum()) > 20
            assert len(batch[keys.ENERGY]) == len(sizes) == int(batch[keys.BATCH].max()) + 1
            seen.extend((s, int(n)) for s, n in zip(batch[keys.STRUCTURE_ID], sizes))
        assert count == loader.steps
    assert oversize > 0  # structures of up to 30 atoms exist
    total = sum(n for _, n in seen)
    assert len(seen) == len({s for s, _ in seen}) == loaders[0].total_structures
    assert total == loaders[0].total_atoms <= budget
    # the selection is a prefix of the seeded global order: the next structure would not fit
    plan = loaders[0].plan
    assert budget - total < max(natoms.values())
    one_rank = StreamingLoader(shard_dir, num_workers=0, atoms_per_batch=20, shuffle_buffer=30, max_atoms=budget)
    assert (one_rank.total_atoms, one_rank.total_structures) == (plan.total_atoms, plan.total_structures)
    assert {i for b in one_rank for i in b[keys.STRUCTURE_ID]} == {s for s, _ in seen}  # same selection
    capped = StreamingLoader(shard_dir, num_workers=0, max_structures=17)
    assert capped.total_structures == 17 and sum(len(b[keys.NATOMS]) for b in capped) == 17


def test_resume_mid_epoch_yields_the_rest_exactly_once(shard_dir):
    kwargs = {"world_size": 2, "num_workers": 2, "atoms_per_batch": 150, "shuffle_buffer": 40, "seed": 11}
    full, _ = _epoch(shard_dir, **kwargs)
    states, first = [], []
    for rank in range(2):
        loader = StreamingLoader(shard_dir, rank=rank, **kwargs)
        taken = []
        for batch in loader:
            taken.append(list(batch[keys.STRUCTURE_ID]))
            if len(taken) == 5:
                break
        states.append(loader.state_dict())
        first.append(taken)
    assert [s["batches_consumed"] for s in states] == [5, 5]
    rest = []
    for rank in range(2):
        loader = StreamingLoader(shard_dir, rank=rank, **kwargs)  # a fresh process would do this
        loader.load_state_dict(states[rank])
        rest.append([list(b[keys.STRUCTURE_ID]) for b in loader])
        assert first[rank] + rest[rank] == full[rank]  # deterministic, and exactly the remainder
        assert len(rest[rank]) == loader.steps - 5
    ids = _ids(first) + _ids(rest)
    assert len(ids) == len(set(ids)) == ShardIndex.load(shard_dir).n_structures
    other = StreamingLoader(shard_dir, rank=0, world_size=2, num_workers=1)
    with pytest.raises(ValueError, match="another plan"):
        other.load_state_dict(states[0])


def test_set_epoch_reshuffles_same_set(shard_dir):
    loader = StreamingLoader(shard_dir, num_workers=0, atoms_per_batch=200, shuffle_buffer=20)
    epoch0 = [i for b in loader for i in b[keys.STRUCTURE_ID]]
    loader.set_epoch(1)
    epoch1 = [i for b in loader for i in b[keys.STRUCTURE_ID]]
    assert epoch0 != epoch1 and sorted(epoch0) == sorted(epoch1)
    val = StreamingLoader(shard_dir, num_workers=0, shuffle=False, atoms_per_batch=200)
    order = [i for b in val for i in b[keys.STRUCTURE_ID]]
    assert order == [f"part{p}:{k}" for p in "AB" for k in range(120)]


def test_plan_equal_steps_fewer_shards_than_streams_and_impossible_split(raw_dir, tmp_path):
    one = convert([raw_dir / "partA.aselmdb"], tmp_path / "one", shard_size=1000)  # a single shard
    plan = build_plan(one, world_size=3, num_workers=2, atoms_per_batch=100, shuffle_buffer=10)
    streams = [s for rank in plan.streams for s in rank]
    assert all(len(s.order) > 0 for s in streams)  # the shard's rows were split over 6 streams
    assert {sum(s.n_batches for s in rank) for rank in plan.streams} == {plan.steps}
    positions = collections.Counter((shard, row) for s in streams for shard, a, b in s.pieces for row in range(a, b))
    assert sorted(positions) == [(0, r) for r in range(120)] and set(positions.values()) == {1}
    for s in streams:
        assert sorted(s.order.tolist()) == list(range(len(s.natoms))) and np.all(np.diff(s.bounds) > 0)
    with pytest.raises(ValueError, match="cannot give rank"):
        build_plan(one, world_size=2, num_workers=0, atoms_per_batch=1, max_structures=3)  # 2 vs 1 singletons


def test_shuffle_buffer_bound_and_dataloader_order_model():
    order = shuffle_order(500, 16, np.random.default_rng(0))
    assert sorted(order) == list(range(500))
    assert all(order[t] < t + 16 for t in range(500))  # a reader never holds more than 16 pending
    assert interleave([3, 1, 2]) == [(0, 0), (1, 0), (2, 0), (0, 1), (2, 1), (0, 2)]


def test_truncated_or_deleted_shard_is_a_clear_error(shard_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(shard_dir, broken)
    index = ShardIndex.load(broken)
    victim, gone = index.shards[2]["name"], index.shards[4]["name"]
    loaders = [StreamingLoader(broken, num_workers=w, atoms_per_batch=300, shuffle=False) for w in (0, 2)]
    data = (broken / victim).read_bytes()
    (broken / victim).write_bytes(data[: len(data) // 2])  # truncated mid-stream (after planning)
    for loader in loaders:
        with pytest.raises(ShardError, match=victim):
            for _ in loader:
                pass
    with pytest.raises(ShardError, match=f"{victim} has .* bytes"):  # caught up front by the next loader
        StreamingLoader(broken, num_workers=0)
    (broken / victim).write_bytes(data)
    loader = StreamingLoader(broken, num_workers=0, shuffle=False)
    (broken / gone).unlink()  # deleted mid-stream
    with pytest.raises(ShardError, match=f"shard {gone}: cannot open"):
        for _ in loader:
            pass
    with pytest.raises(ShardError, match=f"{gone} is missing"):
        StreamingLoader(broken, num_workers=0, shuffle=False)
    first = StreamingLoader(broken, num_workers=0, shuffle=False, max_structures=index.shards[0]["structures"])
    assert sum(1 for _ in first) == first.steps  # a selection without the lost shard still streams


def test_fast_batch_equals_graph_collate(cases_dir, tmp_path):
    """The loader's batch builder gives exactly datapipe.graph's Batch (C01: an ion with no
    edges last; C04: 300 atoms then methane)."""
    import torch

    from datapipe.graph import collate, structure_to_data
    from datapipe.packing import batch_from_records
    from datapipe.shards import iter_shard

    index = convert([cases_dir / "C01-last-structure-without-edges.extxyz", cases_dir / "C04-mixed-sizes.extxyz"],
                    tmp_path, shard_size=10)
    records = [r for i in range(len(index.shards)) for _, r in iter_shard(index.shard_path(i), index.natoms(i))]
    assert [r.structure_id for r in records][:3] == [f"C01-last-structure-without-edges:{k}" for k in range(3)]
    fast = batch_from_records(records, cutoff=6.0)
    slow = collate([structure_to_data(r.numbers, r.positions, cutoff=6.0, energy=r.energy, forces=r.forces,
                                      charge=r.charge, spin=r.spin, structure_id=r.structure_id, source=r.source)
                    for r in records])
    assert sorted(fast.keys()) == sorted(slow.keys()) and fast.num_graphs == slow.num_graphs == 5
    for key in slow.keys():  # noqa: SIM118 - iterating a Data yields (key, value) pairs
        a, b = slow[key], fast[key]
        assert (a.dtype == b.dtype and torch.equal(a, b)) if torch.is_tensor(a) else a == b, key
    for a, b in zip(slow.to_data_list(), fast.to_data_list()):
        assert all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a.keys())  # noqa: SIM118
    assert fast[keys.ENERGY].shape == (5,) and fast[keys.NATOMS][2] == 1
    ion = int(fast.ptr[2])  # the lone Na+ (third structure) has no edges, and is still batched
    assert fast[keys.ATOMIC_NUMBERS][ion] == 11 and not (fast[keys.EDGE_INDEX] == ion).any()
