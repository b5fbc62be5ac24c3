"""What elastic resume refuses, and the checkpoint's guard against a rank's missing part (in process)."""

import json

import pytest
import torch

from datapipe.loader import StreamingLoader
from launcher import checkpoint as ckpt
from launcher.config import TrainConfig
from launcher.elastic import unsupported
from launcher.engine import Runtime
from launcher.errors import UserError
from launcher.retention import disk_plan, prune_engine_state

ONE = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), bf16_supported=False)


def zero(stage, **extra):
    return {"zero_optimization": {"stage": stage, **extra}, "bf16": {"enabled": False}}


def test_only_deepspeed_zero_0_to_2_without_offload_resumes_on_another_world_size():
    deepspeed, fsdp = TrainConfig(engine="deepspeed"), TrainConfig(engine="fsdp")
    assert unsupported(deepspeed, zero(2)) is None and unsupported(deepspeed, zero(1)) is None
    assert unsupported(deepspeed, zero(0)) is None
    assert "ZeRO-3" in unsupported(deepspeed, zero(3))
    assert "FSDP2" in unsupported(fsdp, zero(0))
    assert "offload" in unsupported(deepspeed, zero(2, offload_optimizer={"device": "cpu"}))
    assert "bf16" in unsupported(deepspeed, {"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}})


def two_rank_checkpoint(data, tmp_path):
    """A checkpoint directory holding the loader states of 2 ranks after one step (no engine state)."""
    folder = tmp_path / "step-00000001"
    folder.mkdir()
    for rank in (0, 1):
        loader = StreamingLoader(data["train"], rank=rank, world_size=2, num_workers=0, atoms_per_batch=100)
        next(iter(loader))
        (folder / f"loader-rank{rank:05d}.json").write_text(json.dumps(loader.state_dict()))
    return folder


def test_another_world_size_is_refused_with_the_engine_s_reason(data, tmp_path):
    folder = two_rank_checkpoint(data, tmp_path)
    loader = StreamingLoader(data["train"], rank=0, world_size=1, num_workers=0, atoms_per_batch=100)
    with pytest.raises(UserError, match=r"written by 2 rank\(s\), this job has 1; ZeRO-3 checkpoints resume on the "
                                         r"world size that wrote them only"):
        ckpt.restore_loader(folder, loader, ONE, "ZeRO-3 checkpoints resume on the world size that wrote them only")
    with pytest.raises(UserError, match=r"holds no consolidated state \(elastic/.*resume it on 2 rank\(s\)"):
        ckpt.restore_loader(folder, loader, ONE, None)


def test_a_checkpoint_missing_a_rank_s_part_is_refused_before_it_is_complete(tmp_path):
    """Rank 1 wrote its part to another file system (an unshared run directory): rank 0 sees only its own."""
    (tmp_path / "loader-rank00000.json").write_text("{}")
    two = Runtime(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), bf16_supported=False)
    [message] = ckpt._missing_parts(tmp_path, two)
    assert "the parts of rank(s) [1] are not in" in message and "one folder shared by every node" in message
    (tmp_path / "loader-rank00001.json").write_text("{}")
    assert ckpt._missing_parts(tmp_path, two) == []


def test_the_consolidated_state_is_counted_on_disk_and_pruned_with_the_engine_state(tmp_path):
    assert disk_plan(10**6, 10, 2, False, elastic=True)["engine_bytes"] == (4 + 4 + 8 + 12) * 10**6
    for step in (1, 2):
        for part in ("deepspeed", "elastic"):
            (tmp_path / f"step-{step:08d}" / part).mkdir(parents=True)
    prune_engine_state(tmp_path, keep=1)
    assert not (tmp_path / "step-00000001" / "elastic").exists() and (tmp_path / "step-00000002" / "elastic").is_dir()
