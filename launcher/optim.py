"""Schedule-free AdamW and its averaged ("eval") weights under DeepSpeed.

Schedule-free AdamW (Defazio et al. 2024, "The Road Less Scheduled", arXiv 2405.15682) keeps
three sequences: the gradient is taken at ``y``, the base iterate ``z`` takes the AdamW steps,
and ``x`` is the running average that one evaluates and saves. The model's parameters hold ``y``
during training; ``schedulefree.AdamWScheduleFree.eval()`` (schedulefree 1.4.1) turns them into
``x`` with ``p.lerp_(z, 1 − 1/β₁)``, i.e. (Algorithm 1: ``y = (1−β₁) z + β₁ x``)

.. math::  x = y + (1 - 1/β_1)(z - y) = (y - (1-β_1) z) / β_1 .

Under DeepSpeed ZeRO-1/2/3 the fp32 master copy of ``y`` and the state ``z`` are partitioned
across ranks, so calling ``eval()`` on the inner optimizer would only move this rank's shard and
leave the (bf16) model weights untouched. :func:`averaged_weights` instead assembles every full
fp32 ``y`` and ``z`` (``deepspeed.utils.safe_get_full_fp32_param`` /
``safe_get_full_optimizer_state``, collective calls) and writes ``x`` into a separate single-device
model used for validation and checkpoints; training continues on ``y`` undisturbed.
"""

from __future__ import annotations

import torch
from schedulefree import AdamWScheduleFree
from torch import nn


def build_optimizer(model: nn.Module, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0,
                    warmup_steps: int = 0) -> AdamWScheduleFree:
    """Schedule-free AdamW over the trainable parameters, already in train mode.

    ``warmup_steps`` is schedule-free's linear warm-up of the learning rate; it also weights the
    average by ``lr²`` during warm-up (``weight_lr_power=2``, the library default).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = AdamWScheduleFree(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                                  warmup_steps=int(warmup_steps))
    # The same as optimizer.train() on a fresh optimizer (no z yet), without touching
    # optimizer.state: train() would create an empty state entry per model parameter, and ZeRO
    # replaces the parameters by flat partitions, leaving entries that break state_dict().
    for group in optimizer.param_groups:
        group["train_mode"] = True
    return optimizer


def eval_from_train(y: torch.Tensor, z: torch.Tensor | None, beta1: float) -> torch.Tensor:
    """``x`` from ``y`` and ``z`` (schedulefree 1.4.1's ``eval()``: ``y.lerp(z, 1 − 1/β₁)``).

    Before the first step there is no ``z`` and ``x = y``.
    """
    if z is None:
        return y.clone()
    return torch.lerp(y, z.to(y), 1.0 - 1.0 / beta1)


def _base_optimizer(engine) -> AdamWScheduleFree | None:
    """The schedule-free optimizer inside a DeepSpeed engine (ZeRO wraps it as ``.optimizer``)."""
    opt = getattr(engine, "optimizer", None)
    while opt is not None and not isinstance(opt, AdamWScheduleFree):
        opt = getattr(opt, "optimizer", None)
    return opt


@torch.no_grad()
def averaged_weights(engine, target: nn.Module | None) -> None:
    """Copy the schedule-free averaged weights ``x`` of ``engine``'s model into ``target``.

    Parameters
    ----------
    engine : a ``deepspeed.DeepSpeedEngine`` whose optimizer wraps ``AdamWScheduleFree`` (any
        ZeRO stage; without ZeRO the optimizer's own state is read). Must be called on every rank:
        the gathers are collective. (A model trained without DeepSpeed: :func:`averaged_weights_plain`.)
    target : a single-device model of the same architecture (fp32); its parameters receive
        ``x``, its buffers the engine module's buffers (see :func:`_copy_buffers`). ``None`` on
        the ranks that only take part in the gathers (the full weights are kept on one rank).
    """
    if hasattr(engine, "averaged_weights"):  # launcher.fsdp.FSDPEngine gathers its own shards
        engine.averaged_weights(target)
        return
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    base = _base_optimizer(engine)
    if base is None:
        raise TypeError("the engine's optimizer is not schedulefree.AdamWScheduleFree")
    beta1 = base.param_groups[0]["betas"][0]
    started = base.param_groups[0]["k"] > 0 or any(len(s) for s in base.state.values())
    targets = dict(target.named_parameters()) if target is not None else {}
    for name, lp in engine.module.named_parameters():  # the same order on every rank
        y = safe_get_full_fp32_param(lp)
        z = safe_get_full_optimizer_state(lp, "z") if (y is not None and started) else None
        if y is None:  # no ZeRO partitioning (stage 0, fp32): the optimizer holds lp itself
            y = lp.detach()
            state = base.state.get(lp, {})
            z = state.get("z")
        if target is not None:
            param = targets[name]
            param.copy_(eval_from_train(y.float(), None if z is None else z.float(), beta1).to(param))
        del y, z
    if target is not None:
        _copy_buffers(engine.module, target)


def _copy_buffers(source: nn.Module, target: nn.Module) -> None:
    """Copy buffers that the engine kept at full precision (a bf16 engine rounds its floating
    buffers — constants such as radial-basis frequencies — so those keep ``target``'s own values)."""
    buffers = dict(source.named_buffers())
    for name, buffer in target.named_buffers():
        value = buffers[name]
        if not value.is_floating_point() or value.dtype == buffer.dtype:
            buffer.copy_(value.to(buffer.device))


@torch.no_grad()
def averaged_weights_plain(model: nn.Module, optimizer: AdamWScheduleFree, target: nn.Module) -> None:
    """As :func:`averaged_weights` for a model trained without DeepSpeed (one process)."""
    beta1 = optimizer.param_groups[0]["betas"][0]
    source = dict(model.named_parameters())
    for name, param in target.named_parameters():
        y = source[name].detach()
        z = optimizer.state.get(source[name], {}).get("z")
        param.copy_(eval_from_train(y.float(), None if z is None else z.float(), beta1).to(param))
    _copy_buffers(model, target)
