"""Index maps of the CSR matrices of :mod:`zoo.models.gemnet_oc.sparse` (GemNet-OC's bilinear sums).

``A(basis)`` ``[O·K, I]`` holds ``basis[t, k]`` at row ``out[t]·K + k``, column ``inp[t]``; a plan made
``by_order`` uses one ``[O, I]`` structure for each of the ``K`` orders. These functions build the maps
from a plan's sorted ``out`` and its ``inp`` ``[T]`` (int64), once per batch; the plan keeps them. ``plan``
below is a :class:`zoo.models.gemnet_oc.sparse.OuterPlan` (its ``out``, ``inp``, ``k``, ``num_out``, ``num_in``).
"""

from __future__ import annotations

import torch

from zoo.models.gemnet_oc.graph import group_starts


def csr_maps(plan) -> tuple[torch.Tensor, ...]:
    """``A``'s row pointers ``[O·K + 1]``, columns ``[T·K]`` and, for each of its values, the index
    ``t·K + k`` of ``basis[t, k]`` in the flattened basis ``[T·K]``.

    Row ``r = o·K + k`` holds, in order, the ``n_o`` basis rows ``t = start_o + j`` of group ``o``, from
    position ``crow[r] = K·start_o + k·n_o``: at position ``q = crow[r] + j`` the gather index is
    ``K·t + k = K·q + h[r]`` with ``h[r] = K·(start_o − crow[r]) + k``. So the gather map rises by ``K``
    from one position to the next except where a row starts, where it jumps by ``h[r] − h[r − 1] + K``:
    it is one cumulative sum of a ``K``-filled array with the ``O·K`` jumps added (sequential writes in
    the index type, no scatter of ``[T·K]`` entries: 2.4× faster than placing both maps by
    ``index_copy_``, 11.7 against 28 ms for the quadruplet sum, 811,698 × 7, one core). The columns
    follow by one gather: ``col[q] = inp[gather[q] // K]``, the input row of each basis row repeated
    ``K`` times and picked.
    """
    out, k, num_out, t = plan.out, plan.k, plan.num_out, plan.out.numel()
    check_sorted(out)
    dtype = index_dtype(t * k, max(k * num_out, plan.num_in))
    ks = torch.arange(k, device=out.device)
    counts = torch.bincount(out, minlength=num_out)  # [O] n_o
    start = group_starts(counts)  # [O] start_o
    first = (k * start.unsqueeze(1) + ks * counts.unsqueeze(1)).reshape(-1)  # [O·K] crow[r]
    crow = torch.cat([first, first.new_full((1,), t * k)])  # [O·K + 1]
    h = (k * (start.unsqueeze(1) - first.view(num_out, k)) + ks).reshape(-1)  # [O·K]
    jumps = torch.diff(h, prepend=h.new_full((1,), k)).to(dtype)  # [O·K]: h[0] − K at the first row
    steps = torch.full((t * k + 1,), k, dtype=dtype, device=out.device)  # one more: empty last rows land there
    steps.index_add_(0, first, jumps)  # jumps of empty rows telescope into the next row's start
    gather = steps[:-1].cumsum_(0)  # [T·K]
    col = plan.inp.to(dtype).unsqueeze(1).expand(t, k).reshape(-1).index_select(0, gather)  # [T·K]
    return crow.to(dtype), col, gather


def order_maps(plan) -> tuple[torch.Tensor, ...]:
    """Row pointers ``[O + 1]`` and columns ``[T]`` (``inp``) of every order's ``A_k`` ``[O, I]`` (:attr:`zoo.models.gemnet_oc.sparse.OuterPlan.by_order`)."""
    out, t = plan.out, plan.out.numel()
    check_sorted(out)
    dtype = index_dtype(t, max(plan.num_out, plan.num_in))
    return row_pointers(out, plan.num_out).to(dtype), plan.inp.to(dtype)


def transpose_maps(plan) -> tuple[torch.Tensor, ...]:
    """``Aᵀ``'s row pointers ``[I + 1]``, columns ``[T·K]`` and the order of the basis rows in it ``[T]``:
    row ``i`` holds the basis rows with ``inp = i`` (a stable sort), each with its ``K`` columns."""
    dtype = index_dtype(plan.out.numel() * plan.k, max(plan.num_out * plan.k, plan.num_in))
    order = torch.argsort(sort_keys(plan.inp, plan.num_in), stable=True)  # [T]
    ks = torch.arange(plan.k, dtype=dtype, device=plan.out.device)
    col_t = ((plan.out.to(dtype) * plan.k).index_select(0, order).unsqueeze(1) + ks).reshape(-1)  # [T·K]
    return row_pointers(plan.inp, plan.num_in, plan.k).to(dtype), col_t, order


def row_pointers(index: torch.Tensor, size: int, width: int = 1) -> torch.Tensor:
    """CSR row pointers ``[size + 1]`` (int64) of rows holding ``width`` entries per element of ``index``
    ``[T]`` with that row (values in ``[0, size)``).

    >>> row_pointers(torch.tensor([0, 0, 2]), 3, width=2).tolist()
    [0, 4, 4, 6]
    """
    crow = index.new_zeros(size + 1)
    torch.cumsum(torch.bincount(index, minlength=size) * width, 0, out=crow[1:])
    return crow


def sort_keys(index: torch.Tensor, size: int) -> torch.Tensor:
    """``index`` ``[T]`` (values in ``[0, size)``) as the narrowest integers that keep its order: a stable
    sort of them gives the same permutation, faster (quadruplets' inputs, 555,710 of them < 2¹⁶,
    one core: int64 29, int32 15, int16 (shifted by −2¹⁵) 11 ms)."""
    if size <= 2**16:
        return (index - 2**15).to(torch.int16)
    return index.to(torch.int32) if size <= 2**31 else index


def check_sorted(out: torch.Tensor) -> None:
    """Raises ``ValueError`` unless ``out`` ``[T]`` is non-decreasing (grouped by output row)."""
    if out.numel() > 1 and bool((out[1:] < out[:-1]).any()):
        raise ValueError("OuterPlan: the output index must be sorted (grouped by output row)")


def index_dtype(nnz: int, size: int) -> torch.dtype:
    """int32 for CSR maps whose counts fit: MKL's sparse product takes 32-bit indices, and int64 ones
    are converted on every call (a copy of the column map each product: measured 24 ms against 8.5 ms
    for the quadruplet sum, 555,710 × 7 non-zeros, one core)."""
    return torch.int32 if max(nnz, size) < 2**31 - 1 else torch.int64
