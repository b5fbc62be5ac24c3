"""The zoo as a product: the checkpoint format and its metadata schema, and the ASE calculator.

:mod:`~zoo.hub.metadata` (the checkpoint metadata schema, torch-free so ``fit`` can read it),
:mod:`~zoo.hub.checkpoint` (safetensors + JSON, no pickle), :mod:`~zoo.hub.calculator`
(:class:`~zoo.hub.calculator.ZooCalculator`).
"""
