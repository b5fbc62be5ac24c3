"""The study's presets: which architectures, widths and data budget a ``zoo study`` trains.

A study is a grid: every architecture × its width ladder, each (architecture, width) one
single-epoch run over the same ``max_atoms`` budget, checkpointed at the fractions of the run
``checkpoint_at`` (a geometric ladder, so the data ladder D₁ ⊂ D₂ ⊂ … spans decades). All runs
share one data plan (same seed, budget, atoms per batch, ranks), so the k-th checkpoint of every
run has seen exactly the same atoms (see :mod:`zoo.study.plan`).

Presets
-------
``quick``
    minutes on 2 CPU cores: three tiny widths of each architecture (fewer layers; three, so that
    L(N, D) has its 3 distinct N), 500 atoms (about ten steps of 64 atoms) from the
    first file of the embedded train split, four checkpoints per run, 16 validation structures. A
    smoke test of the whole pipeline (its fits are noise), run end to end by the test suite.
``cpu``
    about two hours on an idle 2-core machine: 3–4 widths per architecture at the registry's depths
    (N from 2e4 to 1.6e6) on 60,000 atoms, six checkpoints from 1/32 of the run
    (``zoo study --preset cpu --dry-run`` prints the estimate and how it was made).
``paper``
    arXiv 2510.09768's ladders for a GPU cluster: the paper's parameter counts N per architecture
    (``/work/shared/data/omol25_scaling_checkpoints.csv``, the published checkpoint table) mapped
    to this zoo's width knobs (eSEN at lmax 4, as the paper's), one epoch of OMol25's neutral subset
    (≈9.2e8 atoms), 8 ranks per run.

>>> from zoo.study.presets import PRESETS
>>> sorted(PRESETS)
['cpu', 'paper', 'quick']
>>> PRESETS["quick"].widths["mpnn"]
(8, 16, 32)
>>> PRESETS["quick"].checkpoint_at
(0.125, 0.25, 0.5, 1.0)
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: the four architectures in the order of the paper's symmetry ladder
ARCHITECTURES = ("mpnn", "mc-egnn", "gemnet-oc", "esen")

#: the paper's compute-frontier exponents γ_c (arXiv 2510.09768; /work/shared/DESIGN.md) and its
#: allocation exponents a ≈ b ≈ 0.5 (N* ∝ C^a, D* ∝ C^b)
PAPER_GAMMA_C = {"mpnn": 0.14, "mc-egnn": 0.17, "gemnet-oc": 0.25, "esen": 0.40}
PAPER_A, PAPER_B = 0.5, 0.5


@dataclass(frozen=True)
class Preset:
    """One study configuration.

    Attributes
    ----------
    name : preset key.
    description : one line for the report.
    widths : ``{architecture: (w₁, w₂, …)}`` width ladder per architecture (registry width knobs).
    max_atoms : D_max, the data budget of every run in atoms (``None``: the whole train split).
    checkpoint_at : fractions of the run's steps at which every run validates and checkpoints;
        the data ladder D_k ≈ fraction_k · D_max.
    atoms_per_batch : atoms per rank and step.
    ranks : ranks per run (1: single-process runs, ``parallel`` of them side by side).
    parallel : runs at the same time on this machine (``ranks × parallel`` ≤ cores or GPUs).
    val_structures : size of the study's fixed validation set (the first structures of the
        validation split, in file order).
    train, val : where the raw splits are (relative to the repository or absolute).
    seed : model initialisation and data order, the same for every run.
    shuffle_buffer : structures per shuffle buffer of the training stream.
    log_every : steps between a run's metric lines (what the live table shows).
    model_args : ``{architecture: {key: value}}`` constructor overrides.
    throughput_note : how a time or GPU-hour estimate was made (for ``--dry-run``).
    gpu_flops : for cluster presets, the assumed *achieved* FLOP/s per GPU (peak × MFU).
    """

    name: str
    description: str
    widths: dict
    max_atoms: int | None
    checkpoint_at: tuple[float, ...]
    atoms_per_batch: int = 128
    ranks: int = 1
    parallel: int = 2
    val_structures: int = 200
    train: str = "data/omol25_sample/train"
    val: str = "data/omol25_sample/val"
    seed: int = 0
    shuffle_buffer: int = 256
    log_every: int = 10
    model_args: dict = field(default_factory=dict)
    throughput_note: str = ""
    gpu_flops: float | None = None

    def __post_init__(self) -> None:
        fractions = list(self.checkpoint_at)
        if not fractions or fractions != sorted(fractions) or not 0 < fractions[0] or fractions[-1] != 1.0:
            raise ValueError(f"preset {self.name}: checkpoint_at must increase within (0, 1] and end at 1.0, "
                             f"got {self.checkpoint_at}")
        unknown = set(self.widths) - set(ARCHITECTURES)
        if unknown:
            raise ValueError(f"preset {self.name}: unknown architectures {sorted(unknown)}")


#: the paper's width ladders as parameter counts N (the published checkpoint table's distinct N per
#: architecture, /work/shared/data/omol25_scaling_checkpoints.csv); :func:`zoo.study.plan.paper_widths`
#: maps each to the width of this zoo whose N is nearest
PAPER_N = {
    "mpnn": (222_916, 839_044, 1_294_564, 1_764_633, 2_424_468, 3_250_948, 4_546_197, 6_229_648, 8_538_363,
             12_793_348, 16_106_329, 25_458_016, 30_396_045, 41_763_072, 50_752_516, 78_984_522, 202_168_324),
    "mc-egnn": (1_055_050, 2_745_453, 10_372_498, 26_080_791, 78_480_670),
    "gemnet-oc": (312_992, 575_472, 937_280, 1_398_416, 1_958_880, 2_618_672, 3_377_792, 4_236_240, 5_194_016,
                  6_251_120, 7_407_552, 8_340_060, 13_026_560, 20_234_816),
    "esen": (456_522, 878_434, 1_089_390, 1_300_346, 1_722_258, 2_144_170, 2_566_082, 3_409_906, 4_253_730,
             5_097_554, 6_785_202),
}
#: one epoch of OMol25's neutral subset in atoms (the table's largest D is 9.1e8)
PAPER_ATOMS = 920_000_000
#: H100 dense bf16 peak (NVIDIA H100 SXM datasheet, 989 TFLOP/s) × an assumed 10 % MFU: graph
#: networks with scatter/gather and small matmuls reach far less than transformers' 40–50 %
PAPER_GPU_FLOPS = 989e12 * 0.10

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="quick",
            description="smoke test of the whole pipeline: 3 tiny widths × 4 architectures, 500 atoms",
            widths={"mpnn": (8, 16, 32), "mc-egnn": (8, 16, 32), "gemnet-oc": (4, 8, 16), "esen": (4, 8, 16)},
            max_atoms=500,
            checkpoint_at=(0.125, 0.25, 0.5, 1.0),
            atoms_per_batch=64,
            val_structures=16,
            shuffle_buffer=64,
            log_every=5,
            train="data/omol25_sample/train/data0000.aselmdb",
            model_args={"mpnn": {"num_layers": 2}, "mc-egnn": {"num_layers": 2}, "esen": {"num_layers": 1, "lmax": 1},
                        "gemnet-oc": {"num_blocks": 1}},
            throughput_note="not estimated: minutes",
        ),
        Preset(
            name="cpu",
            description="the mini scaling study on 2 CPU cores: 3-4 widths × 4 architectures (registry depths), "
                        "60,000 atoms each",
            widths={"mpnn": (32, 64, 128, 256), "mc-egnn": (16, 32, 64, 96), "gemnet-oc": (8, 16, 32),
                    "esen": (8, 16, 32, 64)},
            max_atoms=60_000,
            checkpoint_at=(1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0),
            atoms_per_batch=128,
            val_structures=200,
        ),
        Preset(
            name="paper",
            description="arXiv 2510.09768's width ladders (as parameter counts) on one epoch of OMol25 neutral",
            widths={},  # filled from PAPER_N by zoo.study.plan.paper_widths (needs the registry)
            max_atoms=PAPER_ATOMS,
            checkpoint_at=tuple(2.0 ** -k for k in range(9, 0, -1)) + (1.0,),
            atoms_per_batch=2048,
            ranks=8,
            parallel=1,
            val_structures=27_697,
            train="data/omol25/train_neutral",
            val="data/omol25/val_neutral",
            shuffle_buffer=10_000,
            log_every=50,
            model_args={"esen": {"lmax": 4}},  # the paper's eSEN is lmax 4
            throughput_note=("assumed achieved throughput per GPU: 989 TFLOP/s (H100 SXM dense bf16 peak) × 10 % "
                             "MFU = 98.9 TFLOP/s; GPU-hours = step FLOPs (measured κ, training step ≈ 3× forward) "
                             "/ that rate"),
            gpu_flops=PAPER_GPU_FLOPS,
        ),
    )
}


def get_preset(name: str) -> Preset:
    """The preset ``name``; ``KeyError`` listing the known names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None
