"""The FSDP2 engine (``--engine fsdp``, started with torchrun): ``fully_shard`` from outside the model.

Sharding plan (docs/FEASIBILITY.md, measured on this project's models at 2 CPU ranks):

- **direct forces** — each repeated block (:meth:`zoo.models.base.ForceField.repeated_blocks`)
  is its own FSDP unit, then the root: parameters are gathered one block at a time (exact:
  2.5e-6 and 3.7e-6 relative gradient error against one process on two zoo architectures);
- **conservative forces** — the root module only, one unit: the double backward needs every
  block's weights after the forward; per-block units fail ("setStorage … size 0") or, without
  resharding after backward, silently drop gradients (151 of 152 parameters), so
  ``--fsdp-units blocks`` with ``--conservative`` is refused. Root-only is exact (1.9e-6) and
  shards parameters, gradients and optimizer state at rest.

The model is built on the meta device on every rank, sharded, allocated empty
(``to_empty``), and filled from rank 0's fully built copy
(``set_model_state_dict(..., broadcast_from_rank0=True)``): only rank 0 ever holds the whole
model, and the initial weights equal a one-process build with the same seed. A model with a
pre-training hook (forwards before the engine) is built in full on every rank instead.

:class:`FSDPEngine` offers the part of DeepSpeed's engine interface the loop uses (call,
``backward``, ``step``, ``train``, ``module``, ``save_checkpoint``/``load_checkpoint`` through
``torch.distributed.checkpoint``), and :meth:`FSDPEngine.averaged_weights` the schedule-free
average for validation and checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from launcher.config import TrainConfig
from launcher.materialise import build_model
from launcher.optim import build_optimizer, eval_from_train
from launcher.parallelize import checkpoint_blocks

_CLIENT = "client_state.json"


def fsdp_units(cfg: TrainConfig) -> str:
    """``"blocks"`` or ``"root"``: the sharding units of this run (see the module docstring).

    Raises ``ValueError`` for per-block units with conservative forces (not exact).
    """
    units = getattr(cfg, "fsdp_units", "auto")
    if units == "auto":
        return "blocks" if cfg.direct_forces else "root"
    if units == "blocks" and not cfg.direct_forces:
        raise ValueError("--engine fsdp --fsdp-units blocks cannot train conservative forces exactly (the double "
                         "backward loses gradients of per-block units); use --engine fsdp --fsdp-units root "
                         "(the default for --conservative)")
    if units not in ("blocks", "root"):
        raise ValueError(f"--fsdp-units {units!r}: expected auto, blocks or root")
    return units


def fsdp_config(cfg: TrainConfig, bf16_supported: bool) -> dict:
    """The engine's record (same keys as the DeepSpeed JSON the run log and metadata read).

    ``--offload-params`` selects FSDP2's ``CPUOffloadPolicy``: sharded parameters, their gradients and
    the optimizer state live in host memory and the optimizer steps there (recorded as both
    ``offload_param`` and ``offload_optimizer``). Raises ``ValueError`` for ``--offload-optimizer``
    alone: FSDP2 has no optimizer-only offload (the optimizer state follows the parameters' device).
    """
    bf16 = bf16_supported if cfg.precision == "auto" else cfg.precision == "bf16"  # as deepspeed_config
    if cfg.offload_optimizer and not cfg.offload_params:
        raise ValueError("--engine fsdp --offload-optimizer: FSDP2 cannot offload the optimizer state alone (it lives "
                         "where the sharded parameters live); use --engine fsdp --offload-params (parameters, "
                         "gradients and optimizer state on the CPU) or --engine deepspeed --offload-optimizer")
    zero = {"stage": 3}
    if cfg.offload_params:
        zero.update(offload_param={"device": "cpu"}, offload_optimizer={"device": "cpu"})
    return {"engine": "fsdp", "fsdp": {"units": fsdp_units(cfg), "reshard_after_forward": True,
                                       "cpu_offload": bool(cfg.offload_params)},
            "zero_optimization": zero, "bf16": {"enabled": bool(bf16)}}


def shard(model: nn.Module, units: str, bf16: bool, offload: bool = False) -> nn.Module:
    """Apply ``fully_shard`` per block then to the root (``units="blocks"``) or to the root only;
    ``offload``: ``CPUOffloadPolicy`` (pinned host memory on CUDA)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    options = {"mp_policy": policy,
               "offload_policy": CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload else OffloadPolicy()}
    if units == "blocks":
        for block in model.repeated_blocks():
            fully_shard(block, **options)
    fully_shard(model, **options)
    return model


def build_fsdp_engine(cfg: TrainConfig, runtime, lr: float, warmup_steps: int, normalisation: tuple,
                      prepared: nn.Module | None = None):
    """Build, shard and fill the model, then schedule-free AdamW over its sharded parameters.

    Parameters
    ----------
    normalisation : ``(element_references, force_rms)`` of the training data (eV, eV/Å).
    prepared : a model already built in full on every rank, normalised (pre-training hooks),
        sharded as is.

    Returns
    -------
    (:class:`FSDPEngine`, engine record dict).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    config = fsdp_config(cfg, runtime.bf16_supported)
    units, bf16, offload = config["fsdp"]["units"], config["bf16"]["enabled"], config["fsdp"]["cpu_offload"]
    if prepared is not None:
        if cfg.activation_checkpointing:
            checkpoint_blocks(prepared)
        model = shard(prepared.to(runtime.device), units, bf16, offload)
    else:
        full = None
        if runtime.is_main:
            torch.manual_seed(cfg.seed)
            full = build_model(cfg)
        with torch.device("meta"):
            model = build_model(cfg)
        model.set_normalization(*normalisation)  # a plain attribute, not part of the state dict
        if cfg.activation_checkpointing:
            checkpoint_blocks(model)
        shard(model, units, bf16, offload)
        # offload: sharded parameters live on the host; buffers are not sharded and stay on the device
        model.to_empty(device="cpu" if offload else runtime.device)
        state = full.state_dict() if full is not None else {}
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        del full, state
        for module in model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = buffer.to(runtime.device)
    optimizer = build_optimizer(model, lr, cfg.betas, cfg.weight_decay, warmup_steps)
    return FSDPEngine(model, optimizer, runtime), config


class FSDPEngine:
    """A ``fully_shard``-ed model and its optimizer behind the calls the training loop makes."""

    def __init__(self, module: nn.Module, optimizer, runtime) -> None:
        self.module, self.optimizer, self.runtime = module, optimizer, runtime

    def __call__(self, batch):
        return self.module(batch)

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()  # FSDP2 reduce-scatters gradients averaged over ranks, as DeepSpeed does

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------------------------------
    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict | None = None,
                        save_latest: bool = False) -> None:
        """Sharded model and optimizer state (``torch.distributed.checkpoint``; collective)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        path = Path(save_dir) / tag
        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(path))
        if self.runtime.is_main:
            (path / _CLIENT).write_text(json.dumps(client_state or {}))

    def load_checkpoint(self, load_dir: str, tag: str, **_) -> tuple[str, dict]:
        """Restore what :meth:`save_checkpoint` wrote; returns ``(path, client_state)``."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        path = Path(load_dir) / tag
        if not (path / _CLIENT).is_file():
            raise FileNotFoundError(f"{path}: no FSDP checkpoint ({_CLIENT} missing)")
        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        return str(path), json.loads((path / _CLIENT).read_text())

    @torch.no_grad()
    def averaged_weights(self, target: nn.Module | None) -> None:
        """Schedule-free ``x`` from the sharded ``y`` (parameters) and ``z`` (optimizer state),
        gathered parameter by parameter (collective); written into ``target`` where not None."""
        beta1 = self.optimizer.param_groups[0]["betas"][0]
        targets = dict(target.named_parameters()) if target is not None else {}
        for name, p in self.module.named_parameters():
            y = _full(p.detach())
            z = self.optimizer.state.get(p, {}).get("z")
            z = None if z is None else _full(z)
            if target is not None:
                targets[name].copy_(eval_from_train(y.float(), None if z is None else z.float(), beta1))
        if target is not None:
            buffers = dict(self.module.named_buffers())
            for name, buffer in target.named_buffers():
                buffer.copy_(_full(buffers[name]).to(buffer))


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor shard (collective), or the tensor itself."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
