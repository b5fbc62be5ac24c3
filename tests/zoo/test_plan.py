"""The memory planner: model states against a hand count, activations measured on the model's graph."""

from __future__ import annotations

import pytest
import torch

from datapipe.graph import batch_from_atoms
from zoo.flops.report import reference_structures
from zoo.plan import check, make_plan, parse_memory, render
from zoo.plan.activations import measure_activations
from zoo.plan.memory import RUNTIME_BYTES, plan_one
from zoo.registry import build, count_parameters


@pytest.mark.parametrize("name,direct", [("esen", True), ("esen", False), ("mpnn", True)])
def test_activation_measurement_is_the_same_on_meta_and_cpu(name, direct):
    structures = reference_structures()[0][:4]
    got = []
    for device in ("meta", "cpu"):
        torch.manual_seed(0)
        with torch.device(device):
            model = build(name, width=16, direct_forces=direct)
        got.append(measure_activations(model, batch_from_atoms(structures, cutoff=model.data_cutoff)))
    assert got[0] == got[1] and got[0].total > 0
    assert 0 < got[0].checkpointed < got[0].total  # checkpointing keeps less


@pytest.mark.parametrize("gpus", [8, 64])
def test_model_states_match_a_hand_count(gpus):
    """ZeRO paper's count (arXiv 1910.02054): bf16 weights and gradients (2N + 2N), fp32 master (4N) and the
    two schedule-free states (8N); ZeRO-3 divides all by W, ZeRO-1 only the optimizer and master."""
    n = count_parameters("esen", 1024)
    z3 = plan_one("deepspeed", 3, n, 0, gpus, "bf16", 0.0, 0, False, "", 80e9)
    assert z3.weights + z3.gradients + z3.optimizer == pytest.approx(16 * n / gpus)
    z1 = plan_one("deepspeed", 1, n, 0, gpus, "bf16", 0.0, 0, False, "", 80e9)
    assert z1.weights + z1.gradients + z1.optimizer == pytest.approx(4 * n + 12 * n / gpus)
    fsdp = plan_one("fsdp", "root", n, 0, gpus, "fp32", 0.0, 0, False, "", 80e9)
    assert fsdp.weights + fsdp.gradients + fsdp.optimizer == pytest.approx(16 * n / gpus)
    assert fsdp.buffers == pytest.approx(8 * n)  # the root unit gathers every weight and gradient


def test_plan_of_the_headline_run_and_the_refusal():
    structures = reference_structures()[0][:4]
    result = make_plan("esen", 1024, 64, parse_memory("80GB"), 128, structures=structures)
    assert result["activations"]["method"] == "meta"
    best = result["recommended"]
    assert best is not None and best.fits and best.total < 80e9
    assert "recommended: --engine" in render(result)
    conservative = make_plan("esen", 1024, 8, parse_memory("80GB"), 128, conservative=True, structures=structures)
    assert all(p.stage in (1, 2, "root") for p in conservative["plans"] if p.allowed)
    # 24 GiB ranks cannot hold ZeRO-1's replicated weights and gradients with 512 atoms per rank: refused with advice
    with pytest.raises(MemoryError, match="use --engine"):
        check("esen", 1024, {}, "deepspeed", 1, False, "", 2, parse_memory("24GiB"), 512, False, "fp32")
    mine, _ = check("esen", 64, {}, "deepspeed", 2, False, "", 2, parse_memory("24GiB"), 128, False, "fp32")
    assert RUNTIME_BYTES < mine.total < parse_memory("24GiB")
