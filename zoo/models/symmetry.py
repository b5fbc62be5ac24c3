"""Random rotations and rotated copies of a batch, for the symmetry-loss ablation.

arXiv 2510.09768 (Ngo & Ravanbakhsh 2025) trains the unconstrained MPNN also with a symmetry
loss: each batch is evaluated in its original orientation and in ``M`` Haar-random rotations of
it, with target forces rotated alongside, and the loss is averaged over the ``M + 1`` copies. The
launcher's ``--symmetry-loss M`` uses :func:`with_rotated_copies` and counts the step's FLOPs
``× (M + 1)`` (the model sees ``M + 1`` times the atoms).

>>> import torch
>>> r = random_rotations(4, torch.Generator().manual_seed(0))
>>> r.shape
torch.Size([4, 3, 3])
>>> bool(torch.allclose(r @ r.transpose(1, 2), torch.eye(3, dtype=r.dtype).expand(4, 3, 3), atol=1e-12))
True
"""

from __future__ import annotations

import torch
from torch_geometric.data import Batch

from datapipe import keys

#: per-atom or per-edge fields that are Cartesian vectors and turn with the structure
VECTOR_KEYS = (keys.POSITIONS, keys.FORCES, keys.EDGE_VECTORS)


def random_rotations(
    count: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``count`` independent Haar-random rotation matrices (det +1), ``[count, 3, 3]``.

    QR decomposition of a standard Gaussian matrix with the signs of ``R``'s diagonal moved into
    ``Q`` gives a Haar-distributed orthogonal matrix (Mezzadri 2007, arXiv math-ph/0609050,
    section 5); negating a column where ``det Q = −1`` then gives the Haar measure on SO(3)
    (the map is a measure-preserving bijection between the two cosets of O(3)).

    Parameters
    ----------
    count : int
        Number of rotations ``M`` (≥ 0).
    generator : torch.Generator, optional
        Source of randomness (CPU); pass one seeded per step for reproducible runs.
    dtype : torch.dtype
        Dtype of the result (drawn in float64, then cast).

    Raises
    ------
    ValueError
        If ``count`` is negative.
    """
    if count < 0:
        raise ValueError(f"number of rotations must be ≥ 0, got {count}")
    gaussian = torch.randn(count, 3, 3, generator=generator, dtype=torch.float64)  # [M, 3, 3]
    q, r = torch.linalg.qr(gaussian)  # [M, 3, 3], [M, 3, 3]
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)  # Haar on O(3)
    flip = torch.linalg.det(q) < 0  # [M]
    q[flip, :, 0] = -q[flip, :, 0]  # Haar on SO(3)
    return q.to(dtype)


def rotate_batch(batch: Batch, rotation: torch.Tensor) -> Batch:
    """A copy of ``batch`` with every vector field of :data:`VECTOR_KEYS` turned by ``rotation``.

    Rows are row vectors: ``x' = x Rᵀ`` (``[N, 3] @ [3, 3]``). Energies, charges, spins and the
    graph are unchanged (rotations preserve distances, so the radius graph is the same).
    """
    rotated = batch.clone()
    for key in VECTOR_KEYS:
        value = getattr(batch, key, None)
        if isinstance(value, torch.Tensor):
            r = rotation.to(device=value.device, dtype=value.dtype)
            rotated[key] = value @ r.T  # [*, 3]
    return rotated


def rotated_copies(batch: Batch, rotations: torch.Tensor) -> Batch:
    """One batch holding ``batch`` turned by each of ``rotations`` ``[M, 3, 3]``.

    Structure ``k·B + b`` of the result is structure ``b`` of ``batch`` rotated by
    ``rotations[k]``; positions, target forces and (if present) edge vectors are rotated, every
    other field is copied, edge indices are offset. ``M·B`` structures, ``M·N`` atoms.

    Raises
    ------
    ValueError
        If ``rotations`` is not ``[M, 3, 3]`` with ``M ≥ 1``, or a matrix is not orthogonal.
    """
    if rotations.ndim != 3 or rotations.shape[1:] != (3, 3) or rotations.shape[0] < 1:
        raise ValueError(f"rotations must be [M, 3, 3] with M ≥ 1, got {tuple(rotations.shape)}")
    eye = torch.eye(3, dtype=rotations.dtype, device=rotations.device)
    if not torch.allclose(rotations @ rotations.transpose(1, 2), eye.expand_as(rotations), atol=1e-5):
        raise ValueError("rotations must be orthogonal matrices")
    structures = []
    for rotation in rotations:
        structures.extend(rotate_batch(batch, rotation).to_data_list())
    return Batch.from_data_list(structures)


def with_rotated_copies(batch: Batch, count: int, generator: torch.Generator | None = None) -> Batch:
    """``batch`` followed by ``count`` Haar-randomly rotated copies of it: ``(count+1)·B`` structures.

    The first block is the original (the identity rotation). A per-atom mean loss over the result
    is the average over the ``count + 1`` copies, the paper's symmetry loss. ``count = 0`` returns
    ``batch`` itself.
    """
    if count == 0:
        return batch
    identity = torch.eye(3, dtype=torch.float64).unsqueeze(0)  # [1, 3, 3]
    return rotated_copies(batch, torch.cat([identity, random_rotations(count, generator)]))
