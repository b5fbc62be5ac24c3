"""Fitted scale factors (GemNet-OC) before training: the same on every rank, restored on resume.

GemNet-OC normalises its activations with scalar factors fitted on sample batches
(:func:`zoo.gemnet_blocks.fit_scale_factors`; arXiv 2204.02782 and arXiv 2510.09768 note the
model is unstable without them). They are buffers, not parameters: DeepSpeed neither averages nor
partitions them, so every rank must fit them on *identical* batches. A fresh run therefore builds,
on every rank, a loader over the training shards as if it were rank 0 of 1 with shuffling off and
takes its first :data:`FIT_BATCHES` batches (the same ``atoms_per_batch`` as training) — same
data, same order, same factors everywhere — and fits them before ``deepspeed.initialize``. A
resumed run does not refit: the engine restores the buffers from its checkpoint, and the values
recorded in the checkpoint's metadata (``scale_factors``) are put into the evaluation model.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

#: batches the scale factors are fitted on: each of GemNet-OC's 54 factors (3 blocks) costs one pass
#: over them (measured on 1 CPU core, width 16, 128 atoms per batch: 0.42 s per forward, so 2 batches
#: ≈ 45 s); raise it on GPUs
FIT_BATCHES = 2


def has_scale_factors(model: nn.Module) -> bool:
    from zoo.gemnet_blocks import ScaleFactor

    return any(isinstance(m, ScaleFactor) for m in model.modules())


def fit_on_train_shards(model: nn.Module, shard_dir, atoms_per_batch: int, cutoff: float,
                        device: torch.device, batches: int = FIT_BATCHES) -> dict[str, float]:
    """Fit ``model``'s scale factors on the first ``batches`` batches of ``shard_dir`` (index order).

    Every rank calls this with the same arguments and gets the same factors (no communication).
    Returns ``{module name: scale}``.
    """
    from datapipe.loader import StreamingLoader
    from zoo.gemnet_blocks import fit_scale_factors

    loader = StreamingLoader(shard_dir, rank=0, world_size=1, num_workers=0, atoms_per_batch=atoms_per_batch,
                             cutoff=cutoff, shuffle=False)
    sample = [b.to(device) for b in itertools.islice(iter(loader), batches)]
    model.to(device)
    return fit_scale_factors(model, sample)


@torch.no_grad()
def set_scale_factors(model: nn.Module, factors: dict[str, float]) -> None:
    """Put recorded ``{module name: scale}`` into ``model`` (the fp32 evaluation model).

    Raises ``KeyError`` naming a factor the model does not have.
    """
    modules = dict(model.named_modules())
    for name, value in factors.items():
        if name not in modules or not hasattr(modules[name], "scale"):
            raise KeyError(f"scale factor {name!r} not in {type(model).__name__}")
        modules[name].scale.fill_(float(value))
