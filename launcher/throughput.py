"""Throughput, achieved FLOP/s, MFU and the measured κ of a training run (issue 5).

All counts are global (summed over ranks); times are the rank-0 wall time spent in training steps
(data loading + forward + backward + optimizer step; validation and checkpoint writing excluded).

- ``atoms_per_s`` / ``structures_per_s`` — the training data's atoms and structures (the *original*
  batch: with ``--symmetry-loss M`` the rotated copies are not counted, as they are not new data);
- ``flops_per_s`` — step FLOPs (:class:`zoo.flops.counter.StepFlopCounter`, FMA = 2; forward, loss
  and backward of every model evaluation, so ``× (M + 1)`` with the symmetry loss) per second;
- ``mfu`` — ``flops_per_s`` over the peak of all devices of the job: ``world_size`` × the per-device
  peak of :func:`zoo.flops.peaks.peak_flops` (a datasheet figure for known GPUs, a *measured* fp32
  matmul rate for a CPU — ``peak_source`` says which; measured on rank 0 with its thread count and
  assumed equal on every rank);
- ``kappa`` — measured κ = forward FLOPs / (atoms through the model × N), summed over the run
  (arXiv 2510.09768's κ, the constant of C ≈ 3κ·N·D).
"""

from __future__ import annotations

import math

import torch

from launcher.engine import broadcast_object


def device_peak(device: torch.device, bf16: bool, world_size: int, is_main: bool) -> tuple[float, str]:
    """(peak FLOP/s of the whole job, where the figure comes from); rank 0 decides, all ranks get it."""
    answer = None
    if is_main:
        from zoo.flops.peaks import peak_flops

        peak, source = peak_flops(device, torch.bfloat16 if bf16 else torch.float32)
        answer = (peak * world_size, f"{world_size} × {peak:.4g} FLOP/s per device ({source})")
    return broadcast_object(answer)


def rates(seconds: float, atoms: float, structures: float, flops: float | None, peak: float) -> dict:
    """``{atoms_per_s, structures_per_s, flops_per_s, mfu}`` for a span of ``seconds``.

    ``peak`` is the devices' dense peak FLOP/s (:mod:`zoo.flops.peaks`); ``mfu`` is ``None`` without
    a FLOP count or a peak.

    >>> rates(2.0, atoms=1000, structures=40, flops=4e12, peak=1e13)
    {'atoms_per_s': 500.0, 'structures_per_s': 20.0, 'flops_per_s': 2000000000000.0, 'mfu': 0.2}
    """
    seconds = max(seconds, 1e-9)
    flops_per_s = None if flops is None else flops / seconds
    return {
        "atoms_per_s": atoms / seconds,
        "structures_per_s": structures / seconds,
        "flops_per_s": flops_per_s,
        "mfu": None if flops_per_s is None or not peak > 0 else flops_per_s / peak,
    }


def run_summary(state, peak: float, peak_source: str, n_params: int, counter) -> dict:
    """The ``throughput`` block of a checkpoint's metadata, over the run so far (resumes included).

    ``state`` is the :class:`launcher.checkpoint.TrainState`; ``counter`` the step FLOP counter
    (or None). ``counting_overhead`` is rank 0's share of wall time spent counting FLOPs since
    this process started counting; ``count_max_fit_error`` the largest relative error of the
    counter's linear fit on a later exact count (None before one).
    """
    summary = rates(state.train_time_s, state.atoms_seen, state.samples_seen, state.flops, peak)
    kappa = None
    if state.forward_flops is not None and state.model_atoms > 0 and n_params > 0:
        kappa = state.forward_flops / (state.model_atoms * n_params)
    summary.update(
        train_time_s=state.train_time_s,
        pflops=None if state.flops is None else state.flops / 1e15,
        peak_flops=peak,
        peak_source=peak_source,
        kappa=kappa,
        kappa_note="forward FLOPs / (atoms through the model x N), summed over the run",
        counting_overhead=None if counter is None else counter.overhead(),
        count_exact=None if counter is None else counter.exact_counts,
        count_max_fit_error=None if counter is None or math.isnan(counter.max_fit_error) else counter.max_fit_error,
    )
    return summary
