"""glibc's malloc told to keep freed memory, so that CPU training steps stop page-faulting (issue 12).

On the CPU, PyTorch takes every tensor from ``malloc`` and gives it back with ``free``; it keeps no
cache of its own. A training step builds its activations (the heap grows through the forward) and
frees them all at the end of the backward. glibc's defaults then hand the memory back to the kernel:
blocks over the *mmap threshold* are ``munmap``-ed on free, and a free top of the heap over the *trim
threshold* is returned with ``sbrk``. (Both thresholds move with the sizes freed, to at most 32 MiB
and 64 MiB.) The next step asks the kernel again, and the first write to every 4 KiB page of a
new tensor costs a page fault and the kernel's zeroing of the page.

Measured with ``benchmarks/bench_vs_fairchem.py`` (its C = 64, lmax 2 model: 1.6 M parameters,
105 atoms, 1,632 edges, one thread; its ``Ours.step`` timed with ``resource.getrusage``):
20,000-45,000 minor page faults and 25-90 ms of system time per training step with glibc's
defaults; 0-10 faults and ≈ 0 ms with the settings below. The per-edge products ``[1632, 9, 9] @
[1632, 9, 128]`` took 1.9 or 4.7 ms by whether their output landed on fresh pages. CPU time of a
training step, alternating fresh processes with and without these settings (medians of 7 steps, then
the median over the pairs): direct forces 238 → 199 ms (3 pairs, load 2.0-2.5), conservative forces
624 → 600 ms (5 pairs, load 2.0-2.5) and 721 → 594 ms (2 pairs, load 0.6-0.8). The whole
``bench_vs_fairchem.py`` run with them in both processes (load 2.7-3.1): every row 1.41-1.88× the
reference model's speed (before: 1.31-1.85, load ≈ 1); its conservative C = 64 lmax 2 training row
gains least (1.41-1.47, against 1.41-1.46 before on a quiet machine): there the direct rows have run in the same process
before, and glibc's thresholds, raised by the sizes they freed, already spared it most faults.

:func:`keep_freed_memory` sets, with ``mallopt``, an mmap threshold of 256 MiB (blocks up to that
come from the heap) and a trim threshold of 1 GiB (a free top of the heap up to that stays). The
process then holds the peak of its heap between steps instead of returning it; the peak itself is
unchanged (measured ``ru_maxrss`` over 8 conservative steps at C = 64: 1,008-1,019 MiB with the
defaults, 1,002-1,015 MiB with these settings). Numerics are untouched: only where memory comes from.

It steps aside where the user chose: any of ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``,
``MALLOC_TOP_PAD_`` or a ``glibc.malloc`` tunable in ``GLIBC_TUNABLES`` in the environment (e.g.
``benchmarks/bench_plan.py``, which mmaps every block over 64 KiB to measure live memory; a tunable
that changes nothing, ``GLIBC_TUNABLES=glibc.malloc.perturb=0``, keeps glibc's defaults), and off
glibc (musl, macOS, Windows).
"""

from __future__ import annotations

import ctypes
import os

#: ``mallopt`` parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
#: bytes: blocks up to this size come from the heap, not from a fresh mmap
MMAP_THRESHOLD = 256 << 20
#: bytes: a free top of the heap up to this size is kept, not returned to the kernel
TRIM_THRESHOLD = 1 << 30
#: environment variables through which a user (or a child's parent) sets glibc's malloc
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def _user_chose(environ) -> bool:
    return any(name in environ for name in USER_SETTINGS) or "glibc.malloc" in environ.get("GLIBC_TUNABLES", "")


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (AttributeError, ValueError, OSError):  # not glibc, or no confstr
        return False


def keep_freed_memory(environ=None) -> dict[str, str]:
    """Set glibc's malloc to keep freed memory for the next step (see the module docstring).

    Parameters
    ----------
    environ : mapping, default ``os.environ``
        The environment whose ``MALLOC_*`` / ``GLIBC_TUNABLES`` settings take precedence.

    Returns
    -------
    dict
        The environment variables that give a child process the same settings (glibc reads them at
        start-up): ``{"MALLOC_MMAP_THRESHOLD_": "268435456", "MALLOC_TRIM_THRESHOLD_": "1073741824"}``
        when applied; ``{}`` where it stepped aside (the user's settings, inherited through the
        environment, are then what a child gets) or where ``mallopt`` refused a value.

    Idempotent; never raises (a C library without ``mallopt`` leaves the process as it was).
    """
    environ = os.environ if environ is None else environ
    if _user_chose(environ) or not _glibc():
        return {}
    try:
        libc = ctypes.CDLL(None)
        applied = (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                   and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
    except (OSError, AttributeError):
        return {}
    if not applied:
        return {}
    return {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}


def return_freed_memory() -> bool:
    """Hand the heap's free memory back to the kernel now (glibc's ``malloc_trim(0)``).

    The opposite of :func:`keep_freed_memory`, for a process that moves on to unrelated work
    (the test suite between tests, ``tests/freed_heap.py``). Returns whether it ran: ``False`` off
    glibc or where ``malloc_trim`` is missing. Values of live tensors are untouched.
    """
    if not _glibc():
        return False
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True
