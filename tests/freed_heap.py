"""The heap a test freed goes back to the kernel before the next test starts.

PyTorch takes CPU tensors from glibc's ``malloc``. When a test frees them, glibc keeps much of the
memory in the process (the free top of the heap up to its trim threshold, free chunks below live
ones; its thresholds grow with the sizes freed), so the pytest process stayed near the peak of the
largest test so far: 2.5 GB resident through the last third of the suite at e4500f1, after
``test_cases.py``'s C04 on GemNet-OC (1.9 GB resident after it alone; ``malloc_trim`` brings that to
0.6 GB). ``malloc_trim(0)`` after each test hands the free memory back, so the process holds what is
live (0.65-1.3 GB through the suite) and a job beside the suite has the rest. It does not lower the
suite's peak much (3.92 -> 3.76 GB): glibc reused the kept memory for the next large test, and that
peak is ``test_gemnet_oc.py::test_large_next_to_small[conservative]``'s own 2.6 GB (3.0 GB in a
fresh process) over the live 1.1 GB. Nothing a test computes changes: only where its memory comes from.

Loaded by ``tests/conftest.py``; :func:`launcher.heap.return_freed_memory` (glibc only, a no-op elsewhere).
"""

from __future__ import annotations

from launcher.heap import return_freed_memory


def pytest_runtest_logfinish(nodeid, location) -> None:
    """After each test (its teardown included): give the heap's free memory back to the kernel."""
    return_freed_memory()
