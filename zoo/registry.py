"""The zoo's registry: one dict of model specs, as torchtitan keeps one ``ModelSpec`` per model.

>>> from zoo.registry import build, count_parameters
>>> model = build("esen", width=64)               # doctest: +SKIP
>>> count_parameters("esen", width=1024)          # no weights allocated  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from zoo.base import ForceField


@dataclass(frozen=True)
class ModelSpec:
    """How to build one architecture.

    Attributes
    ----------
    name : registry key (``esen``, ``mpnn``, ``mc-egnn``, ``gemnet-oc``).
    builder : ``"module:Class"``; the class takes ``width`` and keyword overrides.
    default_width : width used when none is given.
    widths : the width ladder of the scaling study (smallest to largest that matter).
    symmetry : what the architecture is constrained to (for reports).
    paper : the paper it implements.
    defaults : keyword defaults applied before the user's overrides.
    """

    name: str
    builder: str
    default_width: int
    widths: tuple[int, ...]
    symmetry: str
    paper: str
    defaults: dict = field(default_factory=dict)

    def model_class(self) -> Callable[..., ForceField]:
        module, _, cls = self.builder.partition(":")
        return getattr(importlib.import_module(module), cls)


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="esen",
            builder="zoo.esen:ESEN",
            default_width=64,
            widths=(16, 32, 64, 128, 256, 512, 1024),
            symmetry="SO(3)-equivariant spherical tensors (lmax 2-4)",
            paper="Fu et al. 2025, arXiv 2502.12147",
        ),
        ModelSpec(
            name="mpnn",
            builder="zoo.mpnn:MPNN",
            default_width=128,
            widths=(64, 128, 256, 512, 1024, 2048, 4096),
            symmetry="none (translation invariant only)",
            paper="Gilmer et al. 2017, arXiv 1704.01212; unconstrained baseline of arXiv 2510.09768",
        ),
        ModelSpec(
            name="mc-egnn",
            builder="zoo.egnn:MCEGNN",
            default_width=96,
            widths=(32, 64, 96, 160, 320, 512, 896, 1024),
            symmetry="E(3)-equivariant Cartesian vectors (l = 1)",
            paper="Satorras et al. 2021, arXiv 2102.09844 (multi-channel variant, Levy et al. 2023)",
        ),
        ModelSpec(
            name="gemnet-oc",
            builder="zoo.gemnet_oc:GemNetOC",
            default_width=64,
            widths=(32, 64, 128, 256, 512, 1024),
            symmetry="E(3)-invariant 2-, 3- and 4-body (distances, angles, dihedrals)",
            paper="Gasteiger et al. 2022, arXiv 2204.02782",
        ),
    )
}


def get_spec(name: str) -> ModelSpec:
    """The spec of ``name``; ``KeyError`` listing the known names otherwise."""
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {sorted(MODELS)}") from None


def build(name: str, width: int | None = None, **overrides) -> ForceField:
    """Build architecture ``name`` at ``width`` (default: the spec's) with keyword overrides.

    The returned model carries ``model.spec_name``, ``model.width`` and ``model.overrides`` so a
    checkpoint can rebuild it exactly.
    """
    spec = get_spec(name)
    width = spec.default_width if width is None else int(width)
    if width < 1:
        raise ValueError(f"width must be a positive integer, got {width}")
    kwargs = {**spec.defaults, **overrides}
    model = spec.model_class()(width=width, **kwargs)
    model.spec_name, model.width, model.overrides = name, width, dict(overrides)
    return model


def count_parameters(name: str, width: int | None = None, **overrides) -> int:
    """Trainable parameters N of ``name`` at ``width``, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = build(name, width, **overrides)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def parameter_table(names: list[str] | None = None, widths: list[int] | None = None) -> str:
    """A Markdown table ``| model | width | N |`` over each spec's width ladder (or ``widths``)."""
    lines = ["| model | width | trainable parameters N |", "|---|---:|---:|"]
    for name in names or sorted(MODELS):
        for width in widths or get_spec(name).widths:
            lines.append(f"| {name} | {width} | {count_parameters(name, width):,} |")
    return "\n".join(lines)
