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
per step with one thread each), and glibc's malloc keeps freed memory between steps
(:mod:`launcher.heap`: a 1.6 M-parameter model's CPU step 4-16 % faster, without 20,000-45,000 page faults).

What DeepSpeed and PyTorch print on a CPU machine, and what this module does about it:

- their deprecation warnings (``FutureWarning``/``DeprecationWarning`` raised inside ``deepspeed``
  and ``torch``) are hidden: they concern their own internals, not the user's code;
- DeepSpeed's warning "You are using ZeRO with an untested optimizer" is dropped (``--debug``
  keeps it): the launcher chooses schedule-free AdamW on purpose (``zero_allow_untested_optimizer``);
- on CPU, DeepSpeed would compile its shared-memory communication op with ninja at start-up
  (minutes on a busy machine, printing "deepspeed_shm_comm_op built successfully", and every other
  install of DeepSpeed on the machine rebuilds it in the same cache and holds its lock). That op
  serves only ``inference_all_reduce``, which training never calls (ZeRO reduces through
  torch.distributed/gloo), so :func:`init_distributed` marks it unavailable and it is not built.
  Any other op DeepSpeed builds goes to the project's own ``.cache/torch_extensions``
  (``TORCH_EXTENSIONS_DIR``, unless set);
- the ``deepspeed`` launcher's own lines ("Setting CUDA_VISIBLE_DEVICES", "ignoring it because one
  or several of --include/--exclude/--num_gpus…") are printed before this code runs; they are
  harmless on CPU (ranks use the CPU accelerator and gloo) — the README says so once.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import socket
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from launcher.config import TrainConfig
from launcher.dsconfig import deepspeed_config
from launcher.heap import keep_freed_memory


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
    run, the intra-op thread count of CPU ranks that share a machine, glibc's malloc settings of
    CPU training (:func:`launcher.heap.keep_freed_memory`, unless the user set them), and (unless set) a
    ``TORCH_EXTENSIONS_DIR`` of the project's own (``.cache/torch_extensions``): DeepSpeed JIT-builds an op on first use,
    and environments sharing torch's default ``~/.cache/torch_extensions`` rebuild it in turn
    (their include paths differ) and wait on each other's build lock.
    """
    # DeepSpeed's gather helpers call a torch.distributed function deprecated in torch 2.13
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    if "--debug" not in sys.argv:
        for module in ("deepspeed", "torch"):
            for category in (FutureWarning, DeprecationWarning, UserWarning):
                warnings.filterwarnings("ignore", category=category, module=module)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    if os.environ.get("WORLD_SIZE", "1") == "1" and not agent_store:  # `python train.py`, or deepspeed with 1 rank
        # A one-process job meets nobody: a fresh local port every time, never one inherited from a
        # parent's environment (a stale MASTER_PORT made concurrent one-process jobs collide).
        # Not under torchrun: its agent hosts the store at MASTER_PORT (`torchrun --nproc_per_node 1`
        # waited 30 min for a store on the fresh port).
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    if not torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // max(1, local))
        user = os.environ.get("OMP_NUM_THREADS")
        # torchrun and the deepspeed launcher export OMP_NUM_THREADS themselves; honour an explicit
        # smaller value, never oversubscribe.
        torch.set_num_threads(min(threads, int(user)) if user and user.isdigit() else threads)
        keep_freed_memory()  # no page faults on every step's fresh activations (launcher.heap)


def init_distributed(timeout_s: float = 1800.0, engine: str = "deepspeed") -> Runtime:
    """Initialise torch.distributed (gloo on CPU, NCCL on CUDA): through DeepSpeed for its engine,
    directly for ``engine="fsdp"`` (which then never imports DeepSpeed).

    Every rank first checks in at the job's rendezvous store (:func:`rendezvous`), so that a rank
    that never starts is named after ``timeout_s`` instead of leaving the others waiting; the
    process group then uses the same store and ``timeout_s`` for every collective.

    Raises
    ------
    RankLost
        naming the ranks that did not join within ``timeout_s`` (or the unreachable store host).
    """
    setup_environment()
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    # FSDP2 on CUDA also talks about host tensors (CPU-offloaded shards gathered for the schedule-free
    # average, sharded state loaded from rank 0): gloo serves those, NCCL the device tensors
    backend = ("cpu:gloo,cuda:nccl" if engine == "fsdp" else "nccl") if cuda else "gloo"
    timeout = timedelta(seconds=timeout_s)
    if not torch.distributed.is_initialized():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        store = rendezvous(rank, world, timeout_s)
        torch.distributed.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    if engine != "fsdp":
        import deepspeed
        import deepspeed.ops

        if "--debug" not in sys.argv:
            logging.getLogger("DeepSpeed").addFilter(lambda record: "untested optimizer" not in record.getMessage())
        if not cuda:
            # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce for inference at
            # start-up (minutes on a busy host, and a lock in ~/.cache shared by every virtual
            # environment); training uses gloo's collectives and never calls it.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timeout)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    bf16 = bool(cuda and torch.cuda.is_bf16_supported())
    return Runtime(rank, world, local_rank, device, bf16)


class RankLost(RuntimeError):
    """A rank died, hangs or never joined; the message names it and says what to do."""


#: the job's rendezvous store (a PrefixStore), set by :func:`rendezvous`
_STORE = None


def rendezvous(rank: int, world: int, timeout_s: float):
    """Check in at the job's key-value store (``MASTER_ADDR:MASTER_PORT``) and wait for every rank.

    Rank 0 hosts the store, unless torchrun's agent already does (``TORCHELASTIC_USE_AGENT_STORE``).
    Each rank sets ``joined/<rank>``; all wait up to ``timeout_s`` for the others' keys. The
    store (prefixed per torchrun restart) is returned for ``init_process_group``.

    Raises
    ------
    RankLost
        naming the ranks missing after ``timeout_s``, or the store host if it cannot be reached.
    """
    global _STORE
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    timeout = timedelta(seconds=timeout_s)
    try:
        base = torch.distributed.TCPStore(host, port, world, is_master=rank == 0 and not agent, timeout=timeout,
                                          wait_for_workers=False)
    except (RuntimeError, OSError) as error:
        raise RankLost(f"rank {rank}: could not reach the job's rendezvous at {host}:{port} within {timeout_s:.0f} s "
                       f"(rank 0 hosts it: did rank 0 start, and is {host}:{port} reachable from this host?) "
                       f"[{type(error).__name__}: {error}]") from None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = torch.distributed.PrefixStore(f"symscale/{attempt}/", base)
    store.set(f"joined/{rank}", socket.gethostname())
    keys = [f"joined/{r}" for r in range(world)]
    try:
        store.wait(keys, timeout)
    except (RuntimeError, OSError):
        missing = [r for r in range(world) if not store.check([f"joined/{r}"])]
        raise RankLost(f"rank {rank}: rank(s) {missing} of {world} did not join within {timeout_s:.0f} s "
                       f"(--dist-timeout){_nodes_of(missing, world)}; start them (same MASTER_ADDR/MASTER_PORT, "
                       f"WORLD_SIZE {world}) or start the job again with the ranks you have") from None
    _STORE = store
    return store


def _nodes_of(ranks: list[int], world: int) -> str:
    """`` (node(s) [k] of n, …)``: where ``ranks`` run when every node runs the same number of ranks,
    in rank order (torchrun's LOCAL_WORLD_SIZE, the deepspeed launcher's LOCAL_SIZE, SLURM's
    SLURM_NTASKS_PER_NODE); '' for one node or an unknown layout.

    >>> os.environ["LOCAL_WORLD_SIZE"] = "2"; _nodes_of([5], 8)[:24]; del os.environ["LOCAL_WORLD_SIZE"]
    ' (node(s) [2] of 4, at 2'
    """
    known = [os.environ.get(k, "") for k in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE")]
    local = next((int(v) for v in known if v.isdigit()), world)
    if local <= 0 or local >= world or world % local:
        return ""
    nodes = sorted({r // local for r in ranks})
    return (f" (node(s) {nodes} of {world // local}, at {local} rank(s) per node: never started or cannot reach "
            "the store)")


def report_stop(rank: int, message: str) -> None:
    """Best effort: leave this rank's reason for stopping in the rendezvous store for the others."""
    if _STORE is not None:
        try:
            _STORE.set(f"stopped/{rank}", message[:2000])
        except Exception:  # noqa: BLE001 - the store host may be the rank that died
            pass


def lost_ranks(rank: int, world: int, grace_s: float = 3.0) -> str:
    """After a failed collective: which ranks stopped and why, from the store.

    Every surviving rank reports itself (:func:`report_stop`) before asking; after ``grace_s`` a
    rank that left no word is the one that died (killed, out of memory, host lost).
    """
    if _STORE is None:
        return "the rendezvous store is not available"
    deadline = time.time() + grace_s
    try:
        while True:
            said = {r: _STORE.get(f"stopped/{r}").decode() for r in range(world) if _STORE.check([f"stopped/{r}"])}
            silent = [r for r in range(world) if r not in said]
            if not silent or time.time() > deadline:
                break
            time.sleep(0.2)
    except Exception:  # noqa: BLE001 - the store lives in rank 0's process
        return "rank 0 (which hosts the job's rendezvous store) is gone: it died or its host is unreachable"
    parts = [f"rank {r} stopped without a word (killed, out of memory, or its host was lost; see its log)"
             for r in silent]
    parts += [f"rank {r}: {text}" for r, text in sorted(said.items()) if r != rank and "collective failed" not in text]
    return "; ".join(parts) or "every other rank reports a failed collective"


def build_engine(cfg: TrainConfig, model: torch.nn.Module, optimizer, runtime: Runtime):
    """Wrap ``model`` and its schedule-free ``optimizer`` in a DeepSpeed engine.

    Returns
    -------
    engine : ``deepspeed.DeepSpeedEngine``; ``ds_config`` : the JSON it was built from.
    """
    import deepspeed

    from zoo.plan.memory import BUCKET_ELEMENTS

    ds_config = deepspeed_config(cfg, runtime.bf16_supported)
    zero = ds_config["zero_optimization"]
    if zero["stage"] == 3 and "reduce_bucket_size" not in zero:
        # ZeRO-3 allocates its gradient bucket whole at start-up (reduce_bucket_size elements, DeepSpeed's
        # default 5e8: 1 GB bf16 / 2 GB fp32 per rank); one larger than the model is never filled
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        zero["reduce_bucket_size"] = int(min(BUCKET_ELEMENTS, n_params))
    import_muon_uncompiled()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                           model_parameters=None)
    return engine, ds_config


#: DeepSpeed's Muon optimizer module, imported by its ZeRO optimizers and sanity checks (to ask
#: ``isinstance(optimizer, MuonWithAuxAdam)``) even when the optimizer is another one
MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"


def import_muon_uncompiled() -> None:
    """Import DeepSpeed's Muon module with TorchDynamo off, once, before DeepSpeed imports it.

    The module wraps three of its functions in ``torch.compile`` as it is imported, which imports
    TorchInductor: ≈2 CPU-seconds per rank on a 2-core machine, at every start. The launcher's
    optimizer is schedule-free AdamW, never Muon, so those functions never run; with
    ``TORCHDYNAMO_DISABLE=1`` (read by ``torch.compile`` when it wraps a function) they stay plain
    functions and Inductor is not imported. The variable is restored at once: ``--compile`` and
    everything else compile as before. A DeepSpeed without the module is left as it is.
    """
    if MUON_MODULE in sys.modules:
        return
    before = os.environ.get("TORCHDYNAMO_DISABLE")
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    try:
        importlib.import_module(MUON_MODULE)
    except ImportError:
        pass
    finally:
        if before is None:
            del os.environ["TORCHDYNAMO_DISABLE"]
        else:
            os.environ["TORCHDYNAMO_DISABLE"] = before


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


def all_gather_objects(value) -> list:
    """Every rank's picklable ``value``, in rank order (in-memory, trusted peers)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [value]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, value)
    return out
