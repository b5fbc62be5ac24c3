"""Processes, devices and the DeepSpeed engine: everything distributed lives here.

The model code is for one device (``zoo``); this module wraps it, as torchtitan's
``parallelize.py`` does. Three ways to start the same job:

- ``deepspeed [--num_gpus K] launcher/train.py ...`` (sets RANK, LOCAL_RANK, WORLD_SIZE, …);
- ``torchrun --nproc_per_node K launcher/train.py ...``;
- ``python launcher/train.py ...`` — one process; :func:`setup_environment` fills in the
  variables torch.distributed needs (rank 0 of 1, a free local port).

Without CUDA, ``DS_ACCELERATOR=cpu`` is set before DeepSpeed is imported (the CPU accelerator
then uses gloo), and when several ranks share the CPU each gets ``cores / local ranks`` intra-op
threads unless ``OMP_NUM_THREADS`` was given (docs/FEASIBILITY.md: 2 ranks on 2 cores, 104 ms → 31 ms
per step with one thread each).
"""

from __future__ import annotations

import os
import sys
import socket
import warnings
from dataclasses import dataclass

import torch

from launcher.config import TrainConfig, deepspeed_config


@dataclass
class Runtime:
    """Where this process runs: ``rank`` of ``world_size``, ``local_rank``, ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    bf16_supported: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_environment() -> None:
    """Prepare the process before DeepSpeed is imported (idempotent).

    Sets ``DS_ACCELERATOR=cpu`` when CUDA is absent, the rendezvous variables of a one-process
    run, the intra-op thread count of CPU ranks that share a machine, and (unless set) a
    ``TORCH_EXTENSIONS_DIR`` inside the Python environment: DeepSpeed JIT-builds an op on first use,
    and environments sharing torch's default ``~/.cache/torch_extensions`` rebuild it in turn
    (their include paths differ) and wait on each other's build lock.
    """
    # DeepSpeed's gather helpers call a torch.distributed function deprecated in torch 2.13
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:  # plain `python train.py`
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // max(1, local))
        user = os.environ.get("OMP_NUM_THREADS")
        # torchrun and the deepspeed launcher export OMP_NUM_THREADS themselves; honour an explicit
        # smaller value, never oversubscribe.
        torch.set_num_threads(min(threads, int(user)) if user and user.isdigit() else threads)


def init_distributed() -> Runtime:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, NCCL on CUDA)."""
    setup_environment()
    import deepspeed

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    bf16 = bool(cuda and torch.cuda.is_bf16_supported())
    return Runtime(rank, world, local_rank, device, bf16)


def build_engine(cfg: TrainConfig, model: torch.nn.Module, optimizer, runtime: Runtime):
    """Wrap ``model`` and its schedule-free ``optimizer`` in a DeepSpeed engine.

    Returns
    -------
    engine : ``deepspeed.DeepSpeedEngine``; ``ds_config`` : the JSON it was built from.
    """
    import deepspeed

    ds_config = deepspeed_config(cfg, runtime.bf16_supported)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                           model_parameters=None)
    return engine, ds_config


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a list of floats over ranks (float64)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def broadcast_object(value, src: int = 0):
    """Send a picklable Python object from ``src`` to every rank (in-memory, trusted peers)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]
