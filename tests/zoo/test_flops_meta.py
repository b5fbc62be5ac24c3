"""A shape-only FLOP trace (the model built on the meta device) counts exactly what the full trace counts."""

from __future__ import annotations

import pytest
import torch

from datapipe.graph import batch_from_atoms
from zoo.flops.report import model_report, reference_structures
from zoo.flops.trace import count_step
from zoo.registry import build


def _both(name: str, width: int, direct_forces: bool, structures):
    counts = []
    for device in ("meta", "cpu"):
        torch.manual_seed(0)
        with torch.device(device):
            model = build(name, width=width, direct_forces=direct_forces)
        model.train()
        counts.append(count_step(model, batch_from_atoms(structures, cutoff=model.data_cutoff)))
    return counts


@pytest.mark.parametrize("name,width,direct", [("esen", 16, True), ("esen", 24, False), ("mpnn", 16, True),
                                               ("mc-egnn", 16, False)])
def test_meta_trace_equals_full_trace(name, width, direct):
    """Every phase and every operator's count is identical (the counts depend on shapes only)."""
    structures = reference_structures()[0][:6]
    meta, full = _both(name, width, direct, structures)
    assert full.forward > 0 and (direct or full.force_backward > 0)
    assert meta == full  # dataclass equality: all phases, matmul parts, by_operator, sizes, unsupported


def test_report_falls_back_to_a_full_trace_when_values_are_needed():
    """GemNet-OC builds its triplets from positions: the report says it traced in full, and its count is
    the full trace's; asking for a shape-only trace of it is an error that names the model."""
    structures = reference_structures()[0][:3]
    row = model_report("gemnet-oc", 8, structures=structures)
    assert row["trace"] == "full"
    exact = model_report("gemnet-oc", 8, structures=structures, shape_only=False)
    assert row["forward_flops"] == exact["forward_flops"] and row["step_flops"] == exact["step_flops"]
    with pytest.raises(RuntimeError, match="gemnet-oc"):
        model_report("gemnet-oc", 8, structures=structures, shape_only=True)


def test_width_1024_esen_is_traced_on_the_meta_device():
    """The headline width (a full trace did not finish in 300 s): no weights allocated, κ close to the small widths' (same reference batch)."""
    structures = reference_structures()[0][:8]
    big = model_report("esen", 1024, structures=structures)
    small = model_report("esen", 32, structures=structures, shape_only=False)
    assert big["trace"] == "meta" and big["parameters"] > 3 * 10**8
    assert 0.8 < big["kappa"] / small["kappa"] < 1.2
