"""Fine-tuning: ``launcher/train.py --init-from NAME|DIR`` starts a new run from pretrained weights.

What happens (:func:`resolve_init` before the job is built, :func:`apply_init` once the model exists):

1. ``NAME`` (a release model, ``zoo list``) is fetched and verified on rank 0 and its directory
   broadcast; a ``DIR`` is a checkpoint directory. The weights are checked against the SHA-256 in
   its metadata (:func:`zoo.hub.checkpoint.load_model`).
2. The architecture, width and model overrides (force head included) come from the checkpoint.
   ``--model``, ``--width``, ``--model-arg`` or ``--conservative`` typed on the command line must
   agree with it, or the run is refused before any work.
3. The element references (eV) and force RMS (eV/Å) are re-fitted to the new training data by
   default, as for a run from scratch; ``--keep-normalization`` keeps the pretrained ones.
   A pre-training hook's record (fitted scale factors) is taken from the checkpoint, not re-fitted.
4. Learning rate: ``--lr`` if given, else the checkpoint's training learning rate
   (``config.lr_effective``) times :data:`FINETUNE_LR_FACTOR`. The schedule-free optimizer and its
   warm-up start afresh.
5. ``--freeze PATTERN`` (repeatable, :mod:`fnmatch` on parameter names, e.g. ``'embedding*'``)
   takes matching parameters out of the optimizer; a pattern that matches nothing is an error.
   ``python -m launcher.finetune NAME|DIR`` prints the parameter names.
6. Every checkpoint's metadata records ``init_from``: the source, its weights' SHA-256, its
   architecture/width/atoms seen, the frozen patterns and parameter count, and the normalisation choice.

Works with every engine configuration training supports: the weights are loaded into the
single-device model before the engine wraps it.
"""

from __future__ import annotations

import fnmatch
import sys

from launcher.config import TrainConfig
from launcher.engine import Runtime, broadcast_object
from zoo.hub.checkpoint import load_model, read_metadata

#: default fine-tuning LR = the checkpoint's training LR times this. Measured (README, "Pretrained
#: models"): a width-16 model fine-tuned for 175 steps on 200 unseen molecules, validation loss on 200
#: other structures after 88 / 175 steps: × 0.3 → 0.3173 / 0.2933, × 1 → 0.3393 / 0.2926 (from
#: scratch: 0.8333 / 0.5754). The smaller step is better early and equal at the end.
FINETUNE_LR_FACTOR = 0.3


def resolve_init(cfg: TrainConfig, runtime: Runtime) -> TrainConfig:
    """Fill ``cfg`` from the ``--init-from`` checkpoint (rank 0 fetches); no-op without it.

    Raises ``ValueError`` when a typed model flag contradicts the checkpoint, plus the errors of
    :func:`zoo.hub.load.resolve` (unknown name, offline and not cached).
    """
    if not cfg.init_from or cfg.init_record is not None:
        return cfg
    from zoo.hub.load import resolve

    found = None
    if runtime.is_main:
        try:
            found = [str(p) for p in resolve(cfg.init_from, quiet=False)]
        except Exception as err:  # noqa: BLE001 - re-raised on every rank below
            found = f"--init-from {cfg.init_from}: {type(err).__name__}: {err}"
    found = broadcast_object(found)
    if isinstance(found, str):
        raise RuntimeError(found)
    directory, repair = found
    meta = read_metadata(directory)
    overrides = dict(meta.get("config", {}).get("model_overrides", {}))
    direct = bool(overrides.pop("direct_forces", True))
    typed = cfg.model_flags
    clashes = []
    for flag, mine, theirs in (("--model", typed.get("model"), meta["architecture"]),
                               ("--width", typed.get("width"), int(meta["width"])),
                               ("--conservative", typed.get("direct_forces"), direct)):
        if mine is not None and mine != theirs:
            clashes.append(f"{flag} {mine} (checkpoint: {theirs})")
    for key, value in typed.get("model_overrides", {}).items():
        if overrides.get(key) != value:
            clashes.append(f"--model-arg {key}={value} (checkpoint: {overrides.get(key, 'unset')})")
    if clashes:
        raise ValueError(f"--init-from {cfg.init_from}: the checkpoint fixes the model; these flags contradict it: "
                         f"{'; '.join(clashes)}. Drop them.")
    cfg.model, cfg.width, cfg.model_overrides, cfg.direct_forces = meta["architecture"], int(meta["width"]), overrides, direct
    pre_lr = meta.get("config", {}).get("lr_effective")
    if pre_lr is None:
        from zoo.registry import get_spec

        pre_lr = get_spec(cfg.model).learning_rate(cfg.width)
    cfg.init_record = {"source": cfg.init_from, "directory": directory, "repair": repair,
                       "weights_sha256": meta.get("weights_sha256"), "architecture": cfg.model, "width": cfg.width,
                       "atoms_seen": meta.get("atoms_seen"), "flops": meta.get("flops"), "data_hash": meta.get("data_hash"),
                       "pretrained_lr": pre_lr, "lr_default": pre_lr * FINETUNE_LR_FACTOR,
                       "keep_normalization": cfg.keep_normalization, "freeze": list(cfg.freeze)}
    return cfg


def apply_init(cfg: TrainConfig, model, hook) -> dict | None:
    """Load the pretrained weights into ``model`` (normalisation per ``cfg``), freeze, and return the
    hook record from the checkpoint (``None`` without a hook). No-op without ``--init-from``."""
    record = cfg.init_record
    if record is None:
        return None
    meta = read_metadata(record["directory"])
    pretrained = load_model(record["directory"], repair=record["repair"])
    references, force_rms = model.element_references.tolist(), model.force_rms
    model.load_state_dict(pretrained.state_dict(), strict=True)
    if cfg.keep_normalization:  # the normalisation is not part of the state dict: set it either way
        model.set_normalization(pretrained.element_references.tolist(), pretrained.force_rms)
    else:  # re-fitted to the new training data
        model.set_normalization(references, force_rms)
    record["normalization"] = ("kept from the checkpoint" if cfg.keep_normalization else
                               "element references and force RMS re-fitted to the new training data")
    frozen = freeze(model, cfg.freeze)
    record["frozen_parameters"] = frozen
    if hook is None:
        return None
    saved = meta.get(hook.metadata_key)
    if saved is None:
        raise ValueError(f"--init-from {record['source']}: the checkpoint records no {hook.metadata_key}")
    hook.restore(model, saved)
    return saved


def freeze(model, patterns: list[str]) -> int:
    """Set ``requires_grad=False`` on parameters whose name matches any pattern; returns how many elements.

    Raises ``ValueError`` naming a pattern that matches no parameter.
    """
    count = 0
    for pattern in patterns:
        hits = [(n, p) for n, p in model.named_parameters() if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(f"--freeze {pattern!r} matches no parameter; names look like "
                             f"{[n for n, _ in list(model.named_parameters())[:5]]} "
                             "(`python -m launcher.finetune NAME|DIR` lists them)")
        for _, param in hits:
            if param.requires_grad:
                param.requires_grad_(False)
                count += param.numel()
    return count


def init_metadata(cfg: TrainConfig) -> dict | None:
    """The ``init_from`` record written into every checkpoint's metadata (None for a run from scratch)."""
    if cfg.init_record is None:
        return None
    return {k: v for k, v in cfg.init_record.items() if k != "repair"}


if __name__ == "__main__":  # list the parameter names of a release model or checkpoint (for --freeze)
    from zoo.hub.load import load

    for name, param in load(sys.argv[1]).named_parameters():
        print(f"{name:60s} {tuple(param.shape)}")
