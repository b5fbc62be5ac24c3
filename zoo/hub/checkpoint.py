"""The zoo's checkpoint format: a self-describing directory, no pickle.

A checkpoint is a directory holding

- ``model.safetensors`` — every parameter and buffer of the model (float32, consolidated on one
  device; for a schedule-free run the *averaged* weights ``x``), plus the normalisation as two
  float64 tensors ``normalization.element_references`` ``[Z_max + 1]`` (eV, indexed by Z) and
  ``normalization.force_rms`` ``[1]`` (eV/Å);
- ``metadata.json`` — what the model is and what it cost: the schema of :mod:`zoo.hub.metadata`,
  including ``weights_sha256``, the SHA-256 of ``model.safetensors``, which every load checks.

The format follows the idea of fairchem's inference checkpoints (config, averaged weights and
normalisers in one place) with safetensors + JSON instead of a pickled dict, so that loading a
checkpoint never executes code.

A round trip (a run's checkpoints are ``runs/<run>/checkpoints/step-<8 digits>``):

>>> import tempfile
>>> import torch
>>> from zoo.hub.checkpoint import load_model, read_metadata, save_checkpoint
>>> from zoo.hub.metadata import example
>>> from zoo.registry import build
>>> model = build("mpnn", width=16)
>>> run = example()                                    # a run's counters, validation, data hash ...
>>> for key in ("architecture", "width", "N"):         # ... these three are taken from the model
...     del run[key]
>>> tmp = tempfile.TemporaryDirectory()
>>> path = save_checkpoint(f"{tmp.name}/step-00000010", model, run)
>>> sorted(p.name for p in path.iterdir())
['metadata.json', 'model.safetensors']
>>> again = load_model(path)
>>> all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
True
>>> meta = read_metadata(path)
>>> meta["architecture"], meta["width"], meta["N"] == sum(p.numel() for p in model.parameters())
('mpnn', 16, True)
>>> meta["validation"]
{'force_mae_mev_per_A': 120.0, 'loss': 0.5}
>>> tmp.cleanup()
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from zoo.hub import metadata as schema
from zoo.hub.metadata import METADATA, WEIGHTS
from zoo.models.base import ForceField
from zoo.registry import build

REFERENCES_KEY = "normalization.element_references"
FORCE_RMS_KEY = "normalization.force_rms"
def model_tensors(model: ForceField) -> dict[str, torch.Tensor]:
    """Parameters, buffers and normalisation of ``model`` as contiguous CPU tensors to save.

    Floating parameters and buffers are stored as float32 (a bf16 engine's weights are upcast);
    the normalisation stays float64.
    """
    tensors = {}
    for name, value in model.state_dict().items():
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        tensors[name] = value.contiguous()
    if REFERENCES_KEY in tensors or FORCE_RMS_KEY in tensors:
        raise ValueError(f"model state uses a reserved key ({REFERENCES_KEY}, {FORCE_RMS_KEY})")
    tensors[REFERENCES_KEY] = model.element_references.detach().double().cpu().contiguous()
    tensors[FORCE_RMS_KEY] = torch.tensor([model.force_rms], dtype=torch.float64)
    return tensors


def save_checkpoint(directory: str | os.PathLike, model: ForceField, metadata: dict) -> Path:
    """Write ``model`` and ``metadata`` as a checkpoint directory (created if needed).

    Parameters
    ----------
    directory : where to write ``model.safetensors`` and ``metadata.json``.
    model : a single-device :class:`~zoo.models.base.ForceField` built by :func:`zoo.registry.build`
        (its ``spec_name``, ``width`` and ``overrides`` are recorded).
    metadata : the run's metadata; must hold every key of :data:`zoo.hub.metadata.REQUIRED_KEYS` except those
        taken from the model (``architecture``, ``width``, ``N``), which are filled in.

    Returns
    -------
    The directory as a ``Path``.

    Raises
    ------
    KeyError
        if a required metadata key is missing.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = dict(metadata)
    meta.setdefault("architecture", getattr(model, "spec_name", type(model).__name__))
    meta.setdefault("width", getattr(model, "width", None))
    meta.setdefault("N", sum(p.numel() for p in model.parameters() if p.requires_grad))
    config = dict(meta.get("config", {}))
    config.setdefault("model_overrides", dict(getattr(model, "overrides", {})))
    config["normalization"] = model.normalization()
    meta["config"] = config
    schema.validate(meta)
    header = {"architecture": str(meta["architecture"]), "width": str(meta["width"]), "format": "symscale-1"}
    weights = directory / WEIGHTS
    tmp = weights.with_name(WEIGHTS + ".tmp")
    save_file(model_tensors(model), str(tmp), metadata=header)
    meta["weights_sha256"] = schema.sha256_file(tmp)
    _umask = os.umask(0)
    os.umask(_umask)
    os.chmod(tmp, 0o666 & ~_umask)  # safetensors creates the file 0600; give it the mode metadata.json gets
    os.replace(tmp, weights)
    schema.write(directory, meta)
    return directory


class CorruptCheckpointError(ValueError):
    """A checkpoint's weight file does not match the SHA-256 its metadata records (or records none)."""


def verify_weights(directory: str | os.PathLike, meta: dict | None = None, repair: str | None = None) -> str:
    """Check ``directory/model.safetensors`` against the metadata's ``weights_sha256``; returns the hash.

    Parameters
    ----------
    directory : a checkpoint directory.
    meta : its metadata (read if not given).
    repair : how to repair it, for the error message (default: re-download or re-save).

    Raises
    ------
    FileNotFoundError
        if the weight file is missing.
    CorruptCheckpointError
        naming the file, if its SHA-256 differs from the recorded one or none is recorded.
    """
    directory = Path(directory)
    meta = read_metadata(directory) if meta is None else meta
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{directory} has no {WEIGHTS}")
    repair = repair or ("re-download it (`zoo download NAME --force` for a release model) or save the "
                        "checkpoint again")
    expected = meta.get("weights_sha256")
    if not expected:
        raise CorruptCheckpointError(f"{directory / METADATA} records no weights_sha256, so {weights} cannot be "
                                     f"verified; {repair}")
    actual = schema.sha256_file(weights)
    if actual != expected:
        raise CorruptCheckpointError(f"{weights} is corrupted or altered: SHA-256 {actual[:16]}… but its metadata "
                                     f"records {expected[:16]}…; refusing to load it. To repair: {repair}")
    return actual


def read_metadata(directory: str | os.PathLike) -> dict:
    """The checked ``metadata.json`` of a checkpoint directory (:func:`zoo.hub.metadata.read`).

    Raises ``FileNotFoundError`` naming the directory if it is not a checkpoint, ``ValueError`` /
    ``KeyError`` if its metadata is not valid JSON or lacks required keys.
    """
    return schema.read(directory)


def load_model(directory: str | os.PathLike, device: str | torch.device = "cpu", repair: str | None = None) -> ForceField:
    """Rebuild the model of a checkpoint directory, load its weights and normalisation.

    The model is rebuilt with ``zoo.registry.build(architecture, width, **model_overrides)``,
    weights come from ``model.safetensors`` (strict: every tensor must match), and
    ``set_normalization`` restores the element references and force RMS. Returned in eval mode.

    The weight file is first checked against the SHA-256 recorded in the metadata
    (:func:`verify_weights`); safetensors holds plain tensors, so nothing is unpickled.

    Raises
    ------
    FileNotFoundError
        if the directory lacks ``metadata.json`` or ``model.safetensors``.
    CorruptCheckpointError
        if the weight file's SHA-256 differs from the recorded one (message names the file).
    RuntimeError
        if the stored tensors do not match the rebuilt model (missing/unexpected keys, shapes).
    """
    directory = Path(directory)
    meta = read_metadata(directory)
    weights = directory / WEIGHTS
    verify_weights(directory, meta, repair)
    overrides = dict(meta.get("config", {}).get("model_overrides", {}))
    model = build(meta["architecture"], int(meta["width"]), **overrides)
    tensors = load_file(str(weights))
    references = tensors.pop(REFERENCES_KEY)
    force_rms = float(tensors.pop(FORCE_RMS_KEY).item())
    state = model.state_dict()
    tensors = {k: v.to(state[k].dtype) if k in state else v for k, v in tensors.items()}
    model.load_state_dict(tensors, strict=True)
    model.set_normalization(references.tolist(), force_rms)
    return model.to(device).eval()
