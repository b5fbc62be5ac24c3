"""The trainer's backward of a conservative step reaches the parameters only (issue 12).

With conservative forces ``F = −∂E/∂positions`` a training step differentiates twice. The model takes
``∂E/∂positions`` itself (:meth:`zoo.models.base.ForceField.energy_gradient`: ``autograd.grad`` with
``create_graph=True``, with respect to its own detached copy of the positions); the trainer's
``loss.backward()`` then differentiates the loss, which holds ``F``, with respect to the parameters.
``backward()`` without ``inputs=`` runs every node that leads to any leaf requiring a gradient, the
model's private copy of the positions included, so that pass also computed ``∂loss/∂positions``: the
whole position-only side of the double backward (in GemNet-OC two of the three sampled dot products of
every sum of a geometric basis, the Legendre, cosine, dihedral and radial chains behind them), into a
leaf that nothing outside the model reaches and that is dropped when the step ends.

:func:`parameter_gradients_only` runs the model inside a Function whose backward is
``torch.autograd.grad(outputs, parameters)``: with its inputs named, autograd runs only the nodes that
lead to a parameter, and each built-in op computes only the input gradients that lead there. The
project's own Functions ask the same question (:func:`zoo.models.dense.engine_will_run`): GemNet-OC's
sparse sums (:mod:`zoo.models.gemnet_oc.sparse`) then skip the basis gradients, the oneDNN products
(:mod:`zoo.models.dense`) the input gradients of the radial bases.

Measured (GemNet-OC width 64, conservative training step, one core): the sparse sums' skip alone
1.08–1.11× (in-process A/B); with it, the trainer's backward as ``autograd.grad(loss, parameters)``
1.47 s against 1.71 s for ``loss.backward()``; ``benchmarks/bench_gemnet.py --baseline`` the revision
before, with two smaller changes of the same stop: 1.19×.
"""

from __future__ import annotations

import torch

from zoo.models.dense import ops_recorded


class _ParameterGradients(torch.autograd.Function):
    """``outputs`` (built before, each with its graph), detached; backward: ``autograd.grad(outputs, parameters)``."""

    @staticmethod
    def forward(ctx, outputs, *parameters):
        ctx.set_materialize_grads(False)
        ctx.outputs, ctx.parameters = outputs, parameters
        return tuple(output.detach() for output in outputs)

    @staticmethod
    def backward(ctx, *grads):  # one per output, None where the loss does not use it
        outputs = ctx.outputs
        again = torch.is_grad_enabled()  # create_graph: a later derivative may come back through here
        if not again:
            ctx.outputs = None  # the inner graph is freed with this backward
        pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
        wanted = [p for p, need in zip(ctx.parameters, ctx.needs_input_grad[1:]) if need]
        if not pairs or not wanted:
            return (None,) * len(ctx.needs_input_grad)
        got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True,
                                       create_graph=again, retain_graph=again))
        return (None, *(next(got) if need else None for need in ctx.needs_input_grad[1:]))


def reached_parameters(outputs, parameters) -> list[torch.Tensor]:
    """The ``parameters`` that the autograd graphs of ``outputs`` lead to, in the order given.

    A walk over the graph's nodes (every node once). A parameter the graph does not reach gets no
    gradient, as in a plain backward: the engines' gradient hooks (DeepSpeed's ZeRO reduction) must
    not fire for it.
    """
    ids = {id(p) for p in parameters}
    found: set[int] = set()
    seen: set = set()
    stack = [o.grad_fn for o in outputs if o.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad: a leaf
        if variable is not None and id(variable) in ids:
            found.add(id(variable))
        stack.extend(next_node for next_node, _ in node.next_functions if next_node is not None)
    return [p for p in parameters if id(p) in found]


def parameter_gradients_only(run, parameters) -> tuple[torch.Tensor, ...]:
    """``run()`` (a tuple of tensors), whose backward differentiates with respect to ``parameters`` only.

    The trainer's ``loss.backward()`` runs every node that leads to a leaf requiring a gradient; with
    conservative forces that includes the model's private copy of the positions, so the whole
    position-only side of the double backward was computed for nothing (the built-in ops too). Here
    the outputs of ``run`` are handed on through a Function whose backward is
    ``torch.autograd.grad(outputs, parameters)`` over the parameters their graph reaches
    (:func:`reached_parameters`): with its inputs named, autograd runs only the nodes that lead to a
    parameter and computes no gradient that only a position would receive. The parameter gradients go
    on to the parameters' own accumulators (and the engines' hooks on them) as before. Exact: the same
    gradients, bit for bit (``tests/zoo/test_parameter_gradients.py``).

    ``run()`` itself where no parameter requires a gradient, gradients are off, or ops are recorded
    (FLOP counters and tracers see the plain graph). A second ``backward`` through the result fails as
    any backward through a freed graph does; a ``create_graph`` backward (gradients of gradients) builds
    its graph through the inner one.

    >>> w = torch.tensor(3.0, requires_grad=True)
    >>> x = torch.tensor(2.0, requires_grad=True)  # a leaf the caller does not want
    >>> (y,) = parameter_gradients_only(lambda: (w * x * x,), [w])
    >>> y.backward()
    >>> w.grad.item(), x.grad
    (4.0, None)
    """
    parameters = [p for p in parameters if p.requires_grad]
    if not parameters or not torch.is_grad_enabled() or ops_recorded():
        return run()
    outputs = tuple(run())
    reached = reached_parameters(outputs, parameters)
    if not reached:
        return outputs
    return _ParameterGradients.apply(outputs, *reached)
