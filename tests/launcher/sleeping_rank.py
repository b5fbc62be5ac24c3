"""A rank that hangs (run by tests/launcher/test_processes.py under torchrun).

Leaves its own session (as launchers start ranks), writes ``<dir>/rank-<RANK>.pid`` and sleeps.
"""

import os
import sys
import time
from pathlib import Path

try:
    os.setsid()
except PermissionError:  # already a session leader (the launcher started it that way)
    pass
Path(sys.argv[1], f"rank-{os.environ['RANK']}.pid").write_text(str(os.getpid()))
time.sleep(600)
