"""Which engine wraps the model, configured how, checked before any work: ``--engine deepspeed|fsdp``.

=========================  ==============================  =====================================
engine                     direct forces                   conservative forces (double backward)
=========================  ==============================  =====================================
``deepspeed`` ZeRO 0/1/2   exact                           exact
``deepspeed`` ZeRO-3       exact (built inside zero.Init)  refused: no variant was exact
``fsdp``                   per-block units (exact)         root-only unit (exact); per-block refused
=========================  ==============================  =====================================

(docs/FEASIBILITY.md; each accepted cell is checked against one process in
``tests/launcher/test_engines.py``.) Offload: DeepSpeed offloads the optimizer
(``--offload-optimizer``, ZeRO 1-3) and parameters (``--offload-params``, ZeRO-3) separately; FSDP2
offloads parameters, gradients and optimizer state together (``--engine fsdp --offload-params``,
``CPUOffloadPolicy``; an optimizer-only offload is refused there). Activation checkpointing
(``--activation-checkpointing``) works with both engines.
"""

from __future__ import annotations

import torch

from launcher.config import TrainConfig
from launcher.dsconfig import deepspeed_config
from launcher.errors import UserError
from launcher.materialise import build_training_model
from launcher.optim import build_optimizer
from launcher.parallelize import checkpoint_blocks
from zoo.registry import get_spec


def engine_config(cfg: TrainConfig, bf16_supported: bool) -> dict:
    """The engine's configuration (DeepSpeed JSON, or FSDP's record with the same ``zero_optimization``
    and ``bf16`` keys), refusing what is not exact or not offered (``UserError`` naming what works)."""
    if cfg.engine == "deepspeed":
        return deepspeed_config(cfg, bf16_supported)
    if cfg.engine != "fsdp":
        raise UserError(f"--engine {cfg.engine!r}: expected deepspeed or fsdp")
    if cfg.deepspeed_config:
        raise UserError("--deepspeed_config configures the DeepSpeed engine, not --engine fsdp")
    from launcher.fsdp import fsdp_config

    return fsdp_config(cfg, bf16_supported)


def prepare_model(cfg: TrainConfig, config: dict, normalisation: tuple):
    """The training model before the engine, or None where the engine builds it itself (FSDP on the
    meta device). An architecture with a pre-training hook is always built here, in full."""
    if cfg.engine == "fsdp" and get_spec(cfg.model).pretrain is None:
        return None
    model = build_training_model(cfg, config)
    model.set_normalization(*normalisation)
    return model


def build(cfg: TrainConfig, model, runtime, lr: float, warmup_steps: int, normalisation: tuple):
    """The engine around ``model`` (from :func:`prepare_model`) with schedule-free AdamW.

    Returns ``(engine, config)``; the engine offers call, ``backward``, ``step``, ``train``,
    ``module``, ``save_checkpoint`` and ``load_checkpoint`` (DeepSpeed's names).
    """
    if cfg.engine == "fsdp":
        from launcher.fsdp import build_fsdp_engine

        return build_fsdp_engine(cfg, runtime, lr, warmup_steps, normalisation, prepared=model)
    from launcher.engine import build_engine

    if cfg.activation_checkpointing:
        checkpoint_blocks(model)
    optimizer = build_optimizer(model, lr, cfg.betas, cfg.weight_decay, warmup_steps)
    return build_engine(cfg, model, optimizer, runtime)


def memory_check(cfg: TrainConfig, runtime, config: dict) -> dict:
    """The planner's per-rank estimate of this run (:func:`zoo.plan.check`), computed on rank 0 and
    broadcast; on CUDA a configuration that cannot fit raises ``MemoryError`` naming one that would.
    On the CPU (ranks share the host's memory) the estimate is only reported."""
    from launcher.engine import broadcast_object
    from zoo.plan import check

    stage = config["zero_optimization"]["stage"] if cfg.engine == "deepspeed" else config["fsdp"]["units"]
    zero = config.get("zero_optimization", {})
    offload = "+".join(k for k, key in (("optimizer", "offload_optimizer"), ("params", "offload_param"))
                       if zero.get(key, {}).get("device", "none") != "none" and key in zero)
    cuda = runtime.device.type == "cuda"
    memory = torch.cuda.get_device_properties(runtime.device).total_memory if cuda else float("inf")
    answer = None
    if runtime.is_main:
        try:
            mine, _ = check(cfg.model, cfg.width, cfg.model_overrides, cfg.engine, stage, cfg.activation_checkpointing,
                            offload, runtime.world_size, memory, cfg.atoms_per_batch, not cfg.direct_forces,
                            "bf16" if config["bf16"]["enabled"] else "fp32")
            answer = {"estimate_bytes": mine.total, "flags": mine.flags(), **{k: getattr(mine, k) for k in (
                "weights", "gradients", "optimizer", "activations", "buffers")}}
        except MemoryError as error:
            answer = {"error": str(error)}
    answer = broadcast_object(answer)
    if "error" in answer:
        raise MemoryError(answer["error"])
    return answer


def engine_record(cfg: TrainConfig, config: dict) -> dict:
    """What the checkpoint metadata and the run log record about the engine (the precision policy:
    :func:`precision_record`)."""
    zero = config.get("zero_optimization", {})
    stage = zero.get("stage") if cfg.engine == "deepspeed" else config["fsdp"]["units"]
    offload = [k for k in ("offload_optimizer", "offload_param") if k in zero]
    summary = (f"ZeRO-{stage}" if cfg.engine == "deepspeed" else f"FSDP2 ({stage})") + \
        "".join(f", {k.replace('_', ' ')}" for k in offload) + (", activation checkpointing"
                                                                 if cfg.activation_checkpointing else "")
    return {"engine": cfg.engine, "stage": stage, "offload": offload,
            "activation_checkpointing": cfg.activation_checkpointing, "summary": summary}


def precision_record(cfg: TrainConfig, config: dict) -> dict:
    """The precision policy of the run (checkpoint metadata ``precision``,
    :func:`zoo.models.precision.policy_record`): compute dtype, fp32 islands, and the dtype the
    engine reduces gradients in (DeepSpeed bf16: bf16; FSDP2: ``reduce_dtype`` fp32)."""
    from zoo.models.precision import policy_record

    bf16 = bool(config["bf16"]["enabled"])
    return policy_record("bf16" if bf16 else "fp32",
                         gradient_reduction="fp32" if cfg.engine == "fsdp" or not bf16 else "bf16")
