"""The zoo: four architectures at every width, their FLOPs, and the checkpoints they leave.

Rooms: :mod:`zoo.models` (the architectures, one device each), :mod:`zoo.registry` (one spec per
architecture), :mod:`zoo.flops` (FLOP counting, κ, MFU), :mod:`zoo.hub` (checkpoint format and
metadata schema, releases, download and cache, publishing, ASE calculator), :mod:`zoo.testing` (the property-test kit every model passes),
:mod:`zoo.cli` (the ``zoo`` command).
"""


def load(name_or_path, device: str = "cpu", registry: list[str] | None = None):
    """A pretrained model by release name (fetched and verified on first use) or checkpoint directory.

    See :func:`zoo.hub.load.load`; ``zoo list`` shows the names.
    """
    from zoo.hub.load import load as _load

    return _load(name_or_path, device=device, registry=registry)
