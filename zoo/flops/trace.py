"""FLOPs of a training step of a zoo model, counted with fvcore, and the paper's κ.

What is counted
---------------
One training step = forward (energy and, for direct heads, forces) + loss + backward:

- **forward**: traced with fvcore's :class:`~fvcore.nn.FlopCountAnalysis` on a small wrapper
  (:class:`TraceableForceField`) that takes plain tensors (fvcore uses ``torch.jit.trace``, which
  can neither take a torch-geometric ``Batch`` nor trace ``autograd.grad``). Every operator
  has a handle from :mod:`zoo.flops.handles` — contractions, scatter-adds, gathers, elementwise
  arithmetic and activations, reductions, norms, e3nn's ``tensordot``/``einsum`` paths and the
  elementwise polynomials its spherical harmonics trace into — and fvcore's ignore list is
  emptied, so an operator without a handle shows up in :attr:`StepFlops.unsupported` (a test
  demands it be empty for every zoo model).
- **backward**, derived from the same trace, operator by operator: a data-flow pass over the
  traced graph marks each value as depending on the positions (P) and/or on trainable
  parameters (Q). Each operator's gradient w.r.t. an operand costs :meth:`OpCost.grad_cost`
  (for a contraction: the forward cost).

  * direct forces: the loss backward computes the gradient of every operand that requires grad
    (Q): a hidden linear layer costs 2× its forward, a first layer fed by non-trainable inputs
    (a radial basis) 1×.
  * conservative forces (``F = −∂E/∂x`` inside forward, a double backward in training):
    *force backward* — the gradient of every P operand of every P operator; *loss backward* —
    the gradient of every P∪Q operand through the forward graph, plus the backward of each
    force-backward operator w.r.t. its inputs (the output gradient and the P∪Q operands other
    than k for ops linear in each operand, all of them otherwise). A hidden linear layer on a
    position-dependent input thus costs 1 + 1 + 2 + 2 = 6× its forward (docs/FEASIBILITY.md measured
    6.0× for a conservative GNN with ``FlopCounterMode``).

  The contraction part of this count is checked against
  ``torch.utils.flop_counter.FlopCounterMode`` on a real training step of every architecture
  (``tests/zoo/test_flops.py``, within 5 %); the elementwise part of the backward uses the same
  rule and is an estimate (FlopCounterMode counts no elementwise ops).
- **loss**: ~10 FLOPs per atom and 4 per structure each way (per-atom energy MAE + per-atom
  force L2 norm); the optimizer update is not part of a step's model FLOPs (as in C = 3κND).

Convention: **one FMA = 2 FLOPs** (see :mod:`zoo.flops.handles`); MFU is achieved FLOP/s over
the device's dense peak (:mod:`zoo.flops.peaks`), which uses the same convention.

κ (arXiv 2510.09768, Sec. 3): forward FLOPs per atom per parameter,
``κ = C_forward / (atoms × N)``, so that a single-epoch run's compute is ``C ≈ 3κ·N·D``.

Examples
--------
>>> from datapipe.graph import batch_from_atoms
>>> from zoo.registry import build
>>> from zoo.testing import water_cluster
>>> model = build("mpnn", width=16)                      # direct forces
>>> batch = batch_from_atoms([water_cluster(4)], cutoff=model.data_cutoff)
>>> flops = count_step(model, batch)                     # FLOPs of one training step, by phase
>>> flops.total == flops.forward + flops.force_backward + flops.backward + flops.loss
True
>>> flops.unsupported, flops.force_backward              # every op counted; no force backward
({}, 0)
>>> kappa(flops, count_parameters(model)) > 0            # forward FLOPs per atom per parameter
True

:class:`zoo.flops.counter.StepFlopCounter` gives the same count cheaply on every step.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from datapipe import keys
from zoo.flops.handles import OP_COSTS, OpCost, einsum_flops

#: Paper values of κ (arXiv 2510.09768, Table 1), forward FLOPs per atom per parameter.
PAPER_KAPPA = {"mpnn": 2.33, "mc-egnn": 28.09, "gemnet-oc": 35.18, "esen": 74.36}

#: Loss FLOPs per atom and per structure, each of forward and backward (see module docstring).
LOSS_FLOPS_PER_ATOM, LOSS_FLOPS_PER_STRUCTURE = 10, 4

_INPUT_NAMES = ("atomic_numbers", "positions", "edge_index", "batch", "charge", "spin")


class TraceableForceField(nn.Module):
    """A :class:`~zoo.models.base.ForceField`'s forward on plain tensors, for ``torch.jit.trace``.

    Mirrors ``ForceField.forward`` up to the per-structure energy sum: edge vectors from
    positions, ``interact``, the ``index_add`` of atomic energies. Edges beyond the cutoff must be
    removed beforehand (:func:`trace_inputs`). Returns ``energy [B]`` (normalised) and, for a
    direct head, ``forces [N, 3]``.
    """

    def __init__(self, model: nn.Module, num_graphs: int) -> None:
        super().__init__()
        self.model = model
        self.num_graphs = int(num_graphs)

    def forward(self, atomic_numbers, positions, edge_index, batch, charge, spin):
        vectors = positions[edge_index[0]] - positions[edge_index[1]]  # [E, 3]
        node_energy, direct = self.model.interact(
            atomic_numbers, positions, edge_index, vectors, batch, charge, spin, self.num_graphs
        )  # [N], [N, 3] | None
        energy = torch.zeros(self.num_graphs, dtype=node_energy.dtype, device=node_energy.device)
        energy = energy.index_add(0, batch, node_energy)  # [B]
        return energy if direct is None else (energy, direct)


def trace_inputs(model: nn.Module, batch) -> tuple[torch.Tensor, ...]:
    """The wrapper's inputs for ``batch``: tensors in the model's dtype, edges within the cutoff.

    Raises ``ValueError`` (via ``model.check_input``) for unsupported elements.
    """
    model.check_input(batch)
    dtype = next(model.parameters()).dtype
    positions = batch[keys.POSITIONS].to(dtype)  # [N, 3]
    edge_index = batch[keys.EDGE_INDEX]  # [2, E]
    lengths = (positions[edge_index[0]] - positions[edge_index[1]]).norm(dim=-1)  # [E]
    edge_index = edge_index[:, lengths < model.cutoff]
    return (batch[keys.ATOMIC_NUMBERS], positions, edge_index, batch[keys.BATCH], batch[keys.CHARGE], batch[keys.SPIN])


@dataclass
class StepFlops:
    """FLOPs of one training step on one batch (FMA = 2 FLOPs).

    Attributes
    ----------
    forward : model forward (energy; direct forces).
    force_backward : conservative models: ``−∂E/∂x`` inside forward; 0 for direct heads.
    backward : the loss backward (parameter gradients; for conservative models through the
        forward and the force-backward graphs, i.e. the double backward).
    loss : the loss, forward and backward.
    matmul_forward, matmul_step : the contraction part of ``forward`` and of the whole step.
    by_operator : forward FLOPs per aten operator.
    unsupported : operators without a handle (kind → occurrences); empty for the zoo models.
    atoms, edges, graphs : batch size (edges within the model's cutoff).
    """

    forward: int
    force_backward: int
    backward: int
    loss: int
    matmul_forward: int
    matmul_step: int
    atoms: int
    edges: int
    graphs: int
    by_operator: dict[str, int] = field(default_factory=dict)
    unsupported: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """FLOPs of the whole training step."""
        return self.forward + self.force_backward + self.backward + self.loss


class _Flags:
    """Data flow over a traced graph: does a value depend on the positions (P) / on trainable
    parameters (Q)? Graph inputs are the wrapper's inputs then its state (fvcore's trace)."""

    def __init__(self, wrapper: nn.Module, n_inputs: int, positions_index: int) -> None:
        state = list(torch.jit._unique_state_dict(wrapper, keep_vars=True).values())
        self.inputs = [(i == positions_index, False) for i in range(n_inputs)]
        self.inputs += [(False, isinstance(t, nn.Parameter) and t.requires_grad) for t in state]
        self.memo: dict[int, tuple[bool, bool]] = {}

    def of(self, value) -> tuple[bool, bool]:
        stack = [value]
        while stack:
            v = stack[-1]
            if v.unique() in self.memo:
                stack.pop()
                continue
            node = v.node()
            if node.kind() == "prim::Param":
                if node.outputsSize() != len(self.inputs):
                    raise RuntimeError(f"traced graph has {node.outputsSize()} inputs, expected {len(self.inputs)}")
                self.memo[v.unique()] = self.inputs[v.offset()]
                stack.pop()
                continue
            sources = _differentiable_inputs(node)
            missing = [s for s in sources if s.unique() not in self.memo]
            if missing:
                stack.extend(missing)
                continue
            p = any(self.memo[s.unique()][0] for s in sources)
            q = any(self.memo[s.unique()][1] for s in sources)
            if v.type().kind() == "TensorType" and v.type().scalarType() not in (None, "Float", "Double", "Half", "BFloat16"):
                p = q = False  # integer / boolean values carry no gradient
            self.memo[v.unique()] = (p, q)
            stack.pop()
        return self.memo[value.unique()]


def _operands(kind: str, cost: OpCost | None, node) -> list:
    inputs = list(node.inputs())
    if kind == "aten::einsum":
        return list(inputs[1].node().inputs())
    if cost is None:
        return inputs
    return [inputs[k] for k in cost.operands if k < len(inputs)]


def _differentiable_inputs(node) -> list:
    """Inputs whose gradient flows to the node's outputs (views and copies pass all inputs)."""
    kind = node.kind()
    if kind in _CREATION:
        return []
    cost = OP_COSTS.get(kind)
    if cost is not None and not cost.operands and kind != "aten::einsum":
        return list(node.inputs())
    return _operands(kind, cost, node)


#: Ops whose output does not depend on the values of their inputs (only on shapes).
_CREATION = frozenset(
    f"aten::{op}" for op in ("zeros_like", "ones_like", "empty_like", "full_like", "new_zeros", "new_ones",
                             "new_empty", "new_full", "size", "numel", "arange", "zeros", "ones", "empty", "full")
)


def _phases(forward: int, grads: list[int], marks: list[tuple[bool, bool]], multilinear: bool,
            conservative: bool) -> tuple[int, int, int]:
    """(forward, force backward, loss backward) FLOPs of one op; see the module docstring."""
    out_p = any(p for p, _ in marks)
    if not conservative:
        return forward, 0, sum(g for g, (_, q) in zip(grads, marks) if q)
    requires = [p or q for p, q in marks]
    force = sum(g for g, (p, _) in zip(grads, marks) if p) if out_p else 0
    backward = sum(g for g, r in zip(grads, requires) if r)
    if out_p:
        for k, (g, (p, _)) in enumerate(zip(grads, marks)):
            if p:  # backward of the force-backward op: output gradient + other operands
                backward += g * (1 + sum(r for j, r in enumerate(requires) if j != k or not multilinear))
    return forward, force, backward


def _make_handle(kind: str, cost: OpCost, flags: _Flags, conservative: bool):
    """An fvcore handle returning ``{op|forward, op|force_backward, op|backward}`` FLOPs.

    ``einsum`` is split into its contractions (``einsum``) and its outer products
    (``einsum_outer``, elementwise multiplies, see :func:`zoo.flops.handles.einsum_fmas`).
    """
    name = kind.split("::")[-1]

    def handle(inputs, outputs) -> Counter:
        node = outputs[0].node()
        operands = _operands(kind, cost, node)
        marks = [flags.of(v) for v in operands]
        if kind == "aten::einsum":
            parts = {}
            for part, flops in zip(("einsum", "einsum_outer"), einsum_flops(inputs, outputs)):
                parts[part] = _phases(flops, [flops] * len(operands), marks, True, conservative)
        else:
            grads = [cost.grad_cost(inputs, outputs, k) for k in cost.operands[: len(operands)]]
            parts = {name: _phases(int(cost.forward(inputs, outputs)), grads, marks, cost.multilinear, conservative)}
        counts: Counter = Counter()
        for part, values in parts.items():
            for phase, value in zip(("forward", "force_backward", "backward"), values):
                counts[f"{part}|{phase}"] = int(value)
        return counts

    return handle


def count_step(model: nn.Module, batch, direct_forces: bool | None = None) -> StepFlops:
    """Count the FLOPs of one training step of ``model`` on ``batch`` (exact, by tracing).

    Parameters
    ----------
    model : a :class:`~zoo.models.base.ForceField`.
    batch : a torch-geometric ``Batch`` with the fields of :mod:`datapipe.keys`.
    direct_forces : defaults to ``model.direct_forces``.

    Returns
    -------
    :class:`StepFlops`. Costs one traced forward (no gradients).
    """
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.flop_count import _DEFAULT_SUPPORTED_OPS

    from zoo.flops.handles import MATMUL_OPS

    direct = model.direct_forces if direct_forces is None else bool(direct_forces)
    inputs = trace_inputs(model, batch)
    if next(model.parameters()).is_meta:  # a shape-only trace: same graph, no arithmetic
        inputs = tuple(t.to("meta") for t in inputs)
    wrapper = TraceableForceField(model, int(batch.num_graphs))
    flags = _Flags(wrapper, len(inputs), positions_index=_INPUT_NAMES.index("positions"))
    with torch.no_grad():
        analysis = FlopCountAnalysis(wrapper, inputs)
        analysis.set_op_handle(**{k: None for k in _DEFAULT_SUPPORTED_OPS})
        analysis.set_op_handle(**{k: _make_handle(k, c, flags, conservative=not direct) for k, c in OP_COSTS.items()})
        analysis._ignored_ops = set()  # nothing silently skipped: every aten op needs a handle
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        analysis.tracer_warnings("none")
        by_key = analysis.by_operator()
        unsupported = dict(analysis.unsupported_ops())
    phases: Counter = Counter()
    matmul: Counter = Counter()
    by_operator: dict[str, int] = {}
    for key, value in by_key.items():
        op, _, phase = key.partition("|")
        phases[phase] += int(value)
        if f"aten::{op}" in MATMUL_OPS:  # einsum_outer is not
            matmul[phase] += int(value)
        if phase == "forward":
            by_operator[op] = int(value)
    atoms, graphs = int(inputs[0].shape[0]), int(batch.num_graphs)
    loss = 2 * (LOSS_FLOPS_PER_ATOM * atoms + LOSS_FLOPS_PER_STRUCTURE * graphs)
    return StepFlops(
        forward=phases["forward"],
        force_backward=phases["force_backward"],
        backward=phases["backward"],
        loss=loss,
        matmul_forward=matmul["forward"],
        matmul_step=sum(matmul.values()),
        atoms=atoms,
        edges=int(inputs[2].shape[1]),
        graphs=graphs,
        by_operator=dict(sorted(by_operator.items(), key=lambda kv: -kv[1])),
        unsupported=unsupported,
    )


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters N."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def kappa(flops: StepFlops, parameters: int) -> float:
    """κ = forward FLOPs / (atoms × parameters) (arXiv 2510.09768)."""
    return flops.forward / (flops.atoms * parameters)


def compute_3knd(kappa_value: float, parameters: int, atoms_seen: float) -> float:
    """The paper's compute convention ``C = 3κ·N·D`` (FLOPs), D in atoms."""
    return 3.0 * kappa_value * parameters * atoms_seen


__all__ = [
    "PAPER_KAPPA", "StepFlops", "TraceableForceField", "count_step",
    "count_parameters", "kappa", "compute_3knd", "trace_inputs",
]
