"""Dense layers whose fp32 CPU matrix multiplies run in oneDNN rather than the BLAS (issue 12).

``torch.mm``/``addmm``/``F.linear`` on the CPU call the BLAS that PyTorch was built with, MKL in
the PyPI wheels. MKL picks its kernels by CPU *vendor*: on AMD processors it runs its AVX2 code
even where AVX-512 is there. oneDNN (bundled with PyTorch, ``torch.backends.mkldnn``) picks by
instruction set. Measured on the project's machine (AMD EPYC with AVX-512, one thread, fp32,
``torch.mm`` against :func:`linear`, shapes of eSEN's SO(2) convolutions at 1,632 edges)::

    1632 x 768 x 640    MKL 49 GMAC/s   oneDNN 106 GMAC/s
    1632 x 1024 x 512   MKL 49 GMAC/s   oneDNN 109 GMAC/s
    1632 x 128 x 1536   MKL 49 GMAC/s   oneDNN 109 GMAC/s

(``MKL_ENABLE_INSTRUCTIONS=AVX512`` does not change MKL's choice there.) On an Intel processor
both libraries reach AVX-512 and the difference is expected to be small.

Numerics: the same fp32 products and fp32 sums, accumulated in another order (as between two BLAS
builds or thread counts); no reduced-precision mode (oneDNN's default fp32 math mode is strict:
no bf16/tf32 down-conversion). Results differ from ``F.linear`` by fp32 round-off
(``tests/zoo/test_dense.py``). ``torch.backends.mkldnn.flags(enabled=False)`` (or
``torch.backends.mkldnn.enabled = False``) turns the path off and gives the BLAS results.

One exception: weight gradients of small weights (:data:`MM_WEIGHT_GRAD_ELEMENTS`, 256 × 256) run
as ``torch.mm``. They are bound by reading their two ``[rows, ·]`` operands, one of them transposed,
which the BLAS reads in place and oneDNN copies first (GemNet-OC's ``[5268, 64]`` layers: 1.2 →
0.96 ms each; measurements at :data:`MM_WEIGHT_GRAD_ELEMENTS`).

Where it applies: fp32 tensors on the CPU (and on the meta device, so that the memory planner sees
the path that trains). Everything else — other dtypes (bf16 already goes to oneDNN inside
``F.linear``), CPU autocast, CUDA, tracers, compilers, torch.func transforms, dispatch modes (the
FLOP counters) — takes ``F.linear``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode


def ops_recorded() -> bool:
    """Whether a tracer, compiler, torch.func transform or dispatch mode (the FLOP counters) sees the ops.

    Fast paths written as ``autograd.Function`` step aside then: the FLOP counters count plain
    ops, not an opaque Function, and under torch.compile + torch.func.grad a hand-written double
    backward gave wrong conservative-force gradients (``tests/zoo/test_compile.py``).
    """
    return (torch.jit.is_tracing() or torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
            or _get_current_dispatch_mode() is not None)


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weightᵀ (+ bias)`` in oneDNN: ``[M, in]``, ``[out, in]`` (any strides) → ``[M, out]``."""
    if min(weight.shape) == 0:  # an empty contraction or output (a structure without edges, in the backward)
        return F.linear(x, weight, bias)  # oneDNN refuses these
    if not (weight.is_contiguous() or weight.t().is_contiguous()):
        # a weight with a leading dimension wider than its rows (the transpose of a block of a
        # larger tensor, in the backward) sends oneDNN to its reference kernel: 41 ms instead of
        # 0.04 ms for a [128, 105] @ [105, 128] product
        weight = weight.contiguous()
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _Linear(torch.autograd.Function):
    """``x @ weightᵀ + bias`` whose forward and backward products run in oneDNN (small weight
    gradients: ``torch.mm``, :func:`_weight_grad`).

    The backward is made of this Function again, ``torch.mm`` and a sum, so it is itself
    differentiable: the double backward of conservative forces goes through oneDNN too.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):  # [M, in], [out, in], [out] or None
        ctx.save_for_backward(x, weight, bias)
        return _onednn(x, weight, bias)  # [M, out]

    @staticmethod
    def backward(ctx, grad):  # grad [M, out]
        x, weight, bias = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if _wanted(ctx, 0, x):
            grad_x = _Linear.apply(grad, weight.t(), None)  # [M, in] = grad @ weight
        if _wanted(ctx, 1, weight):
            grad_weight = _weight_grad(grad, x)  # [out, in] = gradᵀ @ x
        if bias is not None and _wanted(ctx, 2, bias):
            grad_bias = grad.sum(0)  # [out]
        return grad_x, grad_weight, grad_bias


#: weight gradients ``gradᵀ @ x`` whose ``[out, in]`` result has at most this many elements, and
#: neither dimension over :data:`MM_WEIGHT_GRAD_SIDE`, run as ``torch.mm`` (the BLAS) rather than in
#: oneDNN. Such a product is bound by reading its two ``[M, ·]`` operands; the BLAS reads the
#: transposed one in place, oneDNN first copies it into rows. Measured (one core, cold cache: 40 MB
#: touched between calls; ms, oneDNN as before → ``torch.mm``)::
#:
#:     GemNet-OC, 5,268 edge rows:  in 64,  out 64    1.23 → 0.96     in 128, out 16   1.15 → 0.68
#:                                  in 4,   out 64    0.39 → 0.27     in 64,  out 256  3.16 → 2.51
#:                                  in 320, out 64    3.79 → 3.70     in 128, out 392  7.46 → 8.37 (kept)
#:     eSEN, 105..945 atom rows:    in and out 64..256           0.41-0.71× the oneDNN time
#:     eSEN, 1,632 edge rows:       in 64,  out 64    0.66 → 0.40     in 256, out 256  2.88 → 2.49
#:                                  in 128, out 384   2.12 → 2.07     in 64,  out 768  2.36 → 2.36 (kept)
#:                                  larger (in·out ≥ 320², up to 1152 × 1280): 0.93-1.15×, noise (kept)
MM_WEIGHT_GRAD_ELEMENTS = 256 * 256
MM_WEIGHT_GRAD_SIDE = 384


def _weight_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``gradᵀ @ x``: ``grad`` ``[M, out]``, ``x`` ``[M, in]`` → ``[out, in]`` (perhaps a transposed view).

    Small weights (:data:`MM_WEIGHT_GRAD_ELEMENTS`) through ``torch.mm``, which autograd differentiates
    (a double backward of conservative forces); larger ones through :class:`_Linear`. Both are fp32
    products with fp32 sums (another order of the same sums).
    """
    out, inp = grad.shape[1], x.shape[1]
    if out * inp <= MM_WEIGHT_GRAD_ELEMENTS and max(out, inp) <= MM_WEIGHT_GRAD_SIDE:
        if inp < min(out, 16):
            # a result with a handful of columns runs the BLAS 2-3× slower than its transpose
            # (5,268 rows, in 4, out 64: 0.78 against 0.27 ms); an in of 16 or more is no longer affected
            return torch.mm(x.t(), grad).t()  # (xᵀ @ grad)ᵀ
        return torch.mm(grad.t(), x)
    # oneDNN copies a transposed first operand into rows; copy the narrower of grad and x
    # (measured, 1,632 rows: out 768, in 64: 39 → 77 GMAC/s; out 256, in 512: 74 against 65)
    if out > inp:
        return _Linear.apply(x.t(), grad.t(), None).t()  # (xᵀ @ grad)ᵀ
    return _Linear.apply(grad.t(), x.t(), None)


def _wanted(ctx, index: int, tensor: torch.Tensor) -> bool:
    """Whether the running backward needs the gradient of input ``index`` (``tensor``).

    ``ctx.needs_input_grad`` says only whether the input requires grad. ATen's own backward
    formulas also skip what the current call does not ask for: ``autograd.grad(energy, positions)``
    (conservative forces) computes no weight gradients. This asks the engine the same question.
    """
    return ctx.needs_input_grad[index] and engine_will_run(gradient_node(tensor))


def gradient_node(tensor: torch.Tensor | None):
    """The autograd node that receives ``tensor``'s gradient (None where it needs none)."""
    if tensor is None or not tensor.requires_grad:
        return None
    return torch.autograd.graph.get_gradient_edge(tensor).node


def engine_will_run(node) -> bool:
    """Whether the running backward will run ``node`` (a :func:`gradient_node`): False where the call
    named its inputs (``autograd.grad``, ``backward(inputs=)``,
    :func:`zoo.models.parameter_gradients.parameter_gradients_only`) and none lies behind ``node``.
    True outside a backward, for every node of a ``backward()`` without inputs, and on a PyTorch
    without the query."""
    if node is None:
        return False
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, RuntimeError):  # no query, or no backward running: compute it, as before
        return True


def cpu_kernels_apply(x: torch.Tensor) -> bool:
    """Whether the project's own CPU kernel choices apply to ``x``: this module's oneDNN products and
    eSEN's :func:`zoo.models.esen.edges.edge_matmul` orientation.

    Not where ops are recorded (:func:`ops_recorded`), not under CPU autocast (its bf16 policy is the
    plain op's to apply), not off the CPU (meta counts as the CPU, for the memory planner) and not
    with ``torch.backends.mkldnn`` off (``--cpu-matmul blas``: earlier releases' products bit for bit).
    """
    if ops_recorded():  # first: dynamo refuses to trace torch.backends queries
        return False
    return (not torch.is_autocast_enabled("cpu") and x.device.type in ("cpu", "meta")
            and torch.backends.mkldnn.enabled)


def takes_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`linear` of these operands runs in oneDNN (see the module docstring)."""
    return (cpu_kernels_apply(x) and x.dtype == torch.float32 and weight.dtype == torch.float32
            and weight.device == x.device and weight.dim() == 2 and torch.backends.mkldnn.is_available())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``: ``x`` ``[..., in]``, ``weight`` ``[out, in]``, ``bias`` ``[out]`` → ``[..., out]``.

    fp32 on the CPU through oneDNN (forward, backward and double backward); otherwise ``F.linear``.
    Values equal ``F.linear``'s to fp32 round-off (another order of the same sums).

    Raises
    ------
    ValueError
        If the last dimension of ``x`` is not ``weight``'s second.

    >>> x, w = torch.randn(4, 3), torch.randn(2, 3)
    >>> torch.allclose(linear(x, w), x @ w.T, atol=1e-6)
    True
    """
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"linear: input [..., {x.shape[-1]}] does not match weight {tuple(weight.shape)}")
    if not takes_onednn(x, weight):
        return F.linear(x, weight, bias)
    if x.dim() == 2:
        return _Linear.apply(x, weight, bias)  # [M, out]
    flat = x.reshape(-1, x.shape[-1])  # [M, in]
    return _Linear.apply(flat, weight, bias).reshape(*x.shape[:-1], weight.shape[0])  # [..., out]


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state-dict keys) whose product is :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
