"""GemNet-OC's fitted scale factors as the registry's pre-training hook (:data:`SCALE_FACTORS`).

GemNet-OC normalises its activations with scalar factors fitted on sample batches
(:func:`zoo.models.gemnet_oc.blocks.fit_scale_factors`; arXiv 2204.02782 and arXiv 2510.09768 note the
model is unstable without them). They are buffers, not parameters: an engine neither averages nor
partitions them, so every rank must fit them on *identical* batches. The launcher therefore gives
every rank the same first :data:`FIT_BATCHES` batches of the training shards (index order, no
shuffling, the training ``atoms_per_batch``) and calls the hook before the engine is built. A
resumed run does not refit: the engine restores the buffers from its checkpoint, and the record
kept in the checkpoint's metadata (``scale_factors``) is put into any other copy of the model.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from zoo.models.base import PretrainHook
from zoo.models.gemnet_oc.blocks import ScaleFactor, fit_scale_factors

#: batches the scale factors are fitted on: each of GemNet-OC's 54 factors (3 blocks) costs one pass
#: over them (measured on 1 CPU core, width 16, 128 atoms per batch: 0.42 s per forward, so 2 batches
#: ≈ 45 s); raise it on GPUs
FIT_BATCHES = 2


def has_scale_factors(model: nn.Module) -> bool:
    """Whether ``model`` holds any :class:`~zoo.models.gemnet_oc.blocks.ScaleFactor`."""
    return any(isinstance(m, ScaleFactor) for m in model.modules())


def fit(model: nn.Module, batches: list, progress=None) -> dict:
    """Fit ``model``'s scale factors on ``batches``; the record ``{"factors": {name: scale}, "seconds"}``.

    ``progress(done, total)`` is called after each factor (see :func:`fit_scale_factors`).
    """
    started = time.time()
    factors = fit_scale_factors(model, batches, progress=progress)
    return {"factors": factors, "seconds": time.time() - started}


@torch.no_grad()
def set_scale_factors(model: nn.Module, factors: dict[str, float]) -> None:
    """Put recorded ``{module name: scale}`` into ``model``.

    Raises ``KeyError`` naming a factor the model does not have.
    """
    modules = dict(model.named_modules())
    for name, value in factors.items():
        if name not in modules or not hasattr(modules[name], "scale"):
            raise KeyError(f"scale factor {name!r} not in {type(model).__name__}")
        modules[name].scale.fill_(float(value))


def restore(model: nn.Module, record: dict) -> None:
    """Put the factors of a record written by :func:`fit` into ``model``."""
    set_scale_factors(model, record["factors"])


#: The registry's pre-training hook of GemNet-OC.
SCALE_FACTORS = PretrainHook(
    metadata_key="scale_factors",
    batches=FIT_BATCHES,
    fit=fit,
    restore=restore,
    description="GemNet-OC scale factors",
)
