"""``x · Wᵀ`` through oneDNN on CPU in float32: GemNet-OC's dense layers, same sums, a faster kernel.

GemNet-OC at width 64 spends most of a training step in ``[E, 64] × [64, 64]`` products (the
residual stacks on the edges, ~94 per step at 4 blocks; arXiv 2204.02782, Fig. 3). PyTorch runs
a float32 ``nn.functional.linear`` on CPU through MKL's sgemm, which on AMD processors takes its
AVX2 code path; oneDNN (bundled with PyTorch as MKL-DNN) picks its kernel by the instruction set
the processor reports and uses AVX-512 there. Measured on this project's CPU machine (AMD EPYC,
one core): ``[5268, 64] × [64, 64]`` 0.51 ms (MKL) against 0.25 ms (oneDNN), ``[5268, 320] × [320,
64]`` 3.7 against 1.3 ms. Both compute the same float32 products and sums in another order:
results agree to float32 round-off (a different summation order, not an approximation).

:func:`linear` takes the oneDNN product (:class:`_Linear`: the product and its input gradient
through oneDNN, the weight gradient a plain ``mm``; the backward is written with differentiable
operations, so conservative-force training can differentiate it again) where it can run — float32 CPU tensors, no autocast, and outside
``torch.jit.trace``, ``torch.compile`` and ``TorchDispatchMode`` (the FLOP counters, fake/meta
tensors), which keep seeing the ``nn.functional.linear`` they counted — and
``nn.functional.linear`` everywhere else (float64, CUDA, bf16, ...). ``ONEDNN = False`` turns it off.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

#: set False to run every dense layer through ``nn.functional.linear`` (MKL on CPU)
ONEDNN = True

_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_capable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`linear` takes the oneDNN product for these tensors (see the module docstring)."""
    if not (ONEDNN and _AVAILABLE):
        return False
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and not t.is_meta for t in (x, weight))


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x · weightᵀ``, bias-free: ``[..., in], [out, in] → [..., out]`` (as ``nn.functional.linear``).

    Raises
    ------
    ValueError
        if ``x``'s last size is not ``weight``'s second.
    """
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: x {tuple(x.shape)} does not fit weight {tuple(weight.shape)} ([out, in])")
    if x.numel() == 0 or not onednn_capable(x, weight):
        return torch.nn.functional.linear(x, weight)
    return _Linear.apply(x, weight)


class Linear(nn.Linear):
    """Bias-free ``nn.Linear`` whose forward is :func:`linear` (the same parameter, state-dict name and
    module hooks as ``nn.Linear``; ``[..., in] → [..., out]``)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


def _product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # a strided weight (a column slice, a transpose) made contiguous first: oneDNN's own handling of one
    # took 0.5 s for a [5268, 64] × [64, 64] product (measured), the copy of a [out, in] weight ~µs
    return torch.ops.mkldnn._linear_pointwise(x, weight.contiguous(), None, "none", [], "")  # [..., out]


class _Linear(torch.autograd.Function):
    """``y = x · Wᵀ``; ``∂/∂x = g · W`` (oneDNN) and ``∂/∂W = gᵀ · x`` (rows of ``x`` and ``g`` flattened;
    a plain ``mm``: a reduction over all rows, which oneDNN ran no faster, measured)."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return _product(x, weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = linear(grad, weight.t())  # [..., in]
        if ctx.needs_input_grad[1]:
            rows_g, rows_x = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])  # [M, out], [M, in]
            grad_w = rows_g.t() @ rows_x  # [out, in] = Σ_rows g ⊗ x
        return grad_x, grad_w
