"""Mixed precision of the zoo's models: bf16 compute, fp32 islands (``--precision bf16``).

The policy (what runs in which dtype, one table for every architecture):

==========================================  ========  ==============================================
part of the step                            dtype     where
==========================================  ========  ==============================================
learned layers: embeddings, linears,        compute   the engine's parameter dtype (DeepSpeed
norms, SO(2) convolutions, messages, heads  (bf16)    ``bf16``, FSDP2 ``MixedPrecisionPolicy``) or
                                                      the autocast dtype (:func:`compute_dtype`)
positions, edge vectors, distances,         ≥ fp32    :meth:`zoo.models.base.ForceField.forward`
unit vectors, graph construction                      (:func:`geometry_dtype`)
radial bases and envelopes                  ≥ fp32    :func:`fp32_island` on their ``forward``
spherical harmonics (Legendre), Wigner-D    ≥ fp32    :func:`fp32_island`
sum of per-atom energies                    ≥ fp32    the base class, then
+ per-element references                    fp64      ``energy = refs + σ·Ê`` in float64
direct force head output, −∂E/∂x            ≥ fp32    the base class (autograd w.r.t. fp32 positions)
loss                                        fp32/64   :mod:`launcher.loss`
master weights, optimizer state             fp32      the engine
==========================================  ========  ==============================================

Why these islands: bf16 keeps 8 significant bits, so a coordinate of 10 Å is stored to ±0.03 Å
and an edge vector, a difference of two, loses more; Gaussians 0.1 Å wide or the 1/d of a Bessel
basis would be evaluated at the wrong distance, Wigner-D matrices would stop being orthogonal
(rotation-equivariance error of the rounding, 2⁻⁹ per entry, in every layer), and a bf16 running
sum of 350 per-atom energies rounds at every addition (2⁻⁹ of the partial sum each). Island outputs are cast to the compute dtype
exactly once, at the boundary, where the learned layers take them (Micikevicius et al. 2018,
"Mixed Precision Training", arXiv 1710.03740, Sec. 3: keep reductions and sensitive ops in fp32;
Kalamkar et al. 2019, "A Study of BFLOAT16 for Deep Learning Training", arXiv 1905.12322).

The same model code runs under every engine and on one device: DeepSpeed's ``bf16`` and FSDP2's
``MixedPrecisionPolicy(param_dtype=bfloat16)`` cast parameters only (buffers keep fp32), and
:func:`cast_parameters` does the same for a single process; ``torch.autocast`` (CPU or CUDA) with
fp32 parameters works too, because islands switch autocast off inside.

>>> import torch
>>> from zoo.registry import build
>>> model = cast_parameters(build("mpnn", width=8), torch.bfloat16)
>>> model.radial.frequencies.dtype, next(model.parameters()).dtype
(torch.float32, torch.bfloat16)
>>> policy_record("bf16")["compute"], policy_record("bf16")["energy_references"]
('bf16', 'fp64')
"""

from __future__ import annotations

import functools

import torch
from torch import nn

#: parts of a step kept in at least fp32 under bf16 (the table of the module docstring)
FP32_ISLANDS = ("geometry", "radial_basis", "envelope", "spherical_harmonics", "wigner_d", "energy_sum",
                "direct_force_output", "force_autograd", "loss")
#: the precision names the launcher and ``zoo plan`` accept
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def policy_record(compute: str, gradient_reduction: str | None = None) -> dict:
    """The precision policy as JSON (checkpoint metadata ``precision``).

    Parameters
    ----------
    compute : ``"bf16"`` or ``"fp32"``, the dtype of the learned layers.
    gradient_reduction : the dtype the engine reduces gradients in (None: not known here).

    Raises ``ValueError`` for another name.
    """
    if compute not in DTYPES:
        raise ValueError(f"precision {compute!r}: expected one of {sorted(DTYPES)}")
    return {"compute": compute, "fp32_islands": list(FP32_ISLANDS) if compute != "fp32" else [],
            "master_weights": "fp32", "optimizer_state": "fp32", "loss": "fp32",
            "energy_references": "fp64", "gradient_reduction": gradient_reduction,
            "source": "zoo.models.precision"}


def geometry_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of geometry and islands for parameters/compute of ``dtype``: at least fp32.

    >>> geometry_dtype(torch.bfloat16), geometry_dtype(torch.float64)
    (torch.float32, torch.float64)
    """
    return torch.promote_types(dtype, torch.float32)


def compute_dtype(module: nn.Module, device: torch.device) -> torch.dtype:
    """The dtype the learned layers of ``module`` compute in on ``device``.

    The autocast dtype where autocast is on for the device type, else the dtype of the module's
    first floating parameter (engines hold all parameters in one dtype while the forward runs:
    DeepSpeed casts them, FSDP2 gathers the root's and each block's in ``param_dtype``).

    >>> compute_dtype(nn.Linear(2, 2), torch.device("cpu"))
    torch.float32
    >>> with torch.autocast("cpu", dtype=torch.bfloat16):
    ...     compute_dtype(nn.Linear(2, 2), torch.device("cpu"))
    torch.bfloat16
    """
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def fp32_island(forward):
    """Decorator: run ``forward(self, *tensors)`` in at least fp32, autocast off; returns its output.

    Floating tensor arguments below fp32 are upcast; the output is whatever the body computes
    (at least fp32 for fp32 inputs). The caller casts it to the compute dtype where learned
    layers take it (:func:`to_compute`).

    >>> import torch
    >>> class Square(nn.Module):
    ...     @fp32_island
    ...     def forward(self, x):
    ...         return x * x
    >>> with torch.autocast("cpu", dtype=torch.bfloat16):
    ...     Square()(torch.ones(2, dtype=torch.bfloat16)).dtype
    torch.float32
    """

    @functools.wraps(forward)
    def wrapped(self, *args, **kwargs):
        args = [_upcast(a) for a in args]
        kwargs = {k: _upcast(v) for k, v in kwargs.items()}
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
            with torch.autocast(device, enabled=False):
                return forward(self, *args, **kwargs)
        return forward(self, *args, **kwargs)

    wrapped.fp32_island = True
    return wrapped


def _upcast(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(geometry_dtype(value.dtype))
    return value


def to_compute(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` in the compute ``dtype``: the single cast at an island's boundary (no-op in fp32)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def cast_parameters(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast floating parameters (not buffers) to ``dtype`` in place, as DeepSpeed's ``bf16`` and
    FSDP2's ``MixedPrecisionPolicy`` do; for one-process bf16 inference and tests. Returns ``module``."""
    for p in module.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    return module
