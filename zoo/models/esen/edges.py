"""Edge gathers of eSEN's message block, written for the CPU's fast paths (issue 12).

``[x_j ‖ x_i]`` for every edge ``j → i`` is the input of eSEN's first SO(2) convolution
(arXiv 2502.12147, Sec. 3). Written as ``torch.cat([x[source], x[target]], dim=-1)`` it costs,
on the CPU, more than its size suggests (measured, one thread, 5,268 edges, lmax 2, C = 64):

- ``cat`` along the last dimension of 3-d tensors takes a slow path (≈ 20 ms against ≈ 3.5 ms for
  the same bytes as a ``cat`` of 2-d views along dimension 1);
- its backward hands each ``index_select`` a non-contiguous slice of the gradient, and
  ``index_add`` of a non-contiguous source is ≈ 5× slower than of a contiguous one (17 ms against
  3 ms including the copy).

:func:`gather_pair` computes the same values with the same additions in the same order (outputs
and gradients bit-identical to the plain formulation; ``tests/zoo/test_esen_fast.py``). Its
backward is made of differentiable ops, so conservative forces can train through it (double
backward).

:func:`edge_matmul` takes the per-edge Wigner rotations ``[E, 9, 9] @ [E, 9, C]`` (lmax 2) and the
products of their backward: ATen's backward of a batched product asks, in the double backward of
conservative forces, for ``[E, 2C, 9] @ [E, 9, 9]``, which the CPU runs several times slower than
its transpose; here every product is taken in the fast orientation.
"""

from __future__ import annotations

import torch

from zoo.models.dense import cpu_kernels_apply, ops_recorded

#: bytes of edge rows copied at a time in the backward (below glibc's largest mmap threshold)
_CHUNK_BYTES = 8 << 20


def _cat_last(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.cat([a, b], dim=-1)`` for ``[E, K, C]`` tensors, through 2-d views (the fast path)."""
    e, k, c = a.shape
    return torch.cat([a.reshape(e * k, c), b.reshape(e * k, b.shape[2])], dim=1).view(e, k, c + b.shape[2])


def _scatter_pair(grad: torch.Tensor, source: torch.Tensor, target: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """The adjoint of :func:`gather_pair`: ``[E, K, 2C]`` → ``[N, K, C]``."""
    e, k, c2 = grad.shape
    c = c2 // 2
    from_source = grad.new_zeros(num_nodes, k, c)  # [N, K, C]
    from_target = grad.new_zeros(num_nodes, k, c)
    # contiguous copies in chunks of edges (the additions stay in edge order): a copy of all edges
    # at once can exceed glibc's mmap threshold (32 MiB) and pay a page fault per 4 KiB on every call
    step = max(1, _CHUNK_BYTES // max(1, k * c2 * grad.element_size()))
    for start in range(0, e, step):
        chunk = grad.narrow(0, start, min(step, e - start))  # [e', K, 2C]
        to_source, to_target = chunk.split([c, c], dim=2)  # [e', K, C] each, non-contiguous
        from_source.index_add_(0, source.narrow(0, start, chunk.shape[0]), to_source.contiguous())
        from_target.index_add_(0, target.narrow(0, start, chunk.shape[0]), to_target.contiguous())
    # two sums added at the end, as autograd accumulates the two gathers' gradients
    return from_source + from_target  # [N, K, C]


class _GatherPair(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, source, target):
        ctx.save_for_backward(source, target)
        ctx.num_nodes = x.shape[0]
        return _cat_last(x.index_select(0, source), x.index_select(0, target))

    @staticmethod
    def backward(ctx, grad):
        source, target = ctx.saved_tensors
        # differentiable ops: under create_graph the double backward goes through them
        return _ScatterPair.apply(grad, source, target, ctx.num_nodes), None, None


class _ScatterPair(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad, source, target, num_nodes):
        ctx.save_for_backward(source, target)
        return _scatter_pair(grad, source, target, num_nodes)

    @staticmethod
    def backward(ctx, grad_grad):
        source, target = ctx.saved_tensors
        return _GatherPair.apply(grad_grad, source, target), None, None, None


def gather_pair(x: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[x[source] ‖ x[target]]``: node features ``[N, K, C]`` → edge pairs ``[E, K, 2C]``.

    Equal to ``torch.cat([x[source], x[target]], dim=-1)`` bit for bit, in value and gradient
    (any order: the gather and its adjoint, the scatter, are each other's backward).

    >>> x = torch.arange(12.0).reshape(3, 2, 2)
    >>> source, target = torch.tensor([0, 2]), torch.tensor([1, 1])
    >>> torch.equal(gather_pair(x, source, target), torch.cat([x[source], x[target]], dim=-1))
    True
    """
    if x.dim() != 3:
        raise ValueError(f"gather_pair takes node features [N, K, C], got shape {tuple(x.shape)}")
    # meta tensors take the Function like real ones: the memory planner measures the saved tensors of
    # the path that trains (tests/zoo/test_plan.py: the same on meta and on the CPU)
    if ops_recorded():
        # the plain formulation, where something records or transforms the ops: the FLOP counters (a
        # jit trace or a dispatch mode) count these ops, not an opaque Function, and under torch.compile
        # + torch.func.grad the Functions' hand-written double backward gave wrong conservative-force
        # gradients (float64: 9 % off in an SO(2) weight; tests/zoo/test_compile.py)
        return torch.cat([x.index_select(0, source), x.index_select(0, target)], dim=-1)  # [E, K, 2C]
    return _GatherPair.apply(x, source, target)


def _oriented_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for ``[E, M, K] @ [E, K, N]``, taken as ``(bᵀ aᵀ)ᵀ`` when ``M > N``.

    The CPU's batched product of many small matrices is several times slower with many rows and
    few columns than transposed (measured, one thread, 1,632 edges: ``[E, 128, 9] @ [E, 9, 9]``
    6-9 ms, the transposed product 1.7 ms); the result is the same sums of the same products.
    """
    if a.shape[1] > b.shape[2]:
        return torch.bmm(b.transpose(1, 2), a.transpose(1, 2)).transpose(1, 2)  # [E, M, N] (strided)
    return torch.bmm(a, b)  # [E, M, N]


class _EdgeMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return _oriented_bmm(a, b)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        # through the Function again: under create_graph the double backward keeps the fast orientation
        grad_a = _EdgeMatmul.apply(grad, b.transpose(1, 2)) if ctx.needs_input_grad[0] else None  # [E, M, K]
        grad_b = _EdgeMatmul.apply(a.transpose(1, 2), grad) if ctx.needs_input_grad[1] else None  # [E, K, N]
        return grad_a, grad_b


def edge_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-edge matrix products ``[E, M, K] @ [E, K, N]`` → ``[E, M, N]`` (eSEN's Wigner rotations).

    Equal to ``a @ b`` up to fp32 round-off (the same products, summed by a kernel in another
    order); each product of the forward and of every backward order (conservative forces train
    through a double backward) is taken in the orientation the CPU's batched product runs fast
    (:func:`_oriented_bmm`). Where ops are recorded (FLOP counters, ``torch.compile``) it is the
    plain ``a @ b``, and so it is off the CPU (the slow orientation is the CPU's), under CPU
    autocast (its casts belong to the op) and with ``torch.backends.mkldnn`` off (``--cpu-matmul
    blas``: the products of earlier releases bit for bit, as in :mod:`zoo.models.dense`).

    Raises ``ValueError`` unless both are 3-d with matching edges and inner sizes.

    >>> a, b = torch.randn(4, 9, 9), torch.randn(4, 9, 5)
    >>> torch.allclose(edge_matmul(a, b), a @ b, atol=1e-5)
    True
    """
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        raise ValueError(f"edge_matmul takes [E, M, K] and [E, K, N], got {tuple(a.shape)} and {tuple(b.shape)}")
    if not cpu_kernels_apply(a):
        return a @ b  # [E, M, N]
    return _EdgeMatmul.apply(a, b)
