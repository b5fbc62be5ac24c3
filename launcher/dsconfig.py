"""The DeepSpeed JSON of a run: the project's defaults < the user's ``--deepspeed_config`` file <
flags typed on the command line (:func:`deepspeed_config`), refusing what DeepSpeed cannot train
exactly or what the launcher owns (the optimizer, micro-batching)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from launcher.config import TrainConfig
from launcher.errors import UserError


def _merge(base: dict, extra: dict) -> dict:
    """Recursive dict merge: ``extra`` wins."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def deepspeed_config(cfg: TrainConfig, bf16_supported: bool) -> dict:
    """The DeepSpeed JSON of the run: project defaults < user's file < explicit flags.

    ``bf16_supported``: the device computes bf16 fast (CUDA with bf16), so ``--precision auto``
    picks it; an explicit ``--precision bf16`` is honoured anywhere (the CPU computes bf16 too,
    slowly; a CUDA device without bf16 is refused by :func:`launcher.job.set_up`).

    The micro batch is one packed graph batch per rank and step (batches are packed by atoms,
    not counted in structures), so ``train_micro_batch_size_per_gpu`` is 1 and gradient
    accumulation is 1; these, and the optimizer (schedule-free AdamW, built by the launcher),
    cannot be set in the user's file.

    Raises
    ------
    UserError (a ValueError)
        if the user's file is not JSON or sets ``optimizer``/``scheduler``, gradient accumulation > 1 or fp16;
        for ZeRO-3 with conservative forces. Their double backward needs the weights gathered
        after the forward, which ZeRO-3 releases. Making the whole model one ZeRO-3 leaf module
        (``deepspeed.utils.set_z3_leaf_modules``, docs/FEASIBILITY.md) gets past that, but then failed
        in DeepSpeed 0.19.8's ``zero_grad`` on CPU ("unknown parameter type" from
        ``record_stream``), and would gather every weight on every rank anyway.
    """
    defaults = {
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    user = {}
    if cfg.deepspeed_config:
        path = Path(cfg.deepspeed_config)
        if not path.is_file():
            raise UserError(f"--deepspeed_config {path}: no such file")
        try:
            user = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise UserError(f"--deepspeed_config {path}: not valid JSON ({error})") from error
        for key in ("optimizer", "scheduler"):
            if key in user:
                raise UserError(
                    f"--deepspeed_config {path}: remove {key!r}; the launcher builds schedule-free AdamW "
                    "(set its learning rate with --lr / --base-lr)"
                )
        if int(user.get("gradient_accumulation_steps", 1)) != 1:
            raise UserError(f"--deepspeed_config {path}: gradient_accumulation_steps must be 1")
        if user.get("fp16", {}).get("enabled", False):
            raise UserError(f"--deepspeed_config {path}: fp16 is not supported (use bf16)")
    config = _merge(defaults, user)
    stage = cfg.deepspeed_overrides.get("zero_stage", config.get("zero_optimization", {}).get("stage", 2))
    config = _merge(config, {"zero_optimization": {"stage": int(stage)}})
    if int(stage) == 3:
        # ZeRO-3's memory-efficient linear replaces torch.nn.functional.linear process-wide by an
        # autograd.Function that the FLOP counter cannot see into; the plain linear is counted.
        config["zero_optimization"].setdefault("memory_efficient_linear", False)
    precision = cfg.deepspeed_overrides.get("precision")
    if precision is None and "bf16" in user:
        bf16 = bool(user["bf16"].get("enabled", False))
    else:
        precision = precision or "auto"
        bf16 = bf16_supported if precision == "auto" else precision == "bf16"
    config["bf16"] = {**config.get("bf16", {}), "enabled": bf16}
    if bf16:  # DeepSpeed then discards non-finite bf16 gradients instead of applying them (launcher.health)
        config["bf16"].setdefault("check_grad_overflow", True)
    config.pop("train_batch_size", None)
    config["train_micro_batch_size_per_gpu"] = 1
    config["gradient_accumulation_steps"] = 1
    if int(stage) == 3 and not cfg.direct_forces:
        raise UserError("--engine deepspeed --zero-stage 3 --conservative is not exact (the double backward needs "
                        "weights ZeRO-3 releases after the forward; every ZeRO-3 variant failed or gave wrong "
                        "gradients): use --engine fsdp --conservative (FSDP2 on the root module: exact, fully "
                        "sharded at rest), or --zero-stage 1/2")
    zero = config["zero_optimization"]
    if cfg.offload_optimizer:
        if int(stage) < 1:
            raise UserError("--offload-optimizer needs --zero-stage 1, 2 or 3")
        zero["offload_optimizer"] = {"device": "cpu", **zero.get("offload_optimizer", {})}
    if cfg.offload_params:
        if int(stage) != 3:
            raise UserError("--offload-params needs --zero-stage 3 (parameters are partitioned only there)")
        zero["offload_param"] = {"device": "cpu", **zero.get("offload_param", {})}
    if "offload_optimizer" in zero or "offload_param" in zero:
        # the schedule-free optimizer is a client optimizer: DeepSpeed would otherwise insist on its
        # own CPU Adam (docs/FEASIBILITY.md: offload with it ran with unchanged losses)
        config.setdefault("zero_force_ds_cpu_optimizer", False)
    return config
