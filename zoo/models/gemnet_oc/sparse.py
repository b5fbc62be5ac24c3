"""``y[o] = Σ_{t: out[t] = o} basis[t] ⊗ x[in[t]]`` as one sparse × dense product per block.

Every bilinear layer of GemNet-OC (Gasteiger et al. 2022, arXiv 2204.02782, Sec. 3 "Efficient
basis calculation") sums outer products of a geometric basis (per triplet or quadruplet) with a
message gathered from its in-edge. The sum is a sparse matrix ``A`` ``[K·O, I]`` with
``A[k·O + o, in[t]] = basis[t, k]`` applied to the messages ``x`` ``[I, C]``: the gather, the outer
product and the sum in one CSR product (``torch.addmm`` with a CSR matrix, MKL on CPU), with
neither the ``[T, K, C]`` outer products nor zero-padded blocks (the previous formulation,
:func:`zoo.models.gemnet_oc.blocks.aggregate_outer`, ran tiny batched matmuls, slow on CPU).

The index bookkeeping (:class:`OuterPlan`) depends only on the graph, so it is built once per
batch and shared by all interaction blocks. Gradients: ``∂/∂x = Aᵀ·g`` (a CSR product with
``Aᵀ``'s own maps) and ``∂/∂basis[t, k] = g[k, out[t]] · x[in[t]]``, both written with
differentiable operations, so the double backward of conservative-force training works. The sums
are the same as before; only the order of the additions differs (float round-off).

Where a sparse product cannot run — under ``torch.jit.trace`` and ``TorchDispatchMode`` (the FLOP
counters, fake/meta tensors), ``torch.compile``, dtypes other than float32/float64 — and for a
basis that needs its own gradient (conservative forces), the sum runs as before, a zero-padded
batched matmul (:func:`padded_sum`: :func:`~zoo.models.gemnet_oc.blocks.aggregate_outer`'s blocks
and products, with fewer gathers and scatters around them); so the FLOP counters see the
formulation they counted before, and both their counts agree.
:func:`outer_sum_dense` is the plain gather × outer product + ``index_add`` reference (tests).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from zoo.models.gemnet_oc.blocks import pad_slots

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)


@dataclass
class OuterPlan:
    """Index maps of ``A`` and ``Aᵀ`` (see the module docstring), ``A``'s rows ordered ``k·O + o``.

    With that order each ``k`` is one block of rows with the natural pattern (row ``o`` holds the
    basis rows of group ``o``, columns ``inp``), so ``A``'s values are ``basisᵀ`` as it lies and
    its maps cost no sort; ``Aᵀ`` (row ``i``: the basis rows with ``inp = i``) needs one argsort.

    Attributes
    ----------
    out, inp : ``[T]`` int64, the output row (sorted) and the input row of each basis row.
    k, num_out, num_in : basis width and the two sizes.
    csr : built on first sparse use and kept (every block reuses it): ``A``'s row pointers
        ``[K·O + 1]`` and columns ``[K·T]`` (int32 where the counts fit).
    csr_t : built on first backward and kept: ``Aᵀ``'s row pointers ``[I + 1]``, columns
        ``[T·K]`` and the order of the basis rows in it ``[T]``.
    """

    out: torch.Tensor
    inp: torch.Tensor
    k: int
    num_out: int
    num_in: int
    csr: tuple[torch.Tensor, ...] | None = field(default=None, repr=False)
    csr_t: tuple[torch.Tensor, ...] | None = field(default=None, repr=False)
    pad: tuple | None = field(default=None, repr=False)
    cache: dict = field(default_factory=dict, repr=False)

    def padding(self) -> tuple:
        """``(Kmax, rows, inputs)`` of the zero-padded layout, built once: for each of the ``O·Kmax``
        padded rows the basis row ``[O·Kmax]`` (``T`` for a padding row) and the input row (``I``)."""
        if self.pad is None:
            with torch.no_grad():
                kmax, slot = pad_slots(self.out, self.num_out)
                t = self.out.numel()
                rows = self.out.new_full((self.num_out * kmax,), t).index_copy_(0, slot, torch.arange(t, device=slot.device))
                inputs = torch.cat([self.inp, self.inp.new_full((1,), self.num_in)]).index_select(0, rows)
                self.pad = (kmax, rows, inputs)
        return self.pad

    def values(self, basis: torch.Tensor, transpose: bool) -> torch.Tensor:
        """``basis`` laid out as ``A``'s (``[K·T]``) or ``Aᵀ``'s values (``[T·K]``).

        Kept for the last basis seen when it needs no gradient (a geometric basis is the same
        for every block: it is laid out once per batch, not once per block).
        """
        key = "t" if transpose else "a"
        hit = self.cache.get(key)
        if hit is not None and hit[0] is basis:
            return hit[1]
        if transpose:
            values = basis.index_select(0, self.maps_t()[2]).reshape(-1)  # [T·K] in Aᵀ's order
        else:
            values = basis.t().reshape(-1)  # [K·T]
        if not basis.requires_grad:
            self.cache[key] = (basis, values)
        return values

    def maps(self) -> tuple[torch.Tensor, ...]:
        """``(crow, col)`` of ``A``, built once (on the first sparse product)."""
        if self.csr is None:
            with torch.no_grad():
                self.csr = _csr_maps(self.out, self.inp, self.k, self.num_out, self.num_in)
        return self.csr

    def maps_t(self) -> tuple[torch.Tensor, ...]:
        """``(crow_t, col_t, order_t)`` of ``Aᵀ``, built once (on the first backward: inference needs none)."""
        if self.csr_t is None:
            with torch.no_grad():
                order = torch.argsort(self.inp, stable=True)  # [T]
                dtype = _index_dtype(self.out.numel() * self.k, self.num_out * self.k)
                ks = torch.arange(self.k, device=self.out.device, dtype=dtype)
                col_t = (self.out.index_select(0, order).to(dtype).unsqueeze(1) + ks * self.num_out).reshape(-1)  # [T·K]
                crow_t = self.out.new_zeros(self.num_in + 1)
                crow_t[1:] = torch.cumsum(torch.bincount(self.inp, minlength=self.num_in) * self.k, 0)
                self.csr_t = (crow_t.to(dtype), col_t, order)
        return self.csr_t


def _csr_maps(out: torch.Tensor, inp: torch.Tensor, k: int, num_out: int, num_in: int) -> tuple[torch.Tensor, ...]:
    t, device = out.numel(), out.device
    if t > 1 and bool((out[1:] < out[:-1]).any()):
        raise ValueError("OuterPlan: the output index must be sorted (grouped by output row)")
    ks = torch.arange(k, device=device)
    counts = torch.cumsum(torch.bincount(out, minlength=num_out), 0)  # [O] end of each group
    crow = torch.cat([out.new_zeros(1), (counts.unsqueeze(0) + (ks * t).unsqueeze(1)).reshape(-1)])  # [K·O + 1]
    dtype = _index_dtype(t * k, max(k * num_out, num_in))
    return crow.to(dtype), inp.to(dtype).repeat(k)  # row pointers [K·O + 1], columns [K·T]


def _index_dtype(nnz: int, size: int) -> torch.dtype:
    """int32 for CSR maps whose counts fit: MKL's sparse product takes 32-bit indices, and int64 ones
    are converted on every call (a copy of the column map each product: measured 24 ms against 8.5 ms
    for the quadruplet sum, 555,710 × 7 non-zeros, one core)."""
    return torch.int32 if max(nnz, size) < 2**31 - 1 else torch.int64


def sparse_capable(*tensors: torch.Tensor) -> bool:
    """Whether the CSR product can run here (see the module docstring for when it cannot)."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    return all(t.dtype in (torch.float32, torch.float64) and not t.is_meta for t in tensors)


def outer_sum(basis: torch.Tensor, x: torch.Tensor, plan: OuterPlan) -> torch.Tensor:
    """``y[o, k, c] = Σ_{t: out[t] = o} basis[t, k] · x[in[t], c]``: ``[T, K], [I, C] → [O, K, C]``."""
    if basis.shape != (plan.out.numel(), plan.k) or x.shape[0] != plan.num_in:
        raise ValueError(f"outer_sum: basis {tuple(basis.shape)} / x {tuple(x.shape)} do not fit the plan "
                         f"(T={plan.out.numel()}, K={plan.k}, I={plan.num_in})")
    if (basis.requires_grad and torch.is_grad_enabled()) or plan.out.numel() == 0 or not sparse_capable(basis, x):
        # the zero-padded batched matmul of before: for a basis that needs its own gradient
        # (conservative forces; the learned pair basis) it gives ∂/∂basis faster than the sampled
        # products of _OuterSum.backward on CPU (measured, benchmarks/bench_gemnet.py), and where the
        # CSR product cannot run it keeps what the FLOP counters see as it was
        return padded_sum(basis, x, plan)
    return _OuterSum.apply(basis, x, plan, False).transpose(0, 1)  # [O, K, C] (a view of [K, O, C])


def padded_sum(basis: torch.Tensor, x: torch.Tensor, plan: OuterPlan) -> torch.Tensor:
    """:func:`outer_sum` as the zero-padded batched matmul of
    :func:`~zoo.models.gemnet_oc.blocks.aggregate_outer` (the same blocks, the same products), each
    operand put into its padded layout by one ``index_select`` from its rows and an appended zero row,
    with the plan's maps: no gathered ``[T, C]`` copy of ``x``, no zero-filled blocks written into, and
    one scatter fewer in every backward. ``[T, K], [I, C] → [O, K, C]``.
    """
    k, c = basis.shape[1], x.shape[1]
    if plan.out.numel() == 0:
        return x.new_zeros(plan.num_out, k, c)
    kmax, rows, inputs = plan.padding()
    basis_pad = torch.cat([basis, basis.new_zeros(1, k)]).index_select(0, rows).view(plan.num_out, kmax, k)
    x_pad = torch.cat([x, x.new_zeros(1, c)]).index_select(0, inputs).view(plan.num_out, kmax, c)
    return basis_pad.transpose(1, 2) @ x_pad  # [O, K, C]


def outer_sum_dense(basis: torch.Tensor, x: torch.Tensor, plan: OuterPlan) -> torch.Tensor:
    """The reference formulation of :func:`outer_sum`: gather, outer product, ``index_add``."""
    outer = basis.unsqueeze(2) * x.index_select(0, plan.inp).unsqueeze(1)  # [T, K, C]
    y = x.new_zeros(plan.num_out, plan.k, x.shape[1])
    return y.index_add(0, plan.out, outer)  # [O, K, C]


class _OuterSum(torch.autograd.Function):
    """``A·x`` (``transpose=False``: ``x [I, C] → [K, O, C]``) or ``Aᵀ·x`` (``transpose=True``:
    ``x [K, O, C] → [I, C]``)."""

    @staticmethod
    def forward(ctx, basis, x, plan: OuterPlan, transpose: bool):
        ctx.save_for_backward(basis, x)
        ctx.plan, ctx.transpose = plan, transpose
        rows, c = plan.num_out * plan.k, x.shape[-1]
        # addmm with beta=0: the uninitialised output is ignored, not added (no zero fill, no copy)
        if transpose:
            crow_t, col_t, _ = plan.maps_t()
            values = plan.values(basis, transpose=True)  # [T·K]
            matrix = torch.sparse_csr_tensor(crow_t, col_t, values, (plan.num_in, rows), check_invariants=False)
            return torch.addmm(x.new_empty(plan.num_in, c), matrix, x.reshape(rows, c), beta=0)  # [I, C]
        crow, col = plan.maps()
        values = plan.values(basis, transpose=False)  # [K·T]
        matrix = torch.sparse_csr_tensor(crow, col, values, (rows, plan.num_in), check_invariants=False)
        return torch.addmm(x.new_empty(rows, c), matrix, x.contiguous(), beta=0).view(plan.k, plan.num_out, c)

    @staticmethod
    def backward(ctx, grad):
        basis, x = ctx.saved_tensors
        plan, transpose = ctx.plan, ctx.transpose
        grad_basis = grad_x = None
        if ctx.needs_input_grad[1]:
            grad_x = _OuterSum.apply(basis, grad, plan, not transpose)
        if ctx.needs_input_grad[0]:
            # ∂/∂basis[t, k] = (output-side value at [k, out[t]]) · (input-side value at in[t]):
            # the output gradient and x for A·x, x and the output gradient for Aᵀ·x
            per_out, per_in = (x, grad) if transpose else (grad, x)  # [K, O, C], [I, C]
            per_out = per_out.index_select(1, plan.out)  # [K, T, C]
            per_in = per_in.index_select(0, plan.inp)  # [T, C]
            grad_basis = (per_out * per_in).sum(-1).t()  # [T, K]
        return grad_basis, grad_x, None, None
