"""Per-operator FLOP costs for fvcore's ``FlopCountAnalysis``: the table behind :mod:`zoo.flops.trace`.

Convention
----------
**One fused multiply-add (FMA) = 2 FLOPs**, as in GPU peak specifications (so that MFU is
achieved FLOP/s over the datasheet's dense peak) and as ``torch.utils.flop_counter.FlopCounterMode``
counts. fvcore's own handles count one FMA as 1 flop; every matmul-like handle here therefore
counts ``2 × FMAs``. Other operators:

- elementwise arithmetic, comparisons, selections (``where``, ``clamp``) and transcendentals
  (``exp``, ``sin``, ``sqrt``, …): ``c`` FLOPs per output element, ``c = 1`` except composite
  activations (:data:`ELEMENTWISE_COST`: ``silu`` 4, ``sigmoid`` 3, ``softplus`` 3, ``gelu`` 8, …);
- reductions (``sum``, ``mean``, ``norm``, ``softmax``, ``cumsum``): 1–3 FLOPs per input element;
- scatter-adds (``index_add``, ``scatter_add``, ``scatter_reduce``): one add per source element;
- data movement (views, copies, gathers, ``index_select``, embedding lookups, ``cat``, creation of
  tensors): 0 FLOPs, listed in :data:`ZERO_COST` so that nothing is silently skipped.

Integer-dtype arithmetic (index bookkeeping) counts 0.

Each :class:`OpCost` also gives the cost of the gradient with respect to each differentiable
operand, used by :mod:`zoo.flops.trace` to account for backward passes: for a contraction it equals
the forward (``dA = dY·Bᵀ`` is as large as ``Y = A·B``); the gradient of a gather is a
scatter-add (one add per output element) and that of a scatter-add a gather (0).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fvcore.nn.jit_handles import get_shape

__all__ = ["OpCost", "OP_COSTS", "ZERO_COST", "MATMUL_OPS", "ELEMENTWISE_COST", "einsum_fmas", "einsum_flops"]

Value = Any  # torch._C.Value


def _numel(value: Value) -> int:
    shape = get_shape(value)
    return 0 if shape is None else math.prod(shape)


def _is_float(value: Value) -> bool:
    t = value.type()
    if t.kind() != "TensorType":
        return t.kind() == "FloatType"
    dtype = t.scalarType()
    return dtype in ("Float", "Double", "Half", "BFloat16", None)


def _tensor(value: Value) -> bool:
    return value.type().kind() == "TensorType" and get_shape(value) is not None


@dataclass(frozen=True)
class OpCost:
    """FLOP model of one aten operator.

    Attributes
    ----------
    forward : ``(inputs, outputs) -> FLOPs`` of the forward op (FMA = 2).
    operands : indices of the differentiable tensor inputs.
    grad : ``(inputs, outputs, k) -> FLOPs`` of the gradient w.r.t. operand ``k`` (default: the
        forward cost).
    matmul : True for contractions (counted by ``FlopCounterMode`` as well).
    multilinear : True when the op is linear in each operand separately (its gradient w.r.t.
        operand k does not depend on operand k), which decides the double-backward cost.
    """

    forward: Callable[[list, list], int]
    operands: tuple[int, ...] = (0,)
    grad: Callable[[list, list, int], int] | None = None
    matmul: bool = False
    multilinear: bool = True

    def grad_cost(self, inputs: list, outputs: list, k: int) -> int:
        return self.forward(inputs, outputs) if self.grad is None else self.grad(inputs, outputs, k)


# ---------------------------------------------------------------------------------- contractions
def _linear(inputs, outputs):  # aten::linear(input, weight, bias)
    return 2 * _numel(inputs[0]) * get_shape(inputs[1])[0]


def _addmm(inputs, outputs):  # aten::addmm(bias, a, b)
    n, k = get_shape(inputs[1])
    return 2 * n * k * get_shape(inputs[2])[1]


def _matmul(inputs, outputs):  # mm, matmul, bmm: FMAs = numel(out) × contracted size
    return 2 * _numel(outputs[0]) * get_shape(inputs[0])[-1]


def _baddbmm(inputs, outputs):  # aten::baddbmm(self, b1, b2)
    return 2 * _numel(outputs[0]) * get_shape(inputs[1])[-1]


def _tensordot(inputs, outputs):  # aten::tensordot(a, b, dims_a, dims_b)
    # numel(a)·numel(b) = free_a·free_b·c² and numel(out) = free_a·free_b
    out = _numel(outputs[0])
    if out == 0:
        return 0
    contracted = round(math.sqrt(_numel(inputs[0]) * _numel(inputs[1]) / out))
    return 2 * out * contracted


def einsum_fmas(equation: str, shapes: list[list[int]]) -> tuple[int, int]:
    """``(FMAs, multiplies)`` of ``torch.einsum(equation, *operands)`` as torch executes it.

    Operands are contracted pairwise: for two operands in one step, along opt_einsum's ``auto``
    path for three or more when torch uses opt_einsum (``torch.backends.opt_einsum``), else left
    to right. A pair with contracted indices is a batched matmul (FMAs = product of all index
    sizes of the pair; indices summed within a single operand are summed first); a pair whose
    contracted sizes multiply to 1 is an elementwise (outer) product, which torch runs as
    ``mul`` — counted as multiplies, not FMAs, as ``FlopCounterMode`` does not count it either.
    """
    equation = equation.replace(" ", "")
    lhs, _, out = equation.partition("->")
    terms = lhs.split(",")
    if not _:
        letters = [c for c in lhs.replace(",", "") if c.isalpha()]
        out = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    if "." in equation:
        raise NotImplementedError(f"einsum with ellipsis not supported: {equation}")
    size: dict[str, int] = {}
    for term, shape in zip(terms, shapes):
        for c, n in zip(term, shape):
            size[c] = n
    operands = [set(t) for t in terms]
    if len(operands) == 1:
        return 0, 0
    path: list[tuple[int, ...]]
    import torch

    if len(operands) > 2 and torch.backends.opt_einsum.enabled and torch.backends.opt_einsum.is_available():
        import opt_einsum

        path, _info = opt_einsum.contract_path(
            equation, *shapes, shapes=True, optimize=torch.backends.opt_einsum.strategy
        )
    else:
        path = [(0, 1)] * (len(operands) - 1)
    fmas = multiplies = 0
    for pair in path:
        pair = tuple(sorted(pair, reverse=True))
        picked = [operands.pop(i) for i in pair]
        keep = set(out).union(*operands) if operands else set(out)
        union = set()
        for k, ops in enumerate(picked):
            others = set().union(*(p for j, p in enumerate(picked) if j != k))
            union |= ops & (others | keep)
        if len(picked) > 1:
            contracted = math.prod(size[c] for c in union - keep)
            if contracted > 1:
                fmas += math.prod(size[c] for c in union)
            else:
                multiplies += math.prod(size[c] for c in union)
        operands.append(union & keep)
    return fmas, multiplies


def einsum_flops(inputs, outputs) -> tuple[int, int]:
    """``(matmul FLOPs, elementwise FLOPs)`` of an ``aten::einsum(equation, tensors, path)`` node."""
    equation = inputs[0].toIValue()
    shapes = [get_shape(v) for v in inputs[1].node().inputs()]
    fmas, multiplies = einsum_fmas(equation, shapes)
    return 2 * fmas, multiplies


def _einsum(inputs, outputs):
    return sum(einsum_flops(inputs, outputs))


# ---------------------------------------------------------------------------------- elementwise
def _per_output(cost: float) -> Callable[[list, list], int]:
    def count(inputs, outputs):
        out = outputs[0]
        if not _tensor(out) or not _is_float(out):
            return 0
        return int(cost * _numel(out))

    return count


def _per_input(cost: float) -> Callable[[list, list], int]:
    def count(inputs, outputs):
        if not _tensor(inputs[0]) or not _is_float(inputs[0]):
            return 0
        return int(cost * _numel(inputs[0]))

    return count


def _scatter_source(index: int) -> Callable[[list, list], int]:
    def count(inputs, outputs):
        return _numel(inputs[index]) if _is_float(inputs[index]) else 0

    return count


def _zero(inputs, outputs) -> int:
    return 0


def _gather_grad(inputs, outputs, k) -> int:
    """Gradient of a gather/index/embedding: a scatter-add of the output gradient."""
    return _numel(outputs[0]) if k == 0 else 0


#: FLOPs per output element of elementwise ops (1 unless composite).
ELEMENTWISE_COST: dict[str, float] = {
    **{op: 1 for op in (
        "add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "neg", "reciprocal",
        "pow", "sqrt", "rsqrt", "exp", "exp_", "expm1", "log", "log1p", "sin", "cos", "tan", "tanh",
        "asin", "acos", "atan", "atan2", "arccos", "arcsin", "arctan2", "abs", "sign", "square",
        "where", "clamp", "clamp_", "clamp_min", "clamp_min_", "clamp_max", "maximum", "minimum",
        "relu", "relu_", "lt", "le", "gt", "ge", "eq", "ne", "floor", "ceil", "round", "sgn",
        "masked_fill", "masked_fill_", "heaviside", "erf", "cosh", "sinh", "exp2", "frac", "fmod",
        "remainder", "true_divide", "lerp", "hypot", "copysign", "nan_to_num", "sinc",
    )},
    "sigmoid": 3, "silu": 4, "silu_": 4, "softplus": 3, "gelu": 8, "elu": 3, "mish": 7,
    "logsigmoid": 3, "leaky_relu": 2, "hardtanh": 2, "addcmul": 2, "addcdiv": 2,
}

#: Multiplicative in each operand (gradient w.r.t. k independent of k): decides double backward.
_MULTILINEAR = {"add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "neg", "where", "masked_fill", "addcmul", "lerp"}

#: Ops that do no floating-point arithmetic (views, copies, index bookkeeping, tensor creation).
ZERO_COST: tuple[str, ...] = (
    "Int", "ScalarImplicit", "Float", "Bool", "size", "numel", "dim", "view", "view_as", "reshape",
    "reshape_as", "flatten", "unflatten", "squeeze", "squeeze_", "unsqueeze", "unsqueeze_",
    "permute", "transpose", "transpose_", "t", "contiguous", "expand", "expand_as", "broadcast_to",
    "broadcast_tensors", "select", "slice", "narrow", "split", "split_with_sizes", "chunk",
    "unbind", "cat", "stack", "hstack", "vstack", "repeat", "repeat_interleave", "tile", "flip",
    "roll", "movedim", "unfold", "to", "type_as", "detach", "detach_", "clone", "copy_", "alias",
    "lift_fresh", "zeros", "zeros_like", "ones", "ones_like", "empty", "empty_like", "full",
    "full_like", "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "tensor", "arange",
    "linspace", "scalar_tensor", "eye", "fill_", "zero_", "nonzero", "argsort", "sort", "unique_dim",
    "_unique2", "unique_consecutive", "bincount", "searchsorted", "bucketize", "tril_indices",
    "triu_indices", "meshgrid", "__and__", "__or__", "__xor__", "__not__", "bitwise_and",
    "bitwise_or", "bitwise_not", "logical_and", "logical_or", "logical_not", "floor_divide",
    "dropout", "feature_dropout", "diag_embed", "diagonal", "tril", "triu", "index_put_",
    "index_put", "index_copy", "index_copy_", "masked_select", "masked_scatter", "scatter", "scatter_", "index_fill",
    "index_fill_", "resolve_conj", "resolve_neg", "as_strided", "pad", "constant_pad_nd", "numpy_T",
    "_shape_as_tensor", "_reshape_from_tensor", "item", "any", "all", "isnan", "isfinite",
    "isinf", "argmax", "argmin",
)

#: Ops that move data along an index (0 FLOPs forward; gradient = scatter-add).
_GATHERS = {"index": 0, "index_select": 0, "gather": 0, "embedding": 0, "take_along_dim": 0}

OP_COSTS: dict[str, OpCost] = {}
for _op in ZERO_COST:
    OP_COSTS[f"aten::{_op}"] = OpCost(_zero, operands=())
for _op, _cost in ELEMENTWISE_COST.items():
    OP_COSTS[f"aten::{_op}"] = OpCost(
        _per_output(_cost),
        operands=(0, 1, 2) if _op in ("where",) else (0, 1),
        multilinear=_op in _MULTILINEAR,
    )
OP_COSTS["aten::where"] = OpCost(_per_output(1), operands=(1, 2))
OP_COSTS["aten::masked_fill"] = OP_COSTS["aten::masked_fill_"] = OpCost(_per_output(1), operands=(0,))
for _op in _GATHERS:
    OP_COSTS[f"aten::{_op}"] = OpCost(_zero, operands=(0,), grad=_gather_grad)
# embedding(weight, indices): the differentiable operand is the weight (input 0)
OP_COSTS["aten::embedding"] = OpCost(_zero, operands=(0,), grad=_gather_grad)
for _op, _src in (("index_add", 3), ("index_add_", 3), ("scatter_add", 3), ("scatter_add_", 3),
                  ("scatter_reduce", 3), ("scatter_reduce_", 3), ("index_reduce", 3), ("index_reduce_", 3)):
    # gradient w.r.t. the source is a gather (0 FLOPs); w.r.t. the base tensor an identity (0)
    OP_COSTS[f"aten::{_op}"] = OpCost(_scatter_source(_src), operands=(0, _src), grad=lambda i, o, k: 0)
for _op, _cost in (("sum", 1), ("mean", 1), ("prod", 1), ("cumsum", 1), ("cumprod", 1), ("amax", 1),
                   ("amin", 1), ("max", 1), ("min", 1), ("logsumexp", 3), ("softmax", 4),
                   ("log_softmax", 4), ("var", 3), ("std", 3), ("var_mean", 3), ("std_mean", 3)):
    OP_COSTS[f"aten::{_op}"] = OpCost(_per_input(_cost), operands=(0,), multilinear=_op in ("sum", "mean", "cumsum"))
for _op in ("norm", "linalg_vector_norm", "frobenius_norm"):
    OP_COSTS[f"aten::{_op}"] = OpCost(_per_input(2), operands=(0,), multilinear=False)
OP_COSTS["aten::layer_norm"] = OpCost(_per_input(8), operands=(0, 2, 3), multilinear=False)
OP_COSTS["aten::group_norm"] = OpCost(_per_input(8), operands=(0, 2, 3), multilinear=False)
OP_COSTS["aten::rms_norm"] = OpCost(_per_input(4), operands=(0, 2), multilinear=False)
OP_COSTS["aten::cdist"] = OpCost(lambda i, o: 3 * _numel(o[0]) * get_shape(i[0])[-1], operands=(0, 1), multilinear=False)
OP_COSTS["aten::cross"] = OpCost(_per_output(3), operands=(0, 1))
OP_COSTS["aten::linalg_cross"] = OP_COSTS["aten::cross"]
OP_COSTS["aten::dot"] = OpCost(lambda i, o: 2 * _numel(i[0]), operands=(0, 1), matmul=True)
OP_COSTS["aten::vdot"] = OP_COSTS["aten::dot"]
OP_COSTS["aten::linear"] = OpCost(_linear, operands=(0, 1), matmul=True)
OP_COSTS["aten::addmm"] = OpCost(_addmm, operands=(1, 2), matmul=True)
OP_COSTS["aten::baddbmm"] = OpCost(_baddbmm, operands=(1, 2), matmul=True)
for _op in ("mm", "matmul", "bmm"):
    OP_COSTS[f"aten::{_op}"] = OpCost(_matmul, operands=(0, 1), matmul=True)
OP_COSTS["aten::tensordot"] = OpCost(_tensordot, operands=(0, 1), matmul=True)
OP_COSTS["aten::einsum"] = OpCost(_einsum, operands=(), matmul=True)  # operands: the tensor list, see flops.py

#: Contractions: the part both fvcore (with these handles) and FlopCounterMode count.
MATMUL_OPS = frozenset(k for k, v in OP_COSTS.items() if v.matmul)
