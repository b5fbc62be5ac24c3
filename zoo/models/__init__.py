"""The four architectures of the zoo, on one device each, and what they share.

:mod:`~zoo.models.base` (the :class:`~zoo.models.base.ForceField` contract),
:mod:`~zoo.models.common` (radial bases, envelopes, charge/spin embedding, scatter),
:mod:`~zoo.models.symmetry` (Haar rotations, rotated copies of a batch), and one module or
package per architecture: :mod:`~zoo.models.mpnn`, :mod:`~zoo.models.egnn` (MC-EGNN),
:mod:`zoo.models.gemnet_oc`, :mod:`zoo.models.esen`. Models know nothing of engines.
"""
