"""Load a model by release name or checkpoint directory: ``zoo.load("esen-w16-d120k")``.

A name is looked up in the registry (:func:`zoo.hub.release.load_registry`: the shipped releases,
``SYMSCALE_REGISTRY`` and ``registry``), fetched into the cache on first use
(:func:`zoo.hub.fetch.download`, verified by SHA-256), and loaded with
:func:`zoo.hub.checkpoint.load_model`, which checks the weight file against the SHA-256 in its
metadata. A path that is a checkpoint directory is loaded directly. Nothing is unpickled.

>>> import zoo
>>> model = zoo.load("mpnn-w128-d60k")         # the shipped cpu-study release (copied into the cache)
>>> model.spec_name, model.width
('mpnn', 128)
"""

from __future__ import annotations

import os
from pathlib import Path

from zoo.hub.checkpoint import load_model
from zoo.hub.fetch import cache_root, download
from zoo.hub.metadata import METADATA
from zoo.hub.release import load_registry


def resolve(name_or_path: str | os.PathLike, registry: list[str] | None = None, quiet: bool = True) -> tuple[Path, str]:
    """(checkpoint directory, how to repair it) for a registry name or a checkpoint directory.

    Raises ``FileNotFoundError`` when ``name_or_path`` is neither a checkpoint directory nor a
    known model name (the message lists the known names), ``ConnectionError`` when the model is
    not cached and cannot be fetched (offline mode, network).
    """
    path = Path(name_or_path)
    if (path / METADATA).is_file():
        if path.resolve().parent.parent == cache_root().resolve():  # a cached release model, named by its path
            return path, f"run `zoo download {path.name} --force` to fetch a verified copy"
        return path, f"re-save or re-copy the checkpoint {path}"
    models = load_registry(registry)
    name = str(name_or_path)
    if name not in models:
        raise FileNotFoundError(f"{name!r} is neither a checkpoint directory (with {METADATA}) nor a model in the "
                                f"registry; known models: {sorted(models)} (`zoo list`)")
    directory = download(models[name], quiet=quiet)
    return directory, f"run `zoo download {name} --force` to fetch a verified copy"


def load(name_or_path: str | os.PathLike, device: str = "cpu", registry: list[str] | None = None):
    """The model (eval mode) of a registry name or checkpoint directory; see the module docstring.

    Raises ``zoo.hub.checkpoint.CorruptCheckpointError`` naming the weight file and how to
    repair it if its SHA-256 does not match, plus the errors of :func:`resolve`.
    """
    directory, repair = resolve(name_or_path, registry)
    return load_model(directory, device=device, repair=repair)
