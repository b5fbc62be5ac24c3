"""Memory layouts of GemNet-OC's angular bases, chosen for the CPU step (issue 12).

:func:`columns` stacks ``S`` vectors ``[T]`` as the columns of a row-major ``[T, S]`` (what
``torch.stack(vectors, dim=1)`` returns), by ``S`` strided column writes. The sparse sums take a
basis as rows (:meth:`zoo.models.gemnet_oc.sparse.OuterPlan.values`), while the Legendre recursion
computes one order at a time; ``torch.stack(dim=1)`` and the transposed copy of ``torch.stack(dim=0)``
both walk the ``[T, S]`` output with an inner extent of ``S = 7``, and were measured slower than
the column writes (one core, ``T = 555,710`` quadruplets, ``S = 7``: 12.4 ms for
``stack(dim=0).t().contiguous()``, 8.6 ms for ``stack(dim=1)``, 2.6 ms for the column writes).
The gradient splits the ``[T, S]`` gradient back into column views, and the two Functions are
each other's derivatives, so conservative forces (a double backward) keep the fast layouts too.

Values are copies: the same numbers bit for bit as ``torch.stack(vectors, dim=1)``. Where ops are
recorded (FLOP counters, tracing, compilers; :func:`zoo.models.dense.ops_recorded`) the plain
``torch.stack(vectors).t().contiguous()`` runs instead (with ``stack(dim=1)`` the traced step
held 30 ``addcmul_`` calls, for which the FLOP counters have no handle).
"""

from __future__ import annotations

import torch

from zoo.models.dense import ops_recorded


class _Columns(torch.autograd.Function):
    """``[T]`` × S → ``[T, S]`` by column writes; backward: :class:`_SplitColumns`."""

    @staticmethod
    def forward(ctx, *vectors):  # S × [T]
        out = vectors[0].new_empty(vectors[0].shape[0], len(vectors))  # [T, S]
        for s, vector in enumerate(vectors):
            out[:, s].copy_(vector)
        return out

    @staticmethod
    def backward(ctx, grad):  # [T, S]
        return _SplitColumns.apply(grad)


class _SplitColumns(torch.autograd.Function):
    """``[T, S]`` → S column views ``[T]`` (strided); backward: :class:`_Columns`."""

    @staticmethod
    def forward(ctx, matrix):  # [T, S]
        return matrix.unbind(1)

    @staticmethod
    def backward(ctx, *grads):  # S × [T] (None where a column got no gradient)
        if any(g is None for g in grads):
            template = next((g for g in grads if g is not None), None)
            if template is None:
                return None
            grads = tuple(torch.zeros_like(template) if g is None else g for g in grads)
        return _Columns.apply(*grads)


def columns(vectors: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``torch.stack(vectors, dim=1)``: S vectors ``[T]`` (same dtype and device) → row-major ``[T, S]``.

    Differentiable to every order (see the module docstring).

    Raises
    ------
    ValueError
        if ``vectors`` is empty or they are not 1-D tensors of one length.
    """
    if not vectors:
        raise ValueError("columns: no vectors")
    length = vectors[0].shape
    if len(length) != 1 or any(v.shape != length for v in vectors):
        raise ValueError(f"columns: expected 1-D vectors of one length, got {[tuple(v.shape) for v in vectors]}")
    if ops_recorded() or vectors[0].is_meta:  # the formulation the FLOP counters have handles for
        return torch.stack(list(vectors)).t().contiguous()
    return _Columns.apply(*vectors)
