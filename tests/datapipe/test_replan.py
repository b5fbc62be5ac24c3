"""Elastic resume of the data stream: an epoch begun on W ranks continues on W' ranks and every
structure of the selection is read exactly once over the whole epoch (datapipe.replan)."""

from collections import Counter

import pytest

from datapipe import keys
from datapipe.loader import StreamingLoader

KW = dict(atoms_per_batch=60, shuffle_buffer=25, seed=3, cutoff=5.0)


def loaders(shard_dir, world_size, num_workers=0, **extra):
    return [StreamingLoader(shard_dir, rank=r, world_size=world_size, num_workers=num_workers, **KW, **extra)
            for r in range(world_size)]


def take(loader, n=None):
    """Structure ids of the next ``n`` batches (all remaining if None), leaving the loader there."""
    ids = []
    for i, batch in enumerate(loader):
        ids += list(batch[keys.STRUCTURE_ID])
        if n is not None and i + 1 == n:
            break
    return ids


def selection(shard_dir, **extra):
    return Counter(i for loader in loaders(shard_dir, 1, **extra) for i in take(loader))


@pytest.mark.parametrize("new_world, new_workers", [(1, 0), (3, 0), (4, 2)])
def test_two_ranks_resumed_on_another_world_size_see_each_structure_once(shard_dir, new_world, new_workers):
    old = loaders(shard_dir, 2, num_workers=1, max_atoms=3000)
    steps = old[0].steps
    consumed = steps // 2
    seen = Counter(i for loader in old for i in take(loader, consumed))
    states = [loader.state_dict() for loader in old]
    assert {s["batches_consumed"] for s in states} == {consumed}

    new = loaders(shard_dir, new_world, num_workers=new_workers, max_atoms=3000)
    for loader in new:
        loader.resume_elsewhere(states)
    assert {loader.steps for loader in new} == {new[0].steps}  # every new rank takes the same steps
    assert new[0].batches_consumed == consumed and new[0].remaining_steps == new[0].steps - consumed
    assert sum(loader.plan.rank_structures(loader.rank) for loader in new) == new[0].plan.total_structures
    after = Counter(i for loader in new for i in take(loader))
    total = seen + after
    assert total == selection(shard_dir, max_atoms=3000)  # the budget's structures, each exactly once
    assert max(total.values()) == 1
    assert all(loader.batches_consumed == loader.steps for loader in new)


def test_a_resumed_epoch_resumes_again_on_the_same_and_on_another_world_size(shard_dir):
    """2 ranks → 3 ranks (checkpoint mid-way, same world size again) → 1 rank: still each structure once."""
    old = loaders(shard_dir, 2)
    seen = Counter(i for loader in old for i in take(loader, 3))
    mid = loaders(shard_dir, 3)
    for loader in mid:
        loader.resume_elsewhere([o.state_dict() for o in old])
    seen += Counter(i for loader in mid for i in take(loader, 2))
    states = [loader.state_dict() for loader in mid]
    assert states[0]["lineage"] == [{"world_size": 2, "num_workers": 0, "batches": 3}]

    again = loaders(shard_dir, 3)  # a plain resume (same world size) of the re-planned epoch
    for loader, state in zip(again, states):
        loader.load_state_dict(state)
    assert again[0].plan.plan_id == mid[0].plan.plan_id and again[0].batches_consumed == 5
    seen += Counter(i for loader in again for i in take(loader, 1))

    last = loaders(shard_dir, 1)
    last[0].resume_elsewhere([loader.state_dict() for loader in again])
    assert [s["world_size"] for s in last[0].lineage] == [2, 3]
    seen += Counter(take(last[0]))
    assert seen == selection(shard_dir)


def test_elastic_resume_refuses_states_that_do_not_fit(shard_dir):
    old = loaders(shard_dir, 2)
    take(old[0], 1)  # rank 0 one batch further than rank 1: not the states of one checkpoint
    with pytest.raises(ValueError, match="disagree on batches_consumed"):
        loaders(shard_dir, 1)[0].resume_elsewhere([loader.state_dict() for loader in old])
    with pytest.raises(ValueError, match=r"ranks \[0\], expected one per rank of 2"):
        loaders(shard_dir, 1)[0].resume_elsewhere([old[0].state_dict()])
    other_seed = StreamingLoader(shard_dir, rank=0, world_size=1, num_workers=0, **{**KW, "seed": 4})
    take(old[1], 1)
    with pytest.raises(ValueError, match="another plan"):
        other_seed.resume_elsewhere([loader.state_dict() for loader in old])


def test_resuming_a_finished_epoch_elsewhere_leaves_nothing_to_do(shard_dir):
    old = loaders(shard_dir, 2)
    for loader in old:
        take(loader)
    new = loaders(shard_dir, 4)[0]
    new.resume_elsewhere([loader.state_dict() for loader in old])
    assert new.steps == old[0].steps and new.remaining_steps == 0
