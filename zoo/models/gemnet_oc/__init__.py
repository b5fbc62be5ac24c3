"""GemNet-OC: invariant 2-, 3- and 4-body message passing (arXiv 2204.02782).

:mod:`~zoo.models.gemnet_oc.model` (the network), :mod:`~zoo.models.gemnet_oc.graph` (the four
graphs, triplets and quadruplets), :mod:`~zoo.models.gemnet_oc.blocks` (bases, dense layers,
scale factors), :mod:`~zoo.models.gemnet_oc.interactions` (interaction and output blocks),
:mod:`~zoo.models.gemnet_oc.scales` (the scale factors as the registry's pre-training hook).
"""
