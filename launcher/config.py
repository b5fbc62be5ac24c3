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
import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from zoo.registry import DEFAULT_MODEL, MODELS, get_spec

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
    compile: bool = False  # the training model's interact() through torch.compile (direct forces only)
    # data
    train: str = str(DEFAULT_DATA / "train")
    val: str = str(DEFAULT_DATA / "val")
    shards: str | None = None  # cache of converted shards; default <train>/../shards
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
    zero_stage: int = 2
    precision: str = "auto"  # auto: bf16 on CUDA that supports it, else fp32
    deepspeed_config: str | None = None
    deepspeed_overrides: dict = field(default_factory=dict)  # flags the user typed
    # bookkeeping
    run_dir: str | None = None
    checkpoint_fraction: float = 0.1  # checkpoint (and validate) every 10 % of the run
    log_every: int = 10
    resume: str | None = None

    def learning_rate(self, width: int) -> float:
        """The learning rate of this run (explicit ``lr`` or the width-transferred one)."""
        if self.lr is not None:
            return self.lr
        return get_spec(self.model).learning_rate(width, self.base_lr, self.lr_width)

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_json(cls, data: dict) -> TrainConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if "betas" in known:
            known["betas"] = tuple(known["betas"])
        return cls(**known)


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
    p = argparse.ArgumentParser(
        prog="launcher/train.py",
        description="Train a zoo model on OMol25-format shards with DeepSpeed (paper recipe by default).",
        formatter_class=_Help,
    )
    p.add_argument("--model", default=d.model, choices=sorted(MODELS), help="registry name")
    p.add_argument("--width", type=int, default=None, help="model width (default: the registry spec's)")
    p.add_argument("--model-arg", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                   help="constructor override (VALUE parsed as JSON), repeatable")
    p.add_argument("--conservative", action="store_true", help="forces as -dE/dpositions (default: direct head)")
    p.add_argument("--compile", action="store_true",
                   help="run the training model through torch.compile (ForceField.enable_compile); "
                        "direct forces only (conservative training needs a double backward)")
    p.add_argument("--symmetry-loss", type=int, default=d.symmetry_loss, metavar="M",
                   help="add M Haar-random rotated copies of every batch; loss averaged over the M+1 copies "
                        "(FLOPs counted x(M+1); atoms seen count the original batch only)")
    p.add_argument("--train", default=d.train, help="train split: .aselmdb files/dir, or a shard dir")
    p.add_argument("--val", default=d.val, help="validation split: .aselmdb files/dir, or a shard dir")
    p.add_argument("--shards", default=None, help="shard cache (default: <train>/../shards)")
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
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=None, help="ZeRO stage (default 2)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default=None,
                   help="auto: bf16 on CUDA with bf16 support, fp32 otherwise")
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default=None,
                   help="DeepSpeed JSON taken as the base config")
    p.add_argument("--run-dir", default=None, help="default: runs/<model>-w<width>-<time>")
    p.add_argument("--checkpoint-fraction", type=float, default=d.checkpoint_fraction,
                   help="checkpoint and validate every this fraction of the run (and at the end)")
    p.add_argument("--log-every", type=int, default=d.log_every, help="steps between metric lines")
    p.add_argument("--resume", default=None, help="RUN_DIR or checkpoint dir to continue (same run)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def parse(argv: list[str] | None = None) -> TrainConfig:
    """Parse the command line into a :class:`TrainConfig` (checks values, raises ``SystemExit``)."""
    p = parser()
    a = p.parse_args(argv)
    for name in ("atoms_per_batch", "shuffle_buffer", "log_every"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.symmetry_loss < 0:
        p.error("--symmetry-loss must be >= 0")
    if a.compile and a.conservative:
        p.error("--compile cannot train conservative forces: their loss needs a double backward, which "
                "torch.compile'd graphs (AOTAutograd) do not support; drop --compile or --conservative")
    if not 0 < a.checkpoint_fraction <= 1:
        p.error("--checkpoint-fraction must be in (0, 1]")
    explicit = {}
    if a.zero_stage is not None:
        explicit["zero_stage"] = a.zero_stage
    if a.precision is not None:
        explicit["precision"] = a.precision
    return TrainConfig(
        model=a.model,
        width=a.width,
        model_overrides=dict(a.model_arg),
        direct_forces=not a.conservative,
        compile=a.compile,
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
        zero_stage=explicit.get("zero_stage", 2),
        precision=explicit.get("precision", "auto"),
        deepspeed_config=a.deepspeed_config,
        deepspeed_overrides=explicit,
        run_dir=a.run_dir,
        checkpoint_fraction=a.checkpoint_fraction,
        log_every=a.log_every,
        resume=a.resume,
    )


def _merge(base: dict, extra: dict) -> dict:
    """Recursive dict merge: ``extra`` wins."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def deepspeed_config(cfg: TrainConfig, bf16_supported: bool) -> dict:
    """The DeepSpeed JSON of the run: project defaults < user's file < explicit flags.

    The micro batch is one packed graph batch per rank and step (batches are packed by atoms,
    not counted in structures), so ``train_micro_batch_size_per_gpu`` is 1 and gradient
    accumulation is 1; these, and the optimizer (schedule-free AdamW, built by the launcher),
    cannot be set in the user's file.

    Raises
    ------
    ValueError
        if the user's file sets ``optimizer``/``scheduler``, gradient accumulation > 1 or fp16;
        for ZeRO-3 with conservative forces. Their double backward needs the weights gathered
        after the forward, which ZeRO-3 releases. Making the whole model one ZeRO-3 leaf module
        (``deepspeed.utils.set_z3_leaf_modules``, docs/FEASIBILITY.md) gets past that, but then failed
        in DeepSpeed 0.19.8's ``zero_grad`` on CPU ("unknown parameter type" from
        ``record_stream``), and would gather every weight on every rank anyway.
    """
    defaults = {
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    user = {}
    if cfg.deepspeed_config:
        path = Path(cfg.deepspeed_config)
        if not path.is_file():
            raise FileNotFoundError(f"--deepspeed_config {path}: no such file")
        user = json.loads(path.read_text())
        for key in ("optimizer", "scheduler"):
            if key in user:
                raise ValueError(
                    f"--deepspeed_config {path}: remove {key!r}; the launcher builds schedule-free AdamW "
                    "(set its learning rate with --lr / --base-lr)"
                )
        if int(user.get("gradient_accumulation_steps", 1)) != 1:
            raise ValueError(f"--deepspeed_config {path}: gradient_accumulation_steps must be 1")
        if user.get("fp16", {}).get("enabled", False):
            raise ValueError(f"--deepspeed_config {path}: fp16 is not supported (use bf16)")
    config = _merge(defaults, user)
    stage = cfg.deepspeed_overrides.get("zero_stage", config.get("zero_optimization", {}).get("stage", 2))
    config = _merge(config, {"zero_optimization": {"stage": int(stage)}})
    if int(stage) == 3:
        # ZeRO-3's memory-efficient linear replaces torch.nn.functional.linear process-wide by an
        # autograd.Function that the FLOP counter cannot see into; the plain linear is counted.
        config["zero_optimization"].setdefault("memory_efficient_linear", False)
    precision = cfg.deepspeed_overrides.get("precision")
    if precision is None and "bf16" in user:
        bf16 = bool(user["bf16"].get("enabled", False))
    else:
        precision = precision or "auto"
        bf16 = bf16_supported if precision == "auto" else precision == "bf16"
    if bf16 and not bf16_supported:
        raise ValueError("bf16 asked for but this device does not support it (use --precision fp32)")
    config["bf16"] = {**config.get("bf16", {}), "enabled": bf16}
    config.pop("train_batch_size", None)
    config["train_micro_batch_size_per_gpu"] = 1
    config["gradient_accumulation_steps"] = 1
    if int(stage) == 3 and not cfg.direct_forces:
        raise ValueError("ZeRO-3 cannot train conservative forces (their double backward needs weights that "
                         "ZeRO-3 releases after the forward); use --zero-stage 1 or 2, or direct forces")
    return config
