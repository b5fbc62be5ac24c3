"""The errors that end a run with a message rather than a traceback (each says what to do next)."""

from __future__ import annotations

from launcher.checkpoint import CheckpointError
from launcher.engine import RankLost
from launcher.health import RunStopped
from launcher.runlock import RunDirectoryLocked

#: caught by ``launcher/train.py`` and printed as one ``error: ...`` line (exit status 1)
STOPS = (RunStopped, RankLost, CheckpointError, RunDirectoryLocked)
