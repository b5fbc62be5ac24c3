"""The training job's configuration: defaults (the paper's recipe), command-line flags, DeepSpeed JSON.

The recipe of arXiv 2510.09768 (the scaling study this project implements) that the defaults
follow:

- one epoch over a data budget counted in atoms (``--max-atoms``; default
  :data:`DEFAULT_MAX_ATOMS`, sized for the embedded sample on 2 CPU cores; ``all``: the whole split);
- schedule-free AdamW (Defazio et al. 2024, arXiv 2405.15682) with the learning rate transferred
  across widths as in μP, ``η(w) = η* · w₀ / w`` (:func:`zoo.registry.transferred_lr`; η* and w₀
  per architecture in :data:`zoo.registry.MODELS`);
- loss = per-atom energy MAE + per-atom force L2 norm with equal weights, in units of the training
  force RMS (see :mod:`launcher.loss`);
- direct force heads.

DeepSpeed users may pass their own JSON (``--deepspeed_config FILE``, DeepSpeed's flag): it is
the base; the project's defaults fill what it does not set, and flags typed on the command line
override both (:func:`deepspeed_config`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from datapipe.remote import is_remote
from launcher.errors import EXIT_USER_ERROR, UserError, is_rank0
from zoo.registry import DEFAULT_MODEL, MODELS, count_parameters, get_spec

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "data" / "omol25_sample"

#: Default data budget D (atoms). The whole embedded train split (356,460 atoms) costs the default
#: model at its default width ≈ 2.3e8 FLOPs per atom and step (8e13 in all), ≈ 1 h on 2 CPU cores,
#: and the reference job (`make train`, 2 ranks) must finish in 15 minutes. Measured at this budget
#: (2 CPU ranks, ZeRO-2): 512 s wall including the first shard conversion, final validation force
#: MAE 236.7 meV/Å vs 601.3 for zero forces. `--max-atoms all`: whole split. The final checkpoint
#: also validates on the whole validation split (1,770 structures, 43,740 atoms, forward only):
#: 62.4 s on one CPU thread for that checkpoint (the 200-structure subset: 6.6 s), so ≈ 31 s more
#: for the default job on 2 ranks.
DEFAULT_MAX_ATOMS = 60_000


@dataclass
class TrainConfig:
    """Everything a training run depends on (saved as ``RUN_DIR/config.json`` and in checkpoints)."""

    model: str = DEFAULT_MODEL
    width: int | None = None
    model_overrides: dict = field(default_factory=dict)
    direct_forces: bool = True
    symmetry_loss: int = 0  # M Haar-random rotated copies per batch (arXiv 2510.09768's ablation)
    compile: bool = False  # the model's tensor program through torch.compile (ForceField.enable_compile)
    cpu_matmul: str = "onednn"  # fp32 CPU products of zoo.models.dense layers: "onednn" or "blas" (docs/zoo.md)
    # data
    train: str = str(DEFAULT_DATA / "train")
    val: str = str(DEFAULT_DATA / "val")
    shards: str | None = None  # converted shards; default: the project's cache keyed by the inputs (launcher.data)
    max_atoms: int | None = DEFAULT_MAX_ATOMS  # data budget D in atoms (global); None = the whole split
    atoms_per_batch: int = 128  # per rank and step
    shuffle_buffer: int = 256
    num_workers: int = 0
    max_val_structures: int | None = 200  # validation subset (first structures in index order); None = all
    # optimisation
    lr: float | None = None  # None: the registry spec's transferred learning rate
    base_lr: float | None = None  # None: the spec's η*
    lr_width: int | None = None  # None: the spec's w₀
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_fraction: float = 0.02
    seed: int = 0
    # engine
    engine: str = "deepspeed"  # deepspeed (ZeRO 0-3) or fsdp (FSDP2 fully_shard, torchrun)
    fsdp_units: str = "auto"  # auto: per block for direct forces, the root only for conservative
    activation_checkpointing: bool = False  # recompute each repeated block in the backward
    offload_optimizer: bool = False  # DeepSpeed ZeRO 1-3: optimizer state and step on the CPU
    offload_params: bool = False  # DeepSpeed ZeRO-3: parameters on the CPU between uses
    zero_stage: int = 2
    precision: str = "auto"  # auto: bf16 on CUDA that supports it, else fp32
    deepspeed_config: str | None = None
    deepspeed_overrides: dict = field(default_factory=dict)  # flags the user typed
    # bookkeeping
    run_dir: str | None = None
    checkpoint_fraction: float = 0.1  # checkpoint (and validate) every 10 % of the run
    checkpoint_at: list[float] | None = None  # instead: at these fractions of the run (and the end)
    log_every: int = 10
    keep_engine_state: int = 2  # checkpoints that keep the resumable engine state (weights: every one)
    resume: str | None = None
    # faults (launcher.health, launcher.engine)
    max_consecutive_skips: int = 5  # stop after this many skipped (non-finite) steps in a row; 0 = never
    skip_bad_shards: bool = False  # skip (count, record) unreadable structures instead of stopping
    dist_timeout_s: float = 1800.0  # how long a rank waits for the others (joining, any collective)
    # fine-tuning (launcher.finetune)
    init_from: str | None = None  # release name or checkpoint dir to start from
    keep_normalization: bool = False  # keep the pretrained element references and force RMS
    freeze: list = field(default_factory=list)  # fnmatch patterns of parameter names not trained
    init_record: dict | None = None  # filled by launcher.finetune: what the run started from
    model_flags: dict = field(default_factory=dict)  # model flags the user typed (checked against --init-from)

    def learning_rate(self, width: int) -> float:
        """The learning rate of this run (explicit ``lr`` or the width-transferred one)."""
        if self.lr is not None:
            return self.lr
        if self.init_record is not None:
            return self.init_record["lr_default"]
        return get_spec(self.model).learning_rate(width, self.base_lr, self.lr_width)

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_json(cls, data: dict) -> TrainConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if "betas" in known:
            known["betas"] = tuple(known["betas"])
        return cls(**known)


def _fractions(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions, got {text!r}") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"fractions must lie in (0, 1], got {text!r}")
    return sorted(set(values))


def _key_value(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _budget(text: str) -> int | None:
    if text.lower() in ("all", "none"):
        return None
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line, from rank 0 only, and exits with status 2."""

    def error(self, message: str):
        if is_rank0():
            print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR)


class _Help(argparse.HelpFormatter):
    """Shows a flag's default unless it is unset (None, False, empty) or the help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, [], argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def parser() -> argparse.ArgumentParser:
    """The command-line surface of ``launcher/train.py``."""
    d = TrainConfig()
    p = _Parser(
        prog="launcher/train.py",
        description="Train a zoo model on OMol25-format shards with DeepSpeed (paper recipe by default).",
        formatter_class=_Help,
    )
    p.add_argument("--model", default=None, choices=sorted(MODELS), help=f"registry name (default: {d.model})")
    p.add_argument("--width", type=int, default=None, help="model width (default: the registry spec's)")
    p.add_argument("--model-arg", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                   help="constructor override (VALUE parsed as JSON), repeatable")
    p.add_argument("--conservative", action="store_true", help="forces as -dE/dpositions (default: direct head)")
    p.add_argument("--compile", action="store_true",
                   help="run the training model through torch.compile (ForceField.enable_compile), both "
                        "force modes; refused for an architecture that does not compile (docs/compile.md)")
    p.add_argument("--cpu-matmul", choices=("onednn", "blas"), default=d.cpu_matmul,
                   help="where the fp32 CPU matrix products of the models' zoo.models.dense layers run: oneDNN (AVX-512 on AMD CPUs, "
                        "where MKL runs AVX2) or the BLAS torch was built with (the products of releases before "
                        "2026-12, bit for bit); the two agree to fp32 round-off (docs/zoo.md)")
    p.add_argument("--symmetry-loss", type=int, default=d.symmetry_loss, metavar="M",
                   help="add M Haar-random rotated copies of every batch; loss averaged over the M+1 copies "
                        "(FLOPs counted x(M+1); atoms seen count the original batch only)")
    p.add_argument("--train", default=d.train, help="train split: .aselmdb files/dir, or a shard dir or its http(s):// URL / pipe: command")
    p.add_argument("--val", default=d.val, help="validation split: .aselmdb files/dir, or a shard dir or its http(s):// URL / pipe: command")
    p.add_argument("--shards", default=None,
                   help="directory for the converted shards of raw --train/--val (default: the project's cache, "
                        "keyed by the inputs' identity; refuses a directory holding other data)")
    p.add_argument("--max-atoms", type=_budget, default=d.max_atoms,
                   help="data budget D in atoms, or 'all' for the whole train split")
    p.add_argument("--atoms-per-batch", type=int, default=d.atoms_per_batch, help="atoms per rank and step")
    p.add_argument("--shuffle-buffer", type=int, default=d.shuffle_buffer, help="structures per shuffle buffer")
    p.add_argument("--num-workers", type=int, default=d.num_workers, help="loader worker processes per rank")
    p.add_argument("--max-val-structures", type=_budget, default=d.max_val_structures,
                   help="validate on the first N structures of the split (same subset at every checkpoint; the final checkpoint also validates on the whole split), or 'all'")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: base-lr * lr-width / width)")
    p.add_argument("--base-lr", type=float, default=None,
                   help="eta*: LR tuned at --lr-width (default per architecture: "
                        + ", ".join(f"{n} {m.base_lr:g}" for n, m in sorted(MODELS.items())) + ")")
    p.add_argument("--lr-width", type=int, default=None,
                   help="w0: width where --base-lr was tuned (default per architecture: "
                        + ", ".join(f"{n} {m.lr_width}" for n, m in sorted(MODELS.items())) + ")")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="decoupled weight decay")
    p.add_argument("--warmup-fraction", type=float, default=d.warmup_fraction, help="schedule-free LR warm-up, fraction of the run's steps")
    p.add_argument("--seed", type=int, default=d.seed, help="model init and data order")
    p.add_argument("--engine", choices=("deepspeed", "fsdp"), default=d.engine,
                   help="deepspeed: ZeRO stages 0-3; fsdp: FSDP2 fully_shard (start with torchrun)")
    p.add_argument("--fsdp-units", choices=("auto", "blocks", "root"), default=d.fsdp_units,
                   help="FSDP units: per block (direct forces) or the root only (conservative forces; "
                        "auto picks the exact one)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each repeated block's activations in the backward (less memory, ~1 more forward)")
    p.add_argument("--offload-optimizer", action="store_true",
                   help="DeepSpeed ZeRO 1-3: keep the optimizer state and run its step on the CPU")
    p.add_argument("--offload-params", action="store_true", help="DeepSpeed ZeRO-3: keep parameters on the CPU")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=None, help="ZeRO stage (default 2)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default=None,
                   help="auto: bf16 on CUDA with bf16 support, fp32 otherwise")
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default=None,
                   help="DeepSpeed JSON taken as the base config")
    p.add_argument("--run-dir", default=None, help="default: runs/<model>-w<width>-<time>")
    p.add_argument("--checkpoint-fraction", type=float, default=d.checkpoint_fraction,
                   help="checkpoint and validate every this fraction of the run (and at the end)")
    p.add_argument("--checkpoint-at", type=_fractions, default=None, metavar="F1,F2,...",
                   help="checkpoint and validate at these fractions of the run's steps (and at the end) "
                        "instead of every --checkpoint-fraction, e.g. a geometric data ladder 0.125,0.25,0.5")
    p.add_argument("--log-every", type=int, default=d.log_every, help="steps between metric lines")
    p.add_argument("--keep-engine-state", type=int, default=d.keep_engine_state, metavar="K",
                   help="keep the resumable engine state (optimizer, ZeRO partitions) of only the last K "
                        "checkpoints; the weights and metadata of every checkpoint are kept")
    p.add_argument("--resume", default=None, help="RUN_DIR or checkpoint dir to continue (same run)")
    p.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
    p.add_argument("--max-consecutive-skips", type=int, default=d.max_consecutive_skips,
                   help="stop after this many consecutive steps skipped for a non-finite loss or gradient (0: never)")
    p.add_argument("--skip-bad-shards", action="store_true",
                   help="skip the structures of a shard that cannot be read (counted, recorded in checkpoints, not "
                        "in D) instead of stopping the run")
    p.add_argument("--dist-timeout", type=float, default=d.dist_timeout_s, metavar="SECONDS",
                   help="how long a rank waits for the others to join or to reach a collective before it stops")
    p.add_argument("--init-from", default=None, metavar="NAME|DIR",
                   help="fine-tune: start from a release model (`zoo list`) or checkpoint dir; its architecture, "
                        "width and overrides are used (contradicting flags are refused); default LR: the "
                        "checkpoint's training LR x 0.3 (launcher.finetune.FINETUNE_LR_FACTOR)")
    p.add_argument("--keep-normalization", action="store_true",
                   help="with --init-from: keep the pretrained element references and force RMS instead of "
                        "re-fitting them to the new training data")
    p.add_argument("--freeze", action="append", default=[], metavar="PATTERN",
                   help="with --init-from: do not train parameters whose name matches this fnmatch pattern "
                        "(e.g. 'embedding*'), repeatable; `python -m launcher.finetune NAME` lists the names")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def parse(argv: list[str] | None = None) -> TrainConfig:
    """Parse the command line into a :class:`TrainConfig` (checks values, raises ``SystemExit``).

    >>> from zoo.registry import MODELS
    >>> name = sorted(MODELS)[0]                  # any architecture of the registry
    >>> cfg = parse(["--model", name, "--width", "128"])
    >>> cfg.model == name, cfg.width, cfg.zero_stage, cfg.direct_forces
    (True, 128, 2, True)
    >>> cfg.learning_rate(cfg.width) == MODELS[name].learning_rate(128)   # the registry's transfer rule
    True
    """
    p = parser()
    a = p.parse_args(argv)
    try:
        check_ranges(a)
    except UserError as error:
        p.error(str(error))
    if a.max_consecutive_skips < 0:
        p.error("--max-consecutive-skips must be >= 0")
    if not a.dist_timeout > 0:
        p.error("--dist-timeout must be > 0 seconds")
    refusal = get_spec(a.model or DEFAULT_MODEL).model_class.compile_refusal if a.compile else None
    if refusal is not None:
        p.error(f"--compile is not offered for --model {a.model or DEFAULT_MODEL}: {refusal}; drop --compile")
    if a.compile and a.engine == "fsdp":
        p.error("--compile is offered with --engine deepspeed only (FSDP builds its model on the meta device "
                "inside the engine, after the point where the model is compiled); drop --compile or use "
                "--engine deepspeed")
    explicit = {}
    if a.zero_stage is not None:
        explicit["zero_stage"] = a.zero_stage
    if a.precision is not None:
        explicit["precision"] = a.precision
    if (a.keep_normalization or a.freeze) and not a.init_from:
        p.error("--keep-normalization and --freeze need --init-from")
    if a.init_from and a.resume:
        p.error("--init-from starts a new run; --resume continues one: give only one")
    typed = {"model": a.model, "width": a.width, "model_overrides": dict(a.model_arg),
             "direct_forces": False if a.conservative else None} if a.init_from else {}
    return TrainConfig(
        model=a.model or DEFAULT_MODEL,
        width=a.width,
        model_overrides=dict(a.model_arg),
        direct_forces=not a.conservative,
        compile=a.compile,
        cpu_matmul=a.cpu_matmul,
        symmetry_loss=a.symmetry_loss,
        train=a.train,
        val=a.val,
        shards=a.shards,
        max_atoms=a.max_atoms,
        atoms_per_batch=a.atoms_per_batch,
        shuffle_buffer=a.shuffle_buffer,
        num_workers=a.num_workers,
        max_val_structures=a.max_val_structures,
        lr=a.lr,
        base_lr=a.base_lr,
        lr_width=a.lr_width,
        weight_decay=a.weight_decay,
        warmup_fraction=a.warmup_fraction,
        seed=a.seed,
        engine=a.engine,
        fsdp_units=a.fsdp_units,
        activation_checkpointing=a.activation_checkpointing,
        offload_optimizer=a.offload_optimizer,
        offload_params=a.offload_params,
        zero_stage=explicit.get("zero_stage", 2),
        precision=explicit.get("precision", "auto"),
        deepspeed_config=a.deepspeed_config,
        deepspeed_overrides=explicit,
        run_dir=a.run_dir,
        checkpoint_fraction=a.checkpoint_fraction,
        checkpoint_at=a.checkpoint_at,
        log_every=a.log_every,
        keep_engine_state=a.keep_engine_state,
        resume=a.resume,
        max_consecutive_skips=a.max_consecutive_skips,
        skip_bad_shards=a.skip_bad_shards,
        dist_timeout_s=a.dist_timeout,
        init_from=a.init_from,
        keep_normalization=a.keep_normalization,
        freeze=list(a.freeze),
        model_flags=typed,
    )


def check_ranges(a: argparse.Namespace) -> None:
    """Refuse any flag outside its range, a missing path, or a model that cannot be built.

    The model (architecture, ``--width``, ``--model-arg``) is built on the meta device, so a bad
    width or constructor override is caught before any work, at no memory cost.

    Raises
    ------
    UserError naming the flag, its value and the allowed range.
    """
    def need(ok: bool, flag: str, value, rule: str) -> None:
        if not ok:
            raise UserError(f"{flag} {value}: {rule}")

    for name in ("atoms_per_batch", "shuffle_buffer", "log_every", "keep_engine_state"):
        value = getattr(a, name)
        need(value >= 1, f"--{name.replace('_', '-')}", value, "must be >= 1")
    if a.width is not None:
        need(a.width >= 1, "--width", a.width, "must be >= 1")
    if a.lr_width is not None:
        need(a.lr_width >= 1, "--lr-width", a.lr_width, "must be >= 1")
    for flag, value in (("--lr", a.lr), ("--base-lr", a.base_lr)):
        if value is not None:
            need(math.isfinite(value) and value > 0, flag, value, "must be a positive number")
    need(a.num_workers >= 0, "--num-workers", a.num_workers, "must be >= 0")
    need(a.symmetry_loss >= 0, "--symmetry-loss", a.symmetry_loss, "must be >= 0")
    need(a.seed >= 0, "--seed", a.seed, "must be >= 0")
    need(math.isfinite(a.weight_decay) and a.weight_decay >= 0, "--weight-decay", a.weight_decay, "must be >= 0")
    need(0 <= a.warmup_fraction < 1, "--warmup-fraction", a.warmup_fraction, "must be in [0, 1)")
    need(0 < a.checkpoint_fraction <= 1, "--checkpoint-fraction", a.checkpoint_fraction, "must be in (0, 1]")
    # One process checks its paths here, at once. With several ranks a path may exist on one node and
    # not on another, and a rank that stopped here would only be missed by the others: set-up checks
    # them on every rank together and names the ranks that lack them (launcher.nodes).
    one_process = os.environ.get("WORLD_SIZE", "1") in ("", "1")
    for flag, path in (("--train", a.train), ("--val", a.val), ("--resume", a.resume),
                       ("--deepspeed_config", a.deepspeed_config)):
        if path is not None and one_process and not (flag in ("--train", "--val") and is_remote(path)):  # URLs: read on load
            need(Path(path).exists(), flag, path, "no such file or directory")
    if a.resume is None and getattr(a, "init_from", None) is None:  # --init-from: the checkpoint's model
        overrides, model = dict(a.model_arg), a.model or DEFAULT_MODEL
        try:
            count_parameters(model, a.width, direct_forces=not a.conservative, **overrides)
        except (TypeError, ValueError, KeyError) as error:
            shown = " ".join(f"--model-arg {k}={v}" for k, v in overrides.items())
            raise UserError(f"--model {model} --width {a.width or get_spec(model).default_width} {shown}"
                            f": cannot build the model ({error})".replace("  :", ":")) from error
