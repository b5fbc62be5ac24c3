"""Throughput, achieved FLOP/s, MFU and the measured κ of a training run (issue 5).

All counts are global (summed over ranks); times are the rank-0 wall time spent in training steps
(data loading + forward + backward + optimizer step; validation and checkpoint writing excluded).

- ``atoms_per_s`` / ``structures_per_s`` — the training data's atoms and structures (the *original*
  batch: with ``--symmetry-loss M`` the rotated copies are not counted, as they are not new data);
- ``flops_per_s`` — step FLOPs (:class:`zoo.flops.counter.StepFlopCounter`, FMA = 2; forward, loss
  and backward of every model evaluation, so ``× (M + 1)`` with the symmetry loss) per second;
- ``mfu`` — on GPUs ``flops_per_s`` over the peak of all devices of the job: ``world_size`` × the
  datasheet peak of :func:`zoo.flops.peaks.peak_flops`; on CPUs the FLOPs over the CPU time of the
  training processes (rank 0's process CPU time × ``world_size``) times the matmul FLOP per
  CPU-second measured at start-up — a busy machine slows both alike, so its load cannot push MFU
  above 100 % (``peak_source`` says which; ``cpu_time_s`` is the CPU time used);
- ``kappa`` — measured κ = forward FLOPs / (atoms through the model × N), summed over the run
  (arXiv 2510.09768's κ, the constant of C ≈ 3κ·N·D).
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import time
from pathlib import Path

import torch

from launcher.config import REPO
from launcher.engine import broadcast_object


def device_peak(device: torch.device, bf16: bool, world_size: int, is_main: bool) -> tuple[float, str, bool]:
    """(peak, where the figure comes from, per CPU-second); rank 0 decides, all ranks get it.

    On a GPU the peak FLOP/s of the whole job (``world_size`` devices); on a CPU the FLOP per
    CPU-second of one core (MFU then divides by the ranks' CPU time, see the module docstring).
    """
    answer = None
    if is_main:
        from zoo.flops.peaks import peak_flops

        if device.type == "cpu":
            peak, source = cached_cpu_peak(lambda: peak_flops(device, torch.float32))
        else:
            peak, source = peak_flops(device, torch.bfloat16 if bf16 else torch.float32)
        if device.type == "cpu":
            answer = (peak, f"{peak:.4g} FLOP per CPU-second ({source}); MFU = training FLOPs / (CPU seconds of "
                            "the ranks × that), which other load on the machine cannot push up", True)
        else:
            answer = (peak * world_size, f"{world_size} × {peak:.4g} FLOP/s per device ({source})", False)
    return broadcast_object(answer)


def cpu_identity() -> str:
    """What a CPU's matmul rate per CPU-second depends on: host, CPU model, torch version, threads,
    and whether oneDNN takes part (``--cpu-matmul``; :func:`zoo.flops.peaks.measure_peak`)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{socket.gethostname()} | {model} | {os.cpu_count()} cpus | torch {torch.__version__} | " \
           f"{torch.get_num_threads()} thread(s) | matmul {'blas+onednn' if torch.backends.mkldnn.enabled else 'blas'}"


def cached_cpu_peak(measure, path: Path | None = None) -> tuple[float, str]:
    """``measure()`` (a CPU's fp32 matmul FLOP per CPU-second and its source), once per machine.

    The rate is measured per CPU-second (:func:`zoo.flops.peaks.measure_peak`: best of a few 2048²
    matmuls, ≈1-3 CPU-seconds), so other load does not change it; every later start on the same
    host, CPU model, torch version and thread count (:func:`cpu_identity`) reads it from ``path``
    (default ``$SYMSCALE_CACHE/cpu_peaks.json``, else ``<repository>/.cache/cpu_peaks.json``) and its
    source says so. Delete the file to measure again. An unreadable or unwritable cache is measured
    around, never an error.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "cpu_peaks.json"
    >>> cached_cpu_peak(lambda: (2.0e10, "measured: a matmul"), path)
    (20000000000.0, 'measured: a matmul')
    >>> cached_cpu_peak(lambda: (1.0, "not called"), path)[0]
    20000000000.0
    """
    from launcher.data import CACHE_ENV

    path = Path(path or Path(os.environ.get(CACHE_ENV) or REPO / ".cache") / "cpu_peaks.json")
    key, table = cpu_identity(), {}
    try:
        table = json.loads(path.read_text())
        entry = table[key]
        return float(entry["peak"]), f"{entry['source']} (cached in {path}, {entry['when']})"
    except (OSError, ValueError, KeyError, TypeError):
        table = table if isinstance(table, dict) else {}
    peak, source = measure()
    table[key] = {"peak": peak, "source": source, "when": time.strftime("%Y-%m-%d %H:%M")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        scratch.write_text(json.dumps(table, indent=1) + "\n")
        os.replace(scratch, path)
    except OSError:
        pass
    return peak, source


def rates(seconds: float, atoms: float, structures: float, flops: float | None, peak: float,
          cpu_seconds: float | None = None) -> dict:
    """``{atoms_per_s, structures_per_s, flops_per_s, mfu}`` for a span of ``seconds``.

    With ``cpu_seconds`` (the job's CPU time over the span) ``peak`` is FLOP per CPU-second and
    MFU is ``flops / (cpu_seconds × peak)``; without, ``peak`` is FLOP/s and MFU is
    ``flops_per_s / peak``.

    >>> rates(2.0, atoms=1000, structures=40, flops=4e12, peak=1e13)
    {'atoms_per_s': 500.0, 'structures_per_s': 20.0, 'flops_per_s': 2000000000000.0, 'mfu': 0.2}
    """
    seconds = max(seconds, 1e-9)
    flops_per_s = None if flops is None else flops / seconds
    if flops is None or not peak > 0:
        mfu = None
    elif cpu_seconds is not None:
        mfu = flops / (max(cpu_seconds, 1e-9) * peak)
    else:
        mfu = flops_per_s / peak
    return {
        "atoms_per_s": atoms / seconds,
        "structures_per_s": structures / seconds,
        "flops_per_s": flops_per_s,
        "mfu": mfu,
    }


def run_summary(state, peak: float, peak_source: str, n_params: int, counter, cpu_time: bool = False) -> dict:
    """The ``throughput`` block of a checkpoint's metadata, over the run so far (resumes included).

    ``state`` is the :class:`launcher.checkpoint.TrainState`; ``counter`` the step FLOP counter
    (or None); ``cpu_time``: ``peak`` is per CPU-second (``state.train_cpu_time_s`` is the job's
    CPU time in training steps). ``counting_overhead`` is rank 0's share of wall time spent counting FLOPs since
    this process started counting; ``count_max_fit_error`` the largest relative error of the
    counter's linear fit on a later exact count (None before one).
    """
    cpu_seconds = state.train_cpu_time_s if cpu_time else None
    summary = rates(state.train_time_s, state.atoms_seen, state.samples_seen, state.flops, peak, cpu_seconds)
    kappa = None
    if state.forward_flops is not None and state.model_atoms > 0 and n_params > 0:
        kappa = state.forward_flops / (state.model_atoms * n_params)
    summary.update(
        train_time_s=state.train_time_s,
        cpu_time_s=cpu_seconds,
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
