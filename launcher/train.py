"""Train a zoo model: the entry point of the main job.

Examples
--------
The paper's recipe on the embedded data (``data/omol25_sample``), ZeRO-2; ``NAME`` is any key of
:data:`zoo.registry.MODELS` (``zoo params`` lists them)::

    deepspeed launcher/train.py --model NAME --width 64                 # all local GPUs / 1 CPU rank
    deepspeed --num_gpus 2 launcher/train.py --model NAME --width 64    # 2 ranks (CPU: 2 processes)
    torchrun --nproc_per_node 2 launcher/train.py --model NAME --width 64
    python launcher/train.py --model NAME --width 64                    # one process
    python launcher/train.py --resume runs/NAME-w64-20261129-101500      # continue after a crash
    torchrun --nproc_per_node 4 launcher/train.py --resume runs/NAME-w64-…  # on another number of ranks

Across nodes (torchrun c10d, the DeepSpeed launcher with a hostfile, SLURM): docs/multinode.md.

Every flag: ``python launcher/train.py --help``. What happens: :mod:`launcher.loop`. A mistake
in a flag, path or the data ends the job with one line from rank 0 and exit status 2
(:mod:`launcher.errors`; ``--debug`` shows the traceback).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launcher.config import parse
from launcher.engine import setup_environment
from launcher.errors import is_rank0, run


def main(argv: list[str] | None = None) -> dict:
    """Parse the command line and run the job; returns the final validation metrics."""
    cfg = parse(argv)
    if is_rank0():
        what = f"resuming {cfg.resume}" if cfg.resume else f"{cfg.model} width {cfg.width or 'default'}"
        print(f"starting: {what}; loading PyTorch and DeepSpeed …", flush=True)
    setup_environment()  # before DeepSpeed is imported: DS_ACCELERATOR, rendezvous, threads
    from launcher.loop import train
    from launcher.stops import STOPS

    try:
        return train(cfg)
    except STOPS as error:  # a fault every rank met: its message says what happened and what to do
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    sys.exit(run(main))
