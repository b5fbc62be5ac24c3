"""Applied to a single-device model from outside, as torchtitan's ``parallelize.py``: activation
checkpointing per repeated block (``--activation-checkpointing``).

Each block of :meth:`zoo.models.base.ForceField.repeated_blocks` keeps only its inputs in the
forward and recomputes its activations in the backward (``torch.utils.checkpoint``, the
non-reentrant variant, which also recomputes inside the double backward of conservative forces).
The gradients are those of the plain model (tested in ``tests/launcher/test_engines.py``); the
recomputation costs about one more forward of the blocks, which is not counted as model FLOPs
(the usual MFU convention: the FLOP counter traces a separate, unwrapped copy).
"""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint


def checkpoint_blocks(model: nn.Module) -> int:
    """Wrap the forward of every repeated block of ``model`` in activation checkpointing.

    Returns the number of blocks wrapped. Raises ``ValueError`` for a model without repeated
    blocks (nothing to checkpoint).
    """
    blocks = model.repeated_blocks()
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no repeated blocks to checkpoint")
    for block in blocks:
        block.forward = functools.partial(_recomputed, block.forward)
    return len(blocks)


def _recomputed(forward, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)
