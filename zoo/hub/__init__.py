"""The zoo as a product: the checkpoint format, releases, download and cache, publishing, the ASE calculator.

:mod:`~zoo.hub.metadata` (the checkpoint metadata schema, torch-free so ``fit`` can read it),
:mod:`~zoo.hub.checkpoint` (safetensors + JSON, no pickle; weights checked by SHA-256),
:mod:`~zoo.hub.release` (release manifests and the registry of releases, torch-free),
:mod:`~zoo.hub.fetch` (verified download into the cache: disk, resumable HTTP, ``hf://``),
:mod:`~zoo.hub.load` (``zoo.load(name_or_path)``), :mod:`~zoo.hub.publish` (``zoo publish``),
:mod:`~zoo.hub.commands` (``zoo list`` / ``download`` / ``publish``), :mod:`~zoo.hub.calculator`
(:class:`~zoo.hub.calculator.ZooCalculator`). Shipped releases live in ``zoo/hub/releases/``.
"""
