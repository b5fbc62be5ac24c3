"""The study's plan: its runs, their shared data, their data ladder and what they will cost.

Shared data
-----------
:func:`prepare_data` converts the training split once into ``OUT/data/train`` and writes the
study's fixed validation set — the first ``val_structures`` structures of the validation split in
file order — into ``OUT/data/val``. Every run gets these two shard directories, so every run uses
the same element references and force RMS (both from the training index) and validates on the
same structures; losses are comparable across the study.

The data ladder (why D₁ ⊂ D₂ ⊂ …)
----------------------------------
:func:`datapipe.plan.build_plan` orders the training stream in a seeded global order (shard
permutation, rows in stored order) and, under a budget ``max_atoms``, selects the longest
*prefix* of that order within the budget; the selection is then cut into streams, shuffled with a
seeded shuffle buffer and packed into batches. A run's k-th checkpoint has therefore seen exactly
the first ``s_k`` batches of its stream, and ``D(s_k) ⊂ D(s_{k+1})`` holds by construction. Every run
in the study has the same plan (same shard directory, seed, budget, atoms per batch, ranks and
workers — :func:`data_ladder` returns its ``plan_id``), so the k-th checkpoint of *every* run has
seen the same atoms, whatever the architecture or width. Separately trained smaller budgets
would also select nested sets (a shorter prefix of the same global order), but their shuffled
emission order differs; the study uses checkpoints, as the paper does with a schedule-free
optimizer (no decay phase, so an intermediate checkpoint stands for a shorter run).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from zoo.study.presets import PAPER_N, Preset

REPO = Path(__file__).resolve().parents[2]


@dataclass
class RunSpec:
    """One training run of the study (an architecture at one width)."""

    architecture: str
    width: int
    run_dir: Path
    log: Path
    model_args: dict

    @property
    def name(self) -> str:
        return f"{self.architecture}-w{self.width}"


def parameters_of(architecture: str, width: int, **overrides) -> int:
    """Trainable parameters N of ``architecture`` at ``width`` (meta device), remembered: the paper
    preset's width search and its dry run ask for the same widths (a GemNet-OC build takes ~0.1 s)."""
    return _parameters(architecture, int(width), tuple(sorted(overrides.items())))


@lru_cache(maxsize=None)
def _parameters(architecture: str, width: int, overrides: tuple) -> int:
    from zoo.registry import count_parameters

    return count_parameters(architecture, width, **dict(overrides))


def paper_widths(architecture: str, **overrides) -> tuple[int, ...]:
    """This zoo's widths whose parameter counts are nearest the paper's N ladder of ``architecture``.

    N grows with width, so each target's bracket ``N(w) < target <= N(w + 1)`` over widths 2…8192 is
    unique (parameters counted on the meta device, with the constructor ``overrides``); the nearer end
    is chosen; duplicates removed, order kept. The bracket is searched outward from the width that
    log-log interpolation between the widths counted so far predicts: a few builds per target instead
    of bisection's thirteen, and the same bracket as bisection over 2…8192.
    """
    import numpy as np

    seen: dict[int, int] = {}

    def size(w):
        if w not in seen:
            seen[w] = parameters_of(architecture, w, **overrides)
        return seen[w]

    for w in (8, 128, 2048):
        size(w)
    chosen = []
    for target in PAPER_N[architecture]:
        ws = sorted(seen)
        guess = np.exp(np.interp(np.log(target), np.log([seen[w] for w in ws]), np.log(ws)))
        lo = _last_below(size, target, int(guess), 2, 8191)
        width = min((lo, lo + 1), key=lambda w: abs(size(w) - target))
        if width not in chosen:
            chosen.append(width)
    return tuple(chosen)


def _last_below(size, target: float, guess: int, lo: int, hi: int) -> int:
    """The largest ``w`` in ``[lo, hi]`` with ``size(w) < target`` (``lo`` if there is none), ``size``
    increasing: galloping outward from ``guess`` to a bracket, then bisection inside it."""
    below = above = min(max(guess, lo), hi)
    step = 1
    if size(below) < target:  # gallop up until size(above) >= target or past hi
        while True:
            above = below + step
            if above > hi or size(above) >= target:
                above = min(above, hi + 1)
                break
            below, step = above, step * 2
    else:  # gallop down until size(below) < target or past lo
        while True:
            below = above - step
            if below < lo or size(below) < target:
                below = max(below, lo - 1)
                break
            above, step = below, step * 2
    while above - below > 1:  # size(below) < target <= size(above); the ends may lie just outside [lo, hi]
        mid = (below + above) // 2
        if size(mid) < target:
            below = mid
        else:
            above = mid
    return max(below, lo)


def widths_of(preset: Preset) -> dict[str, tuple[int, ...]]:
    """``{architecture: widths}`` of the preset (the paper preset's from :func:`paper_widths`)."""
    if preset.widths:
        return dict(preset.widths)
    return {a: paper_widths(a, **preset.model_args.get(a, {})) for a in PAPER_N}


def runs_of(preset: Preset, out: Path) -> list[RunSpec]:
    """The study's runs, architecture-major in the order of the symmetry ladder."""
    out = Path(out)
    return [RunSpec(a, w, out / "runs" / f"{a}-w{w}", out / "logs" / f"{a}-w{w}.log", preset.model_args.get(a, {}))
            for a, ladder in widths_of(preset).items() for w in ladder]


def _resolve(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else REPO / p


def prepare_data(preset: Preset, out: Path, workers: int = 2) -> tuple[Path, Path]:
    """Convert the training split and write the fixed validation set once; returns their shard dirs.

    Idempotent: an up-to-date conversion is not redone (:func:`datapipe.convert.convert`).

    Raises
    ------
    ValueError / RuntimeError from the conversion (a missing or unreadable input, named);
    ValueError if the validation split holds fewer than ``val_structures`` valid structures.
    """
    from datapipe.convert import convert
    from datapipe.sources import check, expand_inputs, iter_atoms

    data = Path(out) / "data"
    train = convert([_resolve(preset.train)], data / "train", shard_size=500, workers=workers)
    subset = data / "val-source" / f"val-first{preset.val_structures}.db"
    if not subset.is_file():
        import ase.db

        subset.parent.mkdir(parents=True, exist_ok=True)
        partial = subset.with_suffix(".partial.db")
        partial.unlink(missing_ok=True)
        taken = 0
        with ase.db.connect(partial, type="db", append=False) as db:
            for path in expand_inputs([_resolve(preset.val)]):
                for row, atoms in enumerate(iter_atoms(path)):
                    if taken == preset.val_structures:
                        break
                    if check(atoms, f"{path.stem}:{row}", path.name)[0] is None:
                        continue  # the converter would reject it too
                    info = {k: atoms.info[k] for k in ("charge", "spin") if k in atoms.info}
                    db.write(atoms, data=info)
                    taken += 1
        if taken < preset.val_structures:
            partial.unlink()
            raise ValueError(f"{preset.val}: {taken} valid structures, the preset needs {preset.val_structures}")
        os.replace(partial, subset)
    val = convert([subset], data / "val", shard_size=max(1, preset.val_structures), workers=1)
    return train.directory, val.directory


def data_ladder(preset: Preset, train_dir: Path | None) -> dict:
    """Checkpoint steps and atoms seen at each of them (all runs share them).

    Returns ``{"steps": total steps, "checkpoint_steps": [s_k], "atoms": [D_k], "plan_id",
    "exact": bool}``; ``exact`` is False when no shards exist yet (a dry run of a preset whose
    data is elsewhere): D_k is then ``fraction_k · max_atoms``.
    """
    fractions = preset.checkpoint_at
    if train_dir is None or not (Path(train_dir) / "index.json").is_file():
        atoms = [round(f * preset.max_atoms) for f in fractions]
        steps = max(1, round(preset.max_atoms / (preset.atoms_per_batch * preset.ranks)))
        return {"steps": steps, "checkpoint_steps": [max(1, round(f * steps)) for f in fractions],
                "atoms": atoms, "plan_id": None, "exact": False}
    import numpy as np

    from datapipe.index import ShardIndex
    from datapipe.plan import build_plan

    plan = build_plan(ShardIndex.load(train_dir), world_size=preset.ranks, num_workers=0,
                      atoms_per_batch=preset.atoms_per_batch, shuffle=True, shuffle_buffer=preset.shuffle_buffer,
                      seed=preset.seed, max_atoms=preset.max_atoms)
    per_step = sum(np.concatenate([s.batch_atoms() for s in rank]) for rank in plan.streams)  # [steps] atoms
    cumulative = np.cumsum(per_step)
    from launcher.job import checkpoint_steps_at

    steps = sorted(checkpoint_steps_at(plan.steps, fractions))
    return {"steps": plan.steps, "checkpoint_steps": steps, "atoms": [int(cumulative[s - 1]) for s in steps],
            "plan_id": plan.plan_id, "exact": True}


def train_command(preset: Preset, run: RunSpec, train_dir: Path, val_dir: Path, resume: bool) -> list[str]:
    """The ``launcher/train.py`` command line of ``run`` (``--resume RUN_DIR`` to continue it)."""
    script = str(REPO / "launcher" / "train.py")
    if preset.ranks > 1:
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={preset.ranks}",
                script]
    else:
        head = [sys.executable, script]
    if resume:
        return head + ["--resume", str(run.run_dir)]
    args = ["--model", run.architecture, "--width", str(run.width), "--train", str(train_dir), "--val", str(val_dir),
            "--max-atoms", str(preset.max_atoms) if preset.max_atoms else "all",
            "--atoms-per-batch", str(preset.atoms_per_batch), "--shuffle-buffer", str(preset.shuffle_buffer),
            "--max-val-structures", "all", "--seed", str(preset.seed),
            "--checkpoint-at", ",".join(f"{f:.10g}" for f in preset.checkpoint_at),
            "--log-every", str(preset.log_every), "--run-dir", str(run.run_dir)]
    for key, value in run.model_args.items():
        args += ["--model-arg", f"{key}={value}"]
    return head + args
