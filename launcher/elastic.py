"""Elastic resume: a checkpoint written by W ranks continues on W' ranks.

DeepSpeed's own checkpoint (``deepspeed/``) keeps ZeRO-1/2's optimizer state as one flat
partition per rank: it loads back only on the world size that wrote it. DeepSpeed's "universal
checkpoint" (``ds_to_universal``) would reshard it, but DeepSpeed 0.19.8's converter knows Adam's
state names only (``exp_avg``, ``exp_avg_sq``; schedule-free AdamW keeps ``z`` and ``exp_avg_sq``),
needs an offline conversion step between the runs, and drops the optimizer's scalar state (``k``,
``weight_sum``, ``lr_max``). So every checkpoint of a DeepSpeed ZeRO 0-2 run also holds a
consolidated state of its own, independent of the world size::

    elastic/state.safetensors   fp32, full shape: y/<param> (the training weights, fp32 master copy),
                                z/<param>, exp_avg_sq/<param> (schedule-free AdamW's state)
    elastic/state.json          {"format", "world_size", "engine", "param_groups" (the optimizer's
                                scalars: k, weight_sum, lr_max, lr, warmup_steps, …), "train_state",
                                "sha256" (:func:`digest` of the tensors)}

It is gathered once per checkpoint (``deepspeed.utils.safe_get_full_fp32_param`` /
``safe_get_full_optimizer_state``, collective; +12 bytes per parameter on disk). A run resumed on
another world size builds its engine as usual, then :func:`load` writes every parameter's ``y``
and optimizer state into this rank's partitions (``safe_set_full_*``), restores the scalars, and
gathers the state back to check that its digest equals the saved one (bitwise). The data stream is
re-planned by :meth:`datapipe.loader.StreamingLoader.resume_elsewhere`.

Refused (:func:`unsupported`): FSDP2 and ZeRO-3 (parameters partitioned across ranks: not
implemented), optimizer/parameter offload and bf16 without ZeRO (DeepSpeed keeps the fp32 state
elsewhere there; not tested) — such a run resumes on its own world size only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

ELASTIC_DIR = "elastic"
TENSORS = "state.safetensors"
INFO = "state.json"
FORMAT = "symscale-elastic/1"
#: the per-parameter tensors kept (``y``: training weights; then schedule-free AdamW's state)
KEYS = ("y", "z", "exp_avg_sq")


def unsupported(cfg, config: dict) -> str | None:
    """Why checkpoints of this engine configuration resume only on their own world size (None: they
    resume on any)."""
    if cfg.engine != "deepspeed":
        return "FSDP2 checkpoints (--engine fsdp) resume on the world size that wrote them only"
    zero = config.get("zero_optimization", {})
    if zero.get("stage", 0) == 3:
        return "ZeRO-3 checkpoints resume on the world size that wrote them only (use --zero-stage 1 or 2)"
    if any(zero.get(key, {}).get("device", "none") not in ("none", None) for key in ("offload_optimizer",
                                                                                     "offload_param")):
        return "runs with --offload-optimizer/--offload-params resume on the world size that wrote them only"
    if zero.get("stage", 0) == 0 and config.get("bf16", {}).get("enabled"):
        return "bf16 runs without ZeRO resume on the world size that wrote them only (use --zero-stage 1 or 2)"
    return None


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 (hex) over ``tensors`` in sorted name order: name, dtype, shape and raw bytes.

    >>> digest({"a": torch.zeros(2)}) == digest({"a": torch.zeros(2)}) != digest({"a": torch.ones(2)})
    True
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()


def _zero(engine):
    """DeepSpeed's ZeRO-1/2 optimizer of ``engine``, or None (no ZeRO)."""
    opt = getattr(engine, "optimizer", None)
    return opt if hasattr(opt, "single_partition_of_fp32_groups") else None


@torch.no_grad()
def gather(engine, keep: bool) -> dict[str, torch.Tensor]:
    """Collective: every parameter's full fp32 ``y``, ``z`` and ``exp_avg_sq`` (the last two once
    the optimizer has stepped), as CPU tensors named ``KEY/<param>``; kept on ranks with ``keep``
    (an empty dict elsewhere)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from launcher.optim import _base_optimizer

    base = _base_optimizer(engine)
    started = any(len(s) for s in base.state.values())
    out = {}
    for name, lp in engine.module.named_parameters():  # the same order on every rank
        y = safe_get_full_fp32_param(lp)
        if y is None:  # no ZeRO partitioning: the optimizer holds lp itself
            state = base.state.get(lp, {})
            values = {"y": lp.detach().float(), "z": state.get("z"), "exp_avg_sq": state.get("exp_avg_sq")}
        else:
            values = {"y": y}
            if started and lp.requires_grad:
                values.update(z=safe_get_full_optimizer_state(lp, "z"),
                              exp_avg_sq=safe_get_full_optimizer_state(lp, "exp_avg_sq"))
        if keep:
            out.update({f"{key}/{name}": v.detach().float().cpu().clone()
                        for key, v in values.items() if v is not None})
    return out


def _groups(engine) -> list[dict]:
    from launcher.optim import _base_optimizer

    return [json.loads(json.dumps({k: v for k, v in group.items() if k != "params"}, default=float))
            for group in _base_optimizer(engine).param_groups]


def save(directory: Path, engine, runtime, train_state: dict, ds_config: dict) -> None:
    """Write ``directory/elastic/`` (rank 0; every rank must call: the gathers are collective)."""
    from safetensors.torch import save_file

    tensors = gather(engine, keep=runtime.is_main)
    if not runtime.is_main:
        return
    folder = Path(directory) / ELASTIC_DIR
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / TENSORS))
    info = {"format": FORMAT, "world_size": runtime.world_size, "engine": "deepspeed",
            "zero_stage": ds_config["zero_optimization"]["stage"], "param_groups": _groups(engine),
            "train_state": train_state, "sha256": digest(tensors), "tensors": len(tensors)}
    (folder / INFO).write_text(json.dumps(info, indent=1) + "\n")


def has_state(checkpoint: Path) -> bool:
    return (checkpoint / ELASTIC_DIR / INFO).is_file() and (checkpoint / ELASTIC_DIR / TENSORS).is_file()


@torch.no_grad()
def load(checkpoint: Path, engine, runtime) -> tuple[dict, dict]:
    """Write the consolidated state of ``checkpoint`` into this rank's share of ``engine``.

    Returns ``(train_state, record)``; ``record`` says what was loaded and that the state gathered
    back from the engine's partitions has the saved digest.

    Raises
    ------
    ValueError
        if the saved tensors do not match their recorded digest, or name other parameters or shapes
        than the model's; RuntimeError if the state gathered back differs from the saved one.
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    from safetensors.torch import load_file

    from launcher.optim import _base_optimizer

    folder = Path(checkpoint) / ELASTIC_DIR
    info = json.loads((folder / INFO).read_text())
    tensors = load_file(str(folder / TENSORS))
    if digest(tensors) != info["sha256"]:
        raise ValueError(f"{folder / TENSORS}: its content does not match the digest in {INFO} (altered or truncated)")
    params = dict(engine.module.named_parameters())
    names = {key.partition("/")[2] for key in tensors}
    if names != set(params):
        raise ValueError(f"{folder}: saved parameters differ from the model's (only saved: "
                         f"{sorted(names - set(params))[:4]}, only in the model: {sorted(set(params) - names)[:4]})")
    for key, value in tensors.items():
        if value.shape != params[key.partition("/")[2]].shape:
            raise ValueError(f"{folder}: {key} has shape {tuple(value.shape)}, the model's is "
                             f"{tuple(params[key.partition('/')[2]].shape)}")
    base, zero = _base_optimizer(engine), _zero(engine)
    stepped = any(key.startswith("z/") for key in tensors)
    if zero is not None and stepped:  # create the flat state DeepSpeed links fragments to after a step
        for flat in zero.single_partition_of_fp32_groups:
            base.state[flat] = {"z": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
    for name, lp in params.items():
        y = tensors[f"y/{name}"]
        lp.data.copy_(y.to(lp.device, lp.dtype))
        if zero is not None and hasattr(lp, "_hp_mapping"):
            safe_set_full_fp32_param(lp, y.to(lp.device))
            for key in KEYS[1:]:
                if f"{key}/{name}" in tensors:
                    safe_set_full_optimizer_state(lp, tensors[f"{key}/{name}"].to(lp.device), key)
        elif f"z/{name}" in tensors:
            base.state[lp] = {key: tensors[f"{key}/{name}"].to(lp.device, lp.dtype).clone() for key in KEYS[1:]}
    saved_groups = info["param_groups"]
    if len(saved_groups) != len(base.param_groups):
        raise ValueError(f"{folder}: {len(saved_groups)} optimizer parameter groups saved, this optimizer has "
                         f"{len(base.param_groups)}")
    for group, saved in zip(base.param_groups, saved_groups):
        group.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    engine.global_steps = int(info["train_state"]["step"])
    back = digest(gather(engine, keep=True))
    if back != info["sha256"]:
        raise RuntimeError(f"rank {runtime.rank}: the state loaded from {folder} reads back differently from the "
                           "engine's partitions (a bug: please report it)")
    record = {"from_world_size": info["world_size"], "to_world_size": runtime.world_size, "sha256": back,
              "verified": "the engine's state, gathered back after loading, is bitwise the saved one"}
    return info["train_state"], record
