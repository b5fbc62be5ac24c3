"""The training loss's backward stops at the geometry: conservative training without a wasted pass (issue 12).

With conservative forces ``F = −∂E/∂positions`` a training step differentiates twice. The model takes
``∂E/∂positions`` itself (:meth:`zoo.models.base.ForceField.energy_gradient`: ``autograd.grad`` with
``create_graph=True``, with respect to its own detached copy of the positions); the trainer's
``loss.backward()`` then differentiates the loss, which holds ``F``, with respect to the parameters.
``backward()`` without ``inputs=`` runs every node that leads to any leaf requiring a gradient, the
model's private copy of the positions included, so the second pass also computed ``∂loss/∂positions``:
the gradient of every geometric basis a second and third time (in GemNet-OC, two of the three sampled
dot products of each bilinear sum per block, then the Legendre, cosine and radial chains behind them),
into a leaf that nothing outside the model can reach and that is dropped when the step ends.

Here the tensors that depend on the positions alone (radial and angular bases) are marked by
:func:`geometric`: an identity whose backward hands the gradient on only while the model takes its own
position gradient (:func:`position_gradients`, entered by ``energy_gradient``) and drops it otherwise.
The nodes behind a mark then receive no gradient in the trainer's pass and do no work; the project's
own Functions that take a marked tensor (GemNet-OC's sparse sums,
:mod:`zoo.models.gemnet_oc.sparse`) ask :func:`gradient_wanted` and do not compute its gradient at all.

Exact: the gradient of every parameter is unchanged, bit for bit (what is dropped flows only into the
private positions; a marked tensor must have no parameter upstream — ``tests/zoo/test_geometry_gate.py``
compares the parameter gradients of GemNet-OC's conservative step with every gradient let through).
Forces are unchanged: they are taken inside :func:`position_gradients`. Whoever differentiates a model's
outputs with respect to something behind a mark themselves (a Hessian through the model's own
positions, a memory planner replaying ``autograd.grad``) does so inside ``position_gradients()``.

The switch is process-wide, not per thread: on CUDA the autograd engine runs the backward on its own
device threads, which must see it. Where ops are recorded (FLOP counters, tracing, compilers, torch.func
transforms; :func:`zoo.models.dense.ops_recorded`) or ``x`` needs no gradient, :func:`geometric` returns
``x`` itself, so what the FLOP counters see is unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from zoo.models.dense import ops_recorded

_taking = 0  # position_gradients() entered and not left, in any thread


@contextlib.contextmanager
def position_gradients() -> Iterator[None]:
    """Let gradients through every :func:`geometric` mark while the block runs (re-entrant).

    >>> x = torch.ones(3, requires_grad=True)
    >>> with position_gradients():
    ...     (g,) = torch.autograd.grad(geometric(x * 2).sum(), x)
    >>> g.tolist()
    [2.0, 2.0, 2.0]
    """
    global _taking
    _taking += 1
    try:
        yield
    finally:
        _taking -= 1


def taking_position_gradients() -> bool:
    """Whether a :func:`position_gradients` block is running (gradients pass the marks)."""
    return _taking > 0


class _Geometric(torch.autograd.Function):
    """Identity; backward: the gradient inside :func:`position_gradients`, none outside."""

    @staticmethod
    def forward(ctx, x):  # [...]
        ctx.set_materialize_grads(False)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # [...] or None
        return grad if _taking else None


def geometric(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[...]``, marked as depending on the positions alone (see the module docstring).

    The caller guarantees that no parameter lies upstream of ``x``: outside :func:`position_gradients`
    its gradient is dropped. ``x`` itself where it needs no gradient or ops are recorded.

    >>> x = torch.ones(3, requires_grad=True)
    >>> y = geometric(x * 2)
    >>> torch.equal(y, x * 2), gradient_wanted(y)
    (True, False)
    >>> y.sum().backward()
    >>> x.grad is None
    True
    """
    if not x.requires_grad or ops_recorded():
        return x
    return _Geometric.apply(x)


def marked(x: torch.Tensor | None) -> bool:
    """Whether ``x`` is the output of :func:`geometric` (its gradient passes only inside
    :func:`position_gradients`). A Function records this for its inputs in ``forward`` and, in
    ``backward``, skips the gradient of a marked input unless :func:`taking_position_gradients`."""
    return x is not None and isinstance(x.grad_fn, _Geometric._backward_cls)


def gradient_wanted(x: torch.Tensor) -> bool:
    """False for a :func:`geometric` mark outside :func:`position_gradients` (its gradient would be
    dropped), True otherwise."""
    return _taking > 0 or not marked(x)
