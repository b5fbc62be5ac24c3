"""What the launcher tests share: the small labelled data set they train on (written by
:func:`write_split`, converted once by the ``data`` fixture of ``conftest.py``), and :func:`run`, which
starts a job and kills all it started. A module of its own (not ``conftest``), so that
``from jobs import run`` finds it whichever rooms pytest collects together.

Structures are compact random H/C/N/O clusters labelled by ASE's EMT potential (fast, real
energies and forces); charge and spin go in ``row.data`` as OMol25 stores them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import ase.db
import numpy as np
from ase import Atoms
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from processes import TaggedProcess

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def cluster(rng: np.random.Generator, n_atoms: int) -> Atoms:
    """Random H/C/N/O cluster, atoms 1.0-1.5 Å from a previous one and > 0.9 Å from all, EMT labels."""
    points = [np.zeros(3)]
    while len(points) < n_atoms:
        step = rng.normal(size=3)
        candidate = points[rng.integers(len(points))] + rng.uniform(1.0, 1.5) * step / np.linalg.norm(step)
        if min(np.linalg.norm(candidate - p) for p in points) > 0.9:
            points.append(candidate)
    atoms = Atoms(numbers=rng.choice([1, 6, 7, 8], size=n_atoms), positions=np.array(points))
    atoms.calc = EMT()
    atoms.calc = SinglePointCalculator(atoms, energy=atoms.get_potential_energy(), forces=atoms.get_forces())
    return atoms


def write_split(path: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    db = ase.db.connect(os.fspath(path), type="aselmdb")
    try:
        for _ in range(n):
            atoms = cluster(rng, int(rng.integers(4, 16)))
            spin = 1 + int(atoms.numbers.sum()) % 2  # singlet or doublet, as the electron count demands
            db.write(atoms, data={"charge": 0, "spin": spin, "source": "emt"})
    finally:
        db.close()


#: DeepSpeed's ops are built per virtual environment: the build command names the venv's include
#: paths, so clones sharing ``~/.cache/torch_extensions`` would rebuild over each other's build
#: (and wait on each other's lock). A ``TORCH_EXTENSIONS_DIR`` set by the user is kept. The
#: launcher builds none (it marks DeepSpeed's CPU shared-memory op, the one its communication
#: backend would build, unavailable: :func:`launcher.engine.init_distributed`), so no test waits on a
#: build; test_engines.py checks that its DeepSpeed launch (ZeRO-1/2/3, offload) leaves an empty extensions folder.
if sys.prefix != sys.base_prefix:
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


def run(args: list[str], timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command from the repository root with one intra-op thread per process.

    The command and every process it starts carry a tag of their own
    (:class:`processes.TaggedProcess`): on timeout, on any exception while waiting, and after it
    returns, all of them — launcher and ranks, whatever session they are in — are killed at once.
    """
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    with TaggedProcess(args, cwd=REPO, env=full_env) as job:
        return job.wait(timeout)


#: a tiny model for launcher tests: the MPNN at width 8 with one layer (the loop is model-agnostic)
TINY = ["--model", "mpnn", "--width", "8", "--model-arg", "num_layers=1"]


def tiny_job(train, val, run_dir, *extra) -> list[str]:
    """The command of a short one-process run of :data:`TINY` over every structure of ``train``.

    100 atoms per step (10 steps on the ``data`` fixture's train split), a checkpoint every quarter of
    the run, a log record every step, validation on the whole ``val`` split; ``extra`` flags are
    appended. The run of the ``tiny_run`` fixture (conftest.py), and of the fault and resume tests.
    """
    return [PYTHON, "launcher/train.py", *TINY, "--train", str(train), "--val", str(val), "--atoms-per-batch", "100",
            "--checkpoint-fraction", "0.25", "--run-dir", str(run_dir), "--log-every", "1", "--max-atoms", "all",
            "--max-val-structures", "all", *extra]


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])
