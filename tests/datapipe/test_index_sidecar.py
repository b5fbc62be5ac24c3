"""The per-structure count sidecar (verified, memory-mapped), the old inline index still read,
and the vectorised plan against the per-structure reference it replaced (same plan, bit for bit)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from datapipe.index import INDEX_NAME, NATOMS_NAME, ShardIndex
from datapipe.plan import build_plan, interleave, interleave_arrays, pack, shuffle_order
import plan_reference


def synthetic_index(sizes: list[int], seed: int = 0) -> ShardIndex:
    """An in-memory index of shards of ``sizes`` structures, counts drawn from 1..40 (no files)."""
    rng = np.random.default_rng(seed)
    natoms = rng.integers(1, 41, size=sum(sizes)).astype(np.uint16)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    shards = [{"name": f"s-{k:06d}.tar", "structures": n, "atoms": int(natoms[offsets[k]:offsets[k + 1]].sum()),
               "sha256": f"{k:064x}", "bytes": 0} for k, n in enumerate(sizes)]
    raw = {"shards": shards, "n_structures": int(sum(sizes)), "n_atoms": int(natoms.sum()), "element_references": [],
           "reference_rmse": 0.0, "force_rms": 1.0, "data_hash": f"{seed:064x}", "element_counts": {},
           "rejected": [], "rejected_counts": {}}
    return ShardIndex("unused", raw, natoms)


CONFIGS = [
    {"world_size": 1, "num_workers": 0, "atoms_per_batch": 64, "shuffle_buffer": 7},
    {"world_size": 3, "num_workers": 2, "atoms_per_batch": 100, "shuffle_buffer": 50, "seed": 5},
    {"world_size": 4, "num_workers": 1, "atoms_per_batch": 30, "shuffle": False, "epoch": 2},
    {"world_size": 2, "num_workers": 3, "atoms_per_batch": 200, "shuffle_buffer": 10_000, "max_atoms": 3000},
    {"world_size": 5, "num_workers": 0, "atoms_per_batch": 45, "shuffle_buffer": 13, "max_structures": 333},
    {"world_size": 7, "num_workers": 2, "atoms_per_batch": 1000, "shuffle_buffer": 3},  # many splits
]


@pytest.mark.parametrize("config", CONFIGS)
def test_vectorised_plan_equals_reference(config):
    index = synthetic_index([97, 120, 3, 250, 64, 180, 1, 77], seed=len(config))
    plan = build_plan(index, **config)
    streams, steps, structures, atoms, plan_id = plan_reference.build_plan(index, **config)
    assert (plan.steps, plan.total_structures, plan.total_atoms, plan.plan_id) == (steps, structures, atoms, plan_id)
    for mine, theirs in zip(plan.streams, streams):
        for a, b in zip(mine, theirs, strict=True):
            assert a.pieces == b.pieces
            for field in ("natoms", "order", "bounds"):
                np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    for rank in range(config["world_size"]):  # one rank's plan: its streams in full, the same steps
        own = build_plan(index, rank=rank, **config)
        assert own.steps == plan.steps and own.plan_id == plan.plan_id
        assert own.rank_structures(rank) == sum(len(s.order) for s in streams[rank])
        for a, b in zip(own.streams[rank], plan.streams[rank]):
            np.testing.assert_array_equal(a.bounds, b.bounds)
            np.testing.assert_array_equal(a.order, b.order)


def test_plan_pieces_of_one_rank_fail_like_the_full_plan():
    index = synthetic_index([3])
    for rank in (None, 0, 1):
        with pytest.raises(ValueError, match="cannot give rank 0 2 batches"):
            build_plan(index, world_size=2, atoms_per_batch=1, shuffle=False, rank=rank)


def test_kernels_match_the_reference():
    rng = np.random.default_rng(1)
    for n, buffer, chunk in ((1000, 16, 37), (5000, 1000, 1 << 22), (300, 500, 64), (70_000, 70_000, 999)):
        a = shuffle_order(n, buffer, np.random.default_rng(n), chunk=chunk)
        np.testing.assert_array_equal(a, plan_reference.shuffle_order(n, buffer, np.random.default_rng(n)))
    natoms = rng.integers(1, 400, size=20_000)
    for budget, window in ((1, 64), (300, 7), (1024, 1 << 20), (100_000, 16)):
        np.testing.assert_array_equal(pack(natoms, budget, window=window), plan_reference.pack(natoms, budget))
    counts = [5, 0, 3, 8, 1]
    assert interleave(counts) == list(zip(*(a.tolist() for a in interleave_arrays(counts))))
    assert [(w, b) for w, b in interleave(counts)][:6] == [(0, 0), (2, 0), (3, 0), (4, 0), (0, 1), (2, 1)]


def test_sidecar_is_memory_mapped_and_verified(shard_dir, tmp_path):
    index = ShardIndex.load(shard_dir)
    raw = json.loads((shard_dir / INDEX_NAME).read_text())
    assert raw["format"] == "symscale-shards/3" and all("natoms" not in s for s in raw["shards"])
    assert isinstance(index._natoms, np.memmap) and raw["natoms"]["dtype"] == "<u2"
    assert raw["natoms"]["length"] == index.n_structures == sum(len(index.natoms(i)) for i in range(len(index.shards)))
    assert [int(index.natoms(i).sum()) for i in range(len(index.shards))] == [s["atoms"] for s in index.shards]
    bad = tmp_path / "bad"
    shutil.copytree(shard_dir, bad)
    counts = np.load(bad / NATOMS_NAME)
    counts[5] += 1  # same size, other bytes
    np.save(bad / NATOMS_NAME, counts)
    with pytest.raises(ValueError, match=f"{NATOMS_NAME}: .* SHA-256 does not match"):
        ShardIndex.load(bad)
    np.save(bad / NATOMS_NAME, counts[:-1])  # one structure short
    with pytest.raises(ValueError, match=f"{NATOMS_NAME}: .* bytes"):
        ShardIndex.load(bad)
    (bad / NATOMS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=NATOMS_NAME):
        ShardIndex.load(bad)


def test_old_inline_index_still_reads(shard_dir, tmp_path):
    """An index of format 2 (counts inline per shard, no sidecar) plans the same epoch."""
    old = tmp_path / "old"
    shutil.copytree(shard_dir, old)
    raw = json.loads((old / INDEX_NAME).read_text())
    index = ShardIndex.load(shard_dir)
    for i, shard in enumerate(raw["shards"]):
        shard["natoms"] = index.natoms(i).tolist()
    raw["format"] = "symscale-shards/2"
    del raw["natoms"]
    (old / NATOMS_NAME).unlink()
    (old / INDEX_NAME).write_text(json.dumps(raw))
    again = ShardIndex.load(old)
    a = build_plan(index, world_size=2, num_workers=1, atoms_per_batch=120)
    b = build_plan(again, world_size=2, num_workers=1, atoms_per_batch=120)
    assert a.plan_id == b.plan_id and a.steps == b.steps
    assert all(np.array_equal(x.order, y.order) for r, s in zip(a.streams, b.streams) for x, y in zip(r, s))
