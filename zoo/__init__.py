"""The zoo: four architectures at every width, their FLOPs, and the checkpoints they leave.

Rooms: :mod:`zoo.models` (the architectures, one device each), :mod:`zoo.registry` (one spec per
architecture), :mod:`zoo.flops` (FLOP counting, κ, MFU), :mod:`zoo.hub` (checkpoint format and
metadata schema, ASE calculator), :mod:`zoo.testing` (the property-test kit every model passes),
:mod:`zoo.cli` (the ``zoo`` command).
"""
