"""SiLU with hand-written first and second derivatives, for conservative forces (issue 12).

GemNet-OC's layers apply ``silu(x) = x·σ(x)`` (their ``1/0.6`` is folded into the next weight,
:mod:`zoo.models.gemnet_oc.interactions`). With conservative forces the training step
differentiates twice: the forces ``−∂E/∂positions`` are built with ``create_graph=True`` and the
loss on them is differentiated again. PyTorch's SiLU then records its first derivative as six
elementwise operations (its ``infinitely_differentiable_silu_backward``: ``σ(x)``, ``1 − σ``, …)
and differentiates those again, about twenty passes over each ``[E, C]`` activation; they were the
largest elementwise cost of the conservative step (``mul``: 0.23 s over 954 calls, width 64).

Here:

- ``silu'``: ``g · σ(x)(1 + x(1 − σ(x)))`` is one pass (ATen's ``silu_backward`` kernel), a
  Function of ``(g, x)`` whose own derivatives are
- ``∂/∂g``: ``gg · silu'(x)`` (the same kernel) and ``∂/∂x``: ``gg · g · silu''(x)`` with
  ``silu''(x) = σ(1 − σ)(2 + x(1 − 2σ))``, six passes (``σ``, a product, ATen's fused
  ``sigmoid_backward`` for ``·σ(1 − σ)``, ``x + 2``, one ``addcmul``, a product).

Those are plain differentiable ops, so a third derivative is still correct (slow). Values are the
same functions; float round-off differs from autograd's formulas in the last bits
(``tests/zoo/test_gemnet_fused.py``: gradcheck and gradgradcheck in float64 against
``torch.nn.functional.silu``). Where ops are recorded (FLOP counters, tracing, compilers;
:func:`zoo.models.dense.ops_recorded`) or nothing requires a gradient, ``torch.nn.functional.silu``
runs instead.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from zoo.models.dense import ops_recorded


class _SiLU(torch.autograd.Function):
    """``silu(x)``; backward: :class:`_SiLUGrad` (one pass; differentiable)."""

    @staticmethod
    def forward(ctx, x):  # [..]
        ctx.save_for_backward(x)
        return F.silu(x)

    @staticmethod
    def backward(ctx, grad):  # [..] like x
        (x,) = ctx.saved_tensors
        if not torch.is_grad_enabled():  # a first-order backward (no create_graph): the kernel alone
            return torch.ops.aten.silu_backward(grad, x)
        return _SiLUGrad.apply(grad, x)


class _SiLUGrad(torch.autograd.Function):
    """``g · silu'(x)`` (ATen's ``silu_backward``) with its derivatives in ``g`` and ``x``."""

    @staticmethod
    def forward(ctx, grad, x):  # [..], [..]
        ctx.save_for_backward(grad, x)
        return torch.ops.aten.silu_backward(grad, x)

    @staticmethod
    def backward(ctx, gg):  # [..]
        grad, x = ctx.saved_tensors
        d_grad = d_x = None
        if ctx.needs_input_grad[0]:
            d_grad = _SiLUGrad.apply(gg, x)  # gg · silu'(x)
        if ctx.needs_input_grad[1]:
            s = torch.sigmoid(x)
            d_x = torch.ops.aten.sigmoid_backward(gg * grad, s)  # gg · g · σ(1 − σ)
            d_x = d_x * torch.addcmul(x + 2.0, x, s, value=-2.0)  # · (2 + x(1 − 2σ))
        return d_grad, d_x


def silu(x: torch.Tensor) -> torch.Tensor:
    """``x · σ(x)`` ``[...]`` → ``[...]``, with the derivatives of the module docstring."""
    if not (torch.is_grad_enabled() and x.requires_grad) or ops_recorded():
        return F.silu(x)
    return _SiLU.apply(x)
