"""Where each copy of the model lives: nothing replicated on every rank that need not be.

Three copies of a zoo model used to exist on every rank: the training model (built in full, then
handed to the engine), a full fp32 evaluation copy (1.47 GiB for the largest width of the headline model — more than
ZeRO-3's whole sharded model state from 8 GPUs up) and the FLOP counter's traced model. Now:

- **training model** (:func:`build_training_model`): under ZeRO-3 built inside
  ``deepspeed.zero.Init``, so each parameter is partitioned as soon as its module is constructed
  and no rank ever holds the whole model (same initial values: the same seed on every rank, each
  parameter initialised in full then partitioned). An architecture with a pre-training hook
  (e.g. fitted scale factors) runs forwards before the engine exists and is built in full.
- **FLOP counter's model** (:func:`counting_model`): built on the meta device — the trace needs
  shapes only (:mod:`zoo.flops.report`), so it costs no memory; a model whose forward needs
  tensor values (index sets built from positions) gets a real copy on first use
  (:class:`zoo.flops.counter.StepFlopCounter`'s ``materialise``), documented as the one remaining
  replica.
- **evaluation model** (:func:`evaluation_model`): built on rank 0 only, at checkpoint time, filled
  with the schedule-free averaged weights (gathered collectively, kept on rank 0 only), used to
  validate and write the checkpoint, then dropped.
"""

from __future__ import annotations

import contextlib

import torch

from launcher.config import TrainConfig
from zoo.models.base import ForceField
from zoo.registry import build, get_spec


def build_model(cfg: TrainConfig) -> ForceField:
    """The run's architecture at its width and force mode (no normalisation, current RNG state)."""
    return build(cfg.model, cfg.width, direct_forces=cfg.direct_forces, **cfg.model_overrides)


def shards_at_construction(cfg: TrainConfig, ds_config: dict | None) -> bool:
    """Is the training model built inside ``deepspeed.zero.Init`` (ZeRO-3, no pre-training hook)?"""
    stage = int((ds_config or {}).get("zero_optimization", {}).get("stage", 0))
    return stage == 3 and get_spec(cfg.model).pretrain is None


def build_training_model(cfg: TrainConfig, ds_config: dict | None) -> ForceField:
    """The model the engine will wrap, initialised with ``cfg.seed`` (identical on every rank).

    Under ZeRO-3 (and no pre-training hook) it is constructed inside ``deepspeed.zero.Init`` with
    the run's DeepSpeed config: every parameter is partitioned across ranks when its module is
    built (``param.ds_tensor`` holds this rank's share; ``param`` itself is empty until gathered).
    """
    torch.manual_seed(cfg.seed)
    if shards_at_construction(cfg, ds_config):
        import deepspeed

        context = deepspeed.zero.Init(config_dict_or_path=ds_config)
    else:
        context = contextlib.nullcontext()
    with context:
        return build_model(cfg)


def counting_model(cfg: TrainConfig) -> ForceField:
    """A weightless (meta-device) copy of the model for the FLOP counter (shapes only)."""
    with torch.device("meta"):
        model = build_model(cfg)
    model.train()
    return model


def materialised_counting_model(cfg: TrainConfig) -> ForceField:
    """A real copy for a model whose forward needs values (values of the weights do not matter)."""
    model = build_model(cfg)
    model.train()
    return model


def evaluation_model(cfg: TrainConfig, job) -> ForceField:
    """Rank 0's single-device fp32 model for validation and the checkpoint, weights to be filled
    with :func:`launcher.optim.averaged_weights`; carries the data's normalisation and the
    pre-training hook's record."""
    model = build_model(cfg)
    model.set_normalization(*(job.normalisation or (job.splits.train.element_references,
                                                    job.splits.train.force_rms)))
    if job.pretrain is not None:
        job.hook.restore(model, job.pretrain)
    return model.to(job.runtime.device)
