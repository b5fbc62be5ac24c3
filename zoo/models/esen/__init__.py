"""eSEN: spherical-tensor message passing with SO(2) convolutions in edge frames (arXiv 2502.12147).

:mod:`~zoo.models.esen.model` (the network), :mod:`~zoo.models.esen.so2` (edge frames, Wigner
rotations, SO(2) convolution, equivariant norm and linear layers).
"""
