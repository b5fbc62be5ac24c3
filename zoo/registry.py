"""The zoo's registry: one dict of model specs, as torchtitan keeps one ``ModelSpec`` per model.

Everything the rest of the project needs to know about an architecture lives in its spec: the
model class, its width ladder, its learning-rate transfer defaults (η*, w₀), and any step that
must run on training batches before the first optimizer step
(:class:`~zoo.models.base.PretrainHook`: GemNet-OC's
fitted scale factors). What its graph needs is asked of the built model
(:attr:`zoo.models.base.ForceField.data_cutoff`). The launcher names no architecture.

>>> from zoo.registry import MODELS, build, count_parameters
>>> sorted(MODELS)
['esen', 'gemnet-oc', 'mc-egnn', 'mpnn']
>>> model = build("mpnn", width=16, num_layers=1)
>>> model.data_cutoff                              # Å: the graph the loader must build
6.0
>>> count_parameters("esen", width=1024) > 10**8   # built on the meta device: no memory
True
>>> MODELS["mpnn"].learning_rate(256)               # η* · w₀ / w
0.005
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from zoo.models.base import ForceField, PretrainHook
from zoo.models.egnn import MCEGNN
from zoo.models.esen.model import ESEN
from zoo.models.gemnet_oc.model import GemNetOC
from zoo.models.gemnet_oc.scales import SCALE_FACTORS
from zoo.models.mpnn import MPNN

#: The architecture a run trains when none is named (the paper's most symmetric model).
DEFAULT_MODEL = "esen"


def transferred_lr(width: int, base_lr: float, base_width: int) -> float:
    """Learning rate at ``width`` transferred from ``base_lr`` tuned at ``base_width``.

    ``η(w) = η* · w₀ / w`` — the μP rule for Adam-type optimizers' hidden weights (Yang et al.
    2021, arXiv 2203.03466, Table 3), applied to all weights as arXiv 2510.09768 does.

    Raises ``ValueError`` unless ``width, base_width ≥ 1`` and ``base_lr > 0``.

    >>> transferred_lr(128, 3e-3, 64)
    0.0015
    """
    if width < 1 or base_width < 1 or not base_lr > 0:
        raise ValueError(f"need width, base_width >= 1 and base_lr > 0, got {width}, {base_width}, {base_lr}")
    return base_lr * base_width / width


@dataclass(frozen=True)
class ModelSpec:
    """How to build and train one architecture.

    Attributes
    ----------
    name : registry key (``esen``, ``mpnn``, ``mc-egnn``, ``gemnet-oc``).
    model_class : the :class:`~zoo.models.base.ForceField` subclass; it takes ``width`` and keyword overrides.
    default_width : width used when none is given.
    widths : the width ladder of the scaling study (smallest to largest that matter).
    symmetry : what the architecture is constrained to (for reports).
    paper : the paper it implements.
    base_lr, lr_width : η* and the width w₀ it was tuned at; a run at width w uses η* · w₀ / w.
    lr_note : how η* was chosen (the measurements behind it).
    pretrain : a step run on training batches before training (or None).
    defaults : keyword defaults applied before the user's overrides.
    """

    name: str
    model_class: type[ForceField]
    default_width: int
    widths: tuple[int, ...]
    symmetry: str
    paper: str
    base_lr: float
    lr_width: int
    lr_note: str
    pretrain: PretrainHook | None = None
    defaults: dict = field(default_factory=dict)

    def learning_rate(self, width: int, base_lr: float | None = None, lr_width: int | None = None) -> float:
        """The width-transferred learning rate (``base_lr``/``lr_width`` override the spec's)."""
        return transferred_lr(width, self.base_lr if base_lr is None else base_lr,
                              self.lr_width if lr_width is None else lr_width)


#: η* of eSEN, also the default of any new architecture until it is probed.
_ESEN_LR_NOTE = (
    "short sweep on the embedded data, eSEN at width 64 (≈1.6 M parameters; the paper tunes at ≈1 M), "
    "8,000 atoms, 256 atoms per step, validation loss on 200 structures after 33 steps: 1e-3 → 1.1715, "
    "3e-3 → 1.1700, 1e-2 → 1.1765 (flat at this budget; the middle value is taken)"
)

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="esen",
            model_class=ESEN,
            default_width=64,
            widths=(16, 32, 64, 128, 256, 512, 1024),
            symmetry="SO(3)-equivariant spherical tensors (lmax 2-4)",
            paper="Fu et al. 2025, arXiv 2502.12147",
            base_lr=3e-3,
            lr_width=64,
            lr_note=_ESEN_LR_NOTE,
        ),
        ModelSpec(
            name="mpnn",
            model_class=MPNN,
            default_width=128,
            widths=(64, 128, 256, 512, 1024, 2048, 4096),
            symmetry="none (translation invariant only)",
            paper="Gilmer et al. 2017, arXiv 1704.01212; unconstrained baseline of arXiv 2510.09768",
            base_lr=1e-2,
            lr_width=128,
            lr_note=(
                "2 CPU ranks, ZeRO-2, final force MAE on the 200-structure subset (zero-force 601.3 meV/Å): "
                "w64 at 20,000 atoms: 1e-3 → 594.4, 3e-3 → 589.9, 1e-2 → 588.8 (flat); w128 on the whole "
                "train split (356,460 atoms, 1,552 steps): 1.5e-3 (eSEN's transfer) → 561.5, 1e-2 → 509.2"
            ),
        ),
        ModelSpec(
            name="mc-egnn",
            model_class=MCEGNN,
            default_width=96,
            widths=(32, 64, 96, 160, 320, 512, 896, 1024),
            symmetry="E(3)-equivariant Cartesian vectors (l = 1)",
            paper="Satorras et al. 2021, arXiv 2102.09844 (multi-channel variant, Levy et al. 2023)",
            base_lr=1e-2,
            lr_width=64,
            lr_note=(
                "2 CPU ranks, ZeRO-2, 20,000 atoms (87 steps), final force MAE on the 200-structure subset "
                "(zero-force 601.3 meV/Å), w32: 2e-3 → 573.2, 6e-3 (eSEN's transfer) → 546.9, 2e-2 → 496.1; "
                "hence 1e-2 at w₀ = 64 (= 2e-2 at w32)"
            ),
        ),
        ModelSpec(
            name="gemnet-oc",
            model_class=GemNetOC,
            default_width=64,
            widths=(32, 64, 128, 256, 512, 1024),
            symmetry="E(3)-invariant 2-, 3- and 4-body (distances, angles, dihedrals)",
            paper="Gasteiger et al. 2022, arXiv 2204.02782",
            base_lr=3e-3,
            lr_width=64,
            lr_note="not probed (≈ 80 atoms/s at w16 on a 2-core CPU); eSEN's value: " + _ESEN_LR_NOTE,
            pretrain=SCALE_FACTORS,
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
    checkpoint can rebuild it exactly. Raises ``KeyError`` for an unknown name and ``ValueError``
    for a width below 1.
    """
    spec = get_spec(name)
    width = spec.default_width if width is None else int(width)
    if width < 1:
        raise ValueError(f"width must be a positive integer, got {width}")
    kwargs = {**spec.defaults, **overrides}
    model = spec.model_class(width=width, **kwargs)
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
