"""FLOP counting of training steps, κ and MFU.

:mod:`~zoo.flops.trace` (one exact count of a step: fvcore trace, forward and derived backward),
:mod:`~zoo.flops.handles` (the cost of every operator), :mod:`~zoo.flops.counter` (the per-step
counter a training run uses: exact counts, then a fit re-checked within a time budget),
:mod:`~zoo.flops.peaks` (device peaks for MFU), :mod:`~zoo.flops.report` (``zoo flops``).
"""
