"""The checkpoint metadata schema, defined once: the launcher writes it, the hub checks it, ``fit`` reads it.

A checkpoint directory holds ``model.safetensors`` (weights) and ``metadata.json``, one JSON
object whose keys are the fields of :class:`CheckpointMetadata`. This module imports neither
torch nor numpy, so ``fit`` (which knows nothing of torch) reads checkpoints through it.

Keys (units and meaning)
------------------------
``architecture``      registry name (:data:`zoo.registry.MODELS`)
``width``             the model's width knob
``config``            the full training configuration; ``config["model_overrides"]`` are the keyword
                      overrides given to :func:`zoo.registry.build`, ``config["normalization"]`` the
                      element references (eV) and force RMS (eV/Å)
``N``                 trainable parameters
``samples_seen``      training structures seen (global over ranks; original structures only)
``atoms_seen``        training atoms seen, D of the scaling laws ("tokens")
``step``              optimizer steps taken; ``steps_total`` those of the whole run
``flops``             cumulative training FLOPs, C (FMA = 2); ``null`` when no counter ran
``validation``        metrics on the fixed validation subset: ``loss`` (L), ``energy_mae_mev_per_atom``,
                      ``force_mae_mev_per_A``, ``zero_force_mae_mev_per_A``, ``structures``, ``atoms``, …
``validation_full``   the same on the whole validation split (final checkpoint only, else ``null``)
``data_hash``         identity of the training shards (:class:`datapipe.index.ShardIndex`)
``code_version``      ``git describe`` of the code that trained it
``wall_time_s``       seconds since the run started (resumes included)
``world_size``        ranks that trained it
``throughput``        atoms/s, FLOP/s, MFU, measured κ (:mod:`launcher.throughput`)
``symmetry_loss``     rotated copies per batch (arXiv 2510.09768's ablation; 0 = off)
``val_data_hash``     identity of the validation shards (runs compare only on the same validation set)
``data_rejected``     what shard conversion dropped, per split: ``{"train": {"structures", "rejected",
                      "reasons": {reason: n}, "index"}, "val": {...}}`` (structures kept, rejected, why,
                      the index listing each rejected structure)
``skipped``           what the run did not train on, never counted in ``atoms_seen``: ``steps`` skipped
                      by every rank (non-finite loss or gradient, a rank without readable data),
                      ``structures`` and ``atoms`` of those steps and of unreadable shards
                      (``--skip-bad-shards``), ``records`` (step, reason, structure ids or shard
                      and rows; the first 1000); ``null`` in checkpoints written before it existed
``engine``            how it was trained: ``engine`` (deepspeed/fsdp), ``stage`` (ZeRO stage or FSDP
                      units), ``offload``, ``activation_checkpointing`` (before this schema had
                      ``precision``: also ``precision``, the compute dtype and master/reduction dtypes)
``precision``         the mixed-precision policy (``zoo.models.precision.policy_record``): ``compute``
                      (bf16/fp32), ``fp32_islands`` (parts kept in fp32: geometry, radial bases,
                      spherical harmonics, Wigner-D, energy sum, force autograd, loss, …),
                      ``master_weights``, ``optimizer_state``, ``gradient_reduction``,
                      ``energy_references`` (fp64); ``null`` in checkpoints written before it existed
``weights_sha256``    SHA-256 (hex) of ``model.safetensors``, written by the saver and checked on every load
``init_from``         what a fine-tuned run started from (release name or checkpoint, its weights' SHA-256,
                      frozen patterns, whether normalisation was re-fitted); ``null`` for a run from scratch
``elastic``           where the checkpoint resumes: ``state`` (``"elastic/"``: its consolidated state, any
                      world size) or ``refused`` (why only on ``world_size`` ranks), and ``segments``
                      (``world_size``, ``num_workers``, ``batches``: the world sizes the run has trained
                      on so far, in order); ``null`` in checkpoints written before it existed

An architecture's pre-training hook adds its record under its own key
(:attr:`zoo.models.base.PretrainHook.metadata_key`, e.g. ``scale_factors``).

>>> meta = example()
>>> validate(meta) is meta
True
>>> row = table_row(meta)
>>> row["D"], row["C"], row["loss"], row["validation.force_mae_mev_per_A"]
(1000, 2000000000.0, 0.5, 120.0)
>>> validate({"architecture": "esen"})
Traceback (most recent call last):
...
KeyError: "checkpoint metadata lacks ['N', 'atoms_seen', 'code_version', 'config', 'data_hash', 'flops', 'samples_seen', 'step', 'validation', 'wall_time_s', 'width']"
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

#: file name of the metadata inside a checkpoint directory
METADATA = "metadata.json"
#: file name of the weights inside a checkpoint directory
WEIGHTS = "model.safetensors"
#: column aliases of a run-table row: the scaling laws' names for the recorded counters
ALIASES = {"D": "atoms_seen", "C": "flops", "loss": "validation.loss"}


@dataclass
class CheckpointMetadata:
    """What every checkpoint records (see the module docstring for units and meaning)."""

    architecture: str
    width: int
    config: dict
    N: int
    samples_seen: int
    atoms_seen: int
    step: int
    flops: int | None
    validation: dict
    data_hash: str
    code_version: str
    wall_time_s: float
    steps_total: int | None = None
    validation_full: dict | None = None
    world_size: int | None = None
    throughput: dict | None = None
    symmetry_loss: int = 0
    atoms_seen_note: str | None = None
    flops_note: str | None = None
    val_data_hash: str | None = None
    data_rejected: dict | None = None
    skipped: dict | None = None
    engine: dict | None = None
    weights_sha256: str | None = None
    init_from: dict | None = None
    elastic: dict | None = None
    precision: dict | None = None
    #: records of pre-training hooks, each stored at the top level under its own key
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        """The JSON object written as ``metadata.json`` (hook records at the top level)."""
        data = asdict(self)
        extra = data.pop("extra")
        clash = sorted(set(extra) & set(data))
        if clash:
            raise ValueError(f"hook records {clash} would overwrite metadata fields")
        return {**data, **extra}


#: keys every checkpoint's metadata must carry (the required fields of :class:`CheckpointMetadata`)
REQUIRED_KEYS = tuple(sorted(
    f.name for f in fields(CheckpointMetadata) if f.default is MISSING and f.default_factory is MISSING
))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 (hex digest) of the file at ``path``, read in ``chunk``-byte blocks.

    >>> import tempfile, pathlib
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "x"; _ = f.write_bytes(b"abc")
    >>> sha256_file(f)[:16]
    'ba7816bf8f01cfea'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def strict_json(value):
    """``value`` with non-finite floats replaced by ``None``, so the metadata is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def validate(meta: dict, where: str = "checkpoint metadata") -> dict:
    """Check that ``meta`` is a metadata object with every required key; returns it.

    Raises ``ValueError`` if it is not a JSON object, ``KeyError`` naming ``where`` and the
    missing keys.
    """
    if not isinstance(meta, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(meta).__name__}")
    missing = sorted(key for key in REQUIRED_KEYS if key not in meta)
    if missing:
        raise KeyError(f"{where} lacks {missing}")
    return meta


def read(directory: str | os.PathLike) -> dict:
    """The ``metadata.json`` of a checkpoint directory, checked by :func:`validate`.

    Raises ``FileNotFoundError`` naming the directory if it is not a checkpoint, ``ValueError``
    if the file is not JSON, ``KeyError`` if it lacks required keys.
    """
    path = Path(directory) / METADATA
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a checkpoint directory (no {METADATA})")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    return validate(meta, str(path))


def write(directory: str | os.PathLike, meta: dict) -> Path:
    """Write ``meta`` (checked) as ``directory/metadata.json`` atomically (temporary file, then rename)."""
    validate(meta)
    path = Path(directory) / METADATA
    tmp = path.with_name(METADATA + ".tmp")
    tmp.write_text(json.dumps(strict_json(meta), indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def table_row(meta: dict) -> dict:
    """Flatten one checkpoint's metadata into a run-table row (what ``fit`` reads).

    Every top-level scalar is kept; a nested object's scalars become ``key.sub`` columns
    (``validation.loss``, ``throughput.mfu``, …); lists are dropped. :data:`ALIASES` add ``D``,
    ``C`` and ``loss`` so the scaling-law defaults find their columns.
    """
    row: dict = {}
    for key, value in meta.items():
        if isinstance(value, dict):
            for sub, sub_value in value.items():
                if not isinstance(sub_value, (dict, list)):
                    row[f"{key}.{sub}"] = sub_value
        elif not isinstance(value, list):
            row[key] = value
    for alias, source in ALIASES.items():
        row.setdefault(alias, row.get(source))
    return row


def example() -> dict:
    """A minimal valid metadata object (for examples and tests)."""
    return CheckpointMetadata(
        architecture="esen", width=16, config={"model_overrides": {}}, N=100_000, samples_seen=40,
        atoms_seen=1000, step=10, flops=2.0e9, validation={"loss": 0.5, "force_mae_mev_per_A": 120.0},
        data_hash="0" * 64, code_version="example", wall_time_s=1.0,
    ).to_json()
