"""Per-rank memory of a training configuration, before it starts: behind ``zoo plan`` and the launcher.

For N parameters on W ranks (bytes; schedule-free AdamW keeps two fp32 states, ``z`` and
``exp_avg_sq``, i.e. 8N bytes; ZeRO paper, Rajbhandari et al. 2020, arXiv 1910.02054, Sec. 3):

=================  ============  ==============  ====================  =========================
engine             weights       gradients       optimizer (+ master)  working set (buffers)
=================  ============  ==============  ====================  =========================
ZeRO-0             b·N           b·N (+4N bf16)  8N                    —
ZeRO-1             b·N           b·N             (8 + 4)·N / W         reduce + all-gather buckets
ZeRO-2             b·N           b·N / W         (8 + 4)·N / W         reduce + all-gather buckets
ZeRO-3             b·N / W       b·N / W         (8 + 4)·N / W         largest block gathered ×2 + reduce bucket
FSDP per block     4N / W        4N / W          8N / W                largest block unsharded ×2
FSDP root only     4N / W        4N / W          8N / W                whole model unsharded
=================  ============  ==============  ====================  =========================

(b = 4 for fp32, 2 for bf16; DeepSpeed keeps an fp32 master partition of the weights in
ZeRO 1–3; ZeRO-3's reduce bucket is allocated whole, min(5e8, N) elements as the launcher sets
it.) Optimizer offload moves the optimizer column to the CPU, ZeRO-3 parameter offload the
weights column; FSDP2's ``CPUOffloadPolicy`` moves weights, gradients and optimizer together.
Activations = measured saved-tensor bytes per atom
(:mod:`zoo.plan.activations`, on the model's own graph) × atoms per batch (× ½ in bf16);
activation checkpointing keeps only each block's inputs plus one block. A fixed
:data:`RUNTIME_BYTES` covers the framework's own context.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

#: the framework's own memory per rank (CUDA context, allocator slack, communication buffers), bytes
RUNTIME_BYTES = 1.5 * 2**30
#: DeepSpeed's default ZeRO-1/2 reduce and all-gather bucket sizes (elements, each)
BUCKET_ELEMENTS = 5 * 10**8
#: usable share of the device's memory (fragmentation headroom)
USABLE = 0.9


@dataclass
class Plan:
    """One configuration's per-rank memory (bytes) and whether it fits."""

    engine: str  # "deepspeed" or "fsdp"
    stage: int | str  # ZeRO stage, or the FSDP units ("blocks" / "root")
    activation_checkpointing: bool
    offload: str  # "", "optimizer", "optimizer+params"
    weights: float
    gradients: float
    optimizer: float
    activations: float
    buffers: float
    fits: bool = False
    allowed: bool = True  # False: not exact for this force mode (refused by the launcher)

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.buffers + RUNTIME_BYTES

    def flags(self) -> str:
        """The launcher flags of this configuration."""
        parts = [f"--engine {self.engine}"]
        parts.append(f"--zero-stage {self.stage}" if self.engine == "deepspeed" else f"--fsdp-units {self.stage}")
        if self.activation_checkpointing:
            parts.append("--activation-checkpointing")
        if "optimizer" in self.offload:
            parts.append("--offload-optimizer")
        if "params" in self.offload:
            parts.append("--offload-params")
        return " ".join(parts)

    def to_json(self) -> dict:
        return {**asdict(self), "total": self.total, "flags": self.flags()}


def plan_one(engine: str, stage, n_params: int, largest_block: int, world: int, precision: str,
             activations_per_atom: float, atoms: int, checkpointing: bool, offload: str,
             memory: float) -> Plan:
    """Per-rank memory of one configuration (see the module docstring's table)."""
    b = 2 if precision == "bf16" else 4
    n, w = float(n_params), float(world)
    if engine == "deepspeed":
        weights = b * n / (w if stage == 3 else 1)
        gradients = b * n / (w if stage >= 2 else 1) + (4 * n if stage == 0 and b == 2 else 0)
        optimizer = 8 * n if stage == 0 else (8 + 4) * n / w
        if stage in (1, 2):
            buffers = 2 * min(BUCKET_ELEMENTS, n) * b
        elif stage == 3:  # two blocks gathered (one prefetched) + the gradient bucket (launcher.engine sizes it)
            buffers = 2 * largest_block * b + min(BUCKET_ELEMENTS, n) * b
        else:
            buffers = 0.0
    else:
        weights, gradients, optimizer = 4 * n / w, 4 * n / w, 8 * n / w
        unit = largest_block if stage == "blocks" else n
        buffers = (2 if stage == "blocks" else 1) * unit * (b + 4)  # unsharded weights + their gradients
    if "optimizer" in offload:
        optimizer = 0.0
    if "params" in offload:
        weights = 0.0
        if engine == "fsdp":  # CPUOffloadPolicy: sharded gradients go to the host as well
            gradients = 0.0
    activations = activations_per_atom * atoms * (0.5 if b == 2 else 1.0)
    plan = Plan(engine, stage, checkpointing, offload, weights, gradients, optimizer, activations, buffers)
    plan.fits = plan.total <= USABLE * memory
    return plan


def plan_all(n_params: int, largest_block: int, world: int, precision: str, activations: dict, atoms: int,
             memory: float, conservative: bool) -> list[Plan]:
    """Every configuration the launcher knows, in order of preference (least communication and
    recomputation first); those not exact for conservative forces are marked ``allowed=False``."""
    options = []
    for checkpointing in (False, True):
        per_atom = activations["per_atom_checkpointed" if checkpointing else "per_atom"]
        for engine, stage in (("deepspeed", 1), ("deepspeed", 2), ("deepspeed", 3), ("fsdp", "blocks"),
                              ("fsdp", "root")):
            offloads = [""] + (["optimizer"] if engine == "deepspeed" else []) + \
                (["optimizer+params"] if stage in (3, "blocks", "root") else [])
            for offload in offloads:
                plan = plan_one(engine, stage, n_params, largest_block, world, precision, per_atom, atoms,
                                checkpointing, offload, memory)
                plan.allowed = not conservative or stage in (1, 2, "root")
                options.append(plan)
    return options


def recommend(plans: list[Plan]) -> Plan | None:
    """The first allowed configuration that fits (the list is in order of preference), or None."""
    return next((p for p in plans if p.allowed and p.fits), None)


def parse_memory(text: str) -> float:
    """``"80GB"``, ``"80GiB"``, ``"141 GB"`` or a number of bytes → bytes (GB = 10⁹, GiB = 2³⁰)."""
    units = {"tib": 2**40, "gib": 2**30, "mib": 2**20, "tb": 1e12, "gb": 1e9, "mb": 1e6, "b": 1}
    value = text.strip().lower().replace(" ", "")
    for unit, scale in units.items():
        if value.endswith(unit):
            return float(value[: -len(unit)]) * scale
    return float(value)
