"""``y[o] = Σ_{t: out[t] = o} basis[t] ⊗ x[in[t]]`` as one sparse × dense product per block.

Every bilinear layer of GemNet-OC (Gasteiger et al. 2022, arXiv 2204.02782, Sec. 3 "Efficient
basis calculation") sums outer products of a geometric basis (per triplet or quadruplet) with a
message gathered from its in-edge. The sum is a sparse matrix ``A(basis)`` ``[O·K, I]`` with
``A[o·K + k, in[t]] = basis[t, k]`` applied to the messages ``x`` ``[I, C]``: the gather, the outer
product and the sum in one CSR product (``torch.addmm`` with a CSR matrix, MKL on CPU), with
neither the ``[T, K, C]`` outer products nor zero-padded blocks (the previous formulation,
:func:`zoo.models.gemnet_oc.blocks.aggregate_outer`, ran tiny batched matmuls, slow on CPU).

The sum is bilinear, and its derivatives are three primitives that are each other's derivatives:

- ``P(b, x) = A(b)·x`` ``[T, K], [I, C] → [O, K, C]`` (CSR product),
- ``Pᵀ(b, g) = A(b)ᵀ·g`` ``[T, K], [O, K, C] → [I, C]`` (CSR product with ``Aᵀ``'s maps),
- ``S(g, x)[t, k] = <g[out[t], k, :], x[in[t], :]>`` ``[O, K, C], [I, C] → [T, K]`` (the dot
  products at ``A``'s non-zeros: one zero-padded batched matmul, real entries picked),

with ``dP = (S(∂y, x), Pᵀ(b, ∂y))``, ``dPᵀ = (S(g, ∂z), P(b, ∂z))``, ``dS = (P(∂s, x), Pᵀ(∂s, g))``.
Each is an autograd Function whose backward calls the others, so derivatives of any order — the
double backward of conservative-force training — run on the same kernels, each computing only
the gradients asked for. The index bookkeeping (:class:`OuterPlan`) depends only on the graph, so
it is built once per batch and shared by all interaction blocks (and by plans of the same
structure, :func:`share_index_maps`), and a basis's layout as CSR values is kept for its next
products. The sums are the same as before; only the order of the additions differs (float round-off).

A plan made ``by_order`` (the quadruplet sum) runs ``P`` as ``K`` products of one shared structure
``[O, I]`` with ``nnz = T`` (row pointers of the sorted ``out``, columns ``inp``), order ``k``'s
values being the basis's column ``k`` and its result written into ``y[:, k, :]``: the same sums in the
same order (the same bits), with maps of ``T`` entries instead of ``T·K`` (in the direct training step,
one core: the quadruplet maps 2.4 against 15.6 ms, 555,710 × 7; the products alike, 6 to 8 ms each).

Where a sparse product cannot run — under ``torch.jit.trace`` and ``TorchDispatchMode`` (the FLOP
counters, fake/meta tensors), ``torch.compile``, dtypes other than float32/float64 — the sum runs
as before, a zero-padded batched matmul (:func:`padded_sum`:
:func:`~zoo.models.gemnet_oc.blocks.aggregate_outer`'s blocks and products, with fewer gathers and
scatters around them); so the FLOP counters see the formulation they counted before.
:func:`outer_sum_dense` is the plain gather × outer product + ``index_add`` reference (tests).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from zoo.models.dense import engine_will_run, gradient_node
from zoo.models.gemnet_oc.blocks import pad_slots
from zoo.models.gemnet_oc.csr import csr_maps, index_dtype, order_maps, transpose_maps

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)

CACHED_LAYOUTS = 4  # OuterPlan.values: a basis in both layouts, and two more (gradients, used once or twice)


@dataclass
class OuterPlan:
    """Index maps of ``A`` and ``Aᵀ`` (see the module docstring), ``A``'s rows ordered ``o·K + k``.

    With that order ``A·x`` is the sum ``[O, K, C]`` as it lies (no transposed copy before the layers
    that take it, nor of the gradient that comes back); row ``o·K + k`` holds the basis rows of group
    ``o`` (columns ``inp``), with the values ``basis[t, k]``, put in order by one flat gather.
    ``Aᵀ`` (row ``i``: the basis rows with ``inp = i``, each with its ``K`` columns) takes the basis
    rows as they lie, in the order of one argsort.

    Attributes
    ----------
    out, inp : ``[T]`` int64, the output row (sorted) and the input row of each basis row.
    k, num_out, num_in : basis width and the two sizes.
    csr : built on first sparse use and kept (every block reuses it): ``A``'s row pointers
        ``[O·K + 1]``, columns ``[T·K]`` and where each value lies in the flattened basis ``[T·K]``
        (int32 where the counts fit).
    csr_t : built on first backward and kept: ``Aᵀ``'s row pointers ``[I + 1]``, columns
        ``[T·K]`` and the order of the basis rows in it ``[T]``.
    pad : built on first use: the zero-padded layout (:meth:`padding`).
    sample : built on first use: :meth:`sampling`.
    twin : set by :func:`share_index_maps`: an earlier plan of the same structure whose maps this
        one uses (built once for both); the kept CSR values stay per plan.
    by_order : ``P`` as ``K`` products of one ``[O, I]`` structure (module docstring): ``csr`` is then
        ``(crow [O + 1], col [T])``, ``A``'s values the basis order-major ``[K, T]`` (a view of a basis
        with contiguous columns); ``Aᵀ`` and ``S`` as without. For narrow inputs (``C ≤ 16``): at
        ``C = 56`` (the cab sum) the single product took 2.9 against 5.7 ms.
    """

    out: torch.Tensor
    inp: torch.Tensor
    k: int
    num_out: int
    num_in: int
    by_order: bool = False
    csr: tuple[torch.Tensor, ...] | None = field(default=None, repr=False)
    csr_t: tuple[torch.Tensor, ...] | None = field(default=None, repr=False)
    pad: tuple | None = field(default=None, repr=False)
    sample: torch.Tensor | None = field(default=None, repr=False)
    cache: dict = field(default_factory=dict, repr=False)
    twin: OuterPlan | None = field(default=None, repr=False)

    def same_structure(self, other: OuterPlan) -> bool:
        """Whether ``other`` has the same sizes and the same ``out`` and ``inp`` (then the same maps)."""
        return ((self.k, self.num_out, self.num_in, self.out.shape, self.by_order)
                == (other.k, other.num_out, other.num_in, other.out.shape, other.by_order)
                and self.out.device == other.out.device
                and (self.out is other.out or torch.equal(self.out, other.out))
                and (self.inp is other.inp or torch.equal(self.inp, other.inp)))

    def padding(self) -> tuple:
        """``(Kmax, rows, inputs, slot)`` of the zero-padded layout, built once: for each of the
        ``O·Kmax`` padded rows the basis row ``[O·Kmax]`` (``T`` for a padding row) and the input row
        (``I``), and for each basis row its padded row ``[T]``."""
        if self.twin is not None:
            return self.twin.padding()
        if self.pad is None:
            with torch.no_grad():
                kmax, slot = pad_slots(self.out, self.num_out)
                t = self.out.numel()
                rows = self.out.new_full((self.num_out * kmax,), t).index_copy_(0, slot, torch.arange(t, device=slot.device))
                inputs = torch.cat([self.inp, self.inp.new_full((1,), self.num_in)]).index_select(0, rows)
                self.pad = (kmax, rows, inputs, slot)
        return self.pad

    def sampling(self) -> torch.Tensor:
        """Where each ``[t, k]`` lies in the flattened ``[O, K, Kmax]`` dot products of
        :func:`_sampled` ``[T·K]`` (int32 where the size fits), built once. (Order-major, ``[K·T]``,
        the map is built 3× faster, but the pick took 24 against 5 ms: 811,698 × 7, one core.)"""
        if self.twin is not None:
            return self.twin.sampling()
        if self.sample is None:
            with torch.no_grad():
                kmax, _, _, slot = self.padding()
                dtype = index_dtype(slot.numel() * self.k, self.num_out * self.k * kmax)
                rank = slot - self.out * kmax  # [T] position in its group
                ks = torch.arange(self.k, dtype=dtype, device=slot.device) * kmax
                first = (self.out * (self.k * kmax) + rank).to(dtype)  # [T] where [t, 0] lies
                self.sample = (first.unsqueeze(1) + ks).reshape(-1)  # [T·K], in the index type
        return self.sample

    def values(self, basis: torch.Tensor, transpose: bool) -> torch.Tensor:
        """``basis`` ``[T, K]`` laid out as ``A``'s or ``Aᵀ``'s values ``[T·K]`` (``A``'s of a plan made
        :attr:`by_order`: ``[K, T]``), as data.

        The last few layouts are kept: a geometric basis is the same for every block and every
        product (forward, backward, double backward), so it is laid out once per batch, not once
        per product. An entry is found again only for the same memory, shape, strides and version
        counter (an in-place change misses), and it holds its tensor, so that memory is not reused.
        Leaves that require a gradient are never kept (gradcheck perturbs them through ``.data``,
        which the version counter does not see).
        """
        key = (transpose, basis.untyped_storage().data_ptr(), basis.storage_offset(), basis.shape,
               basis.stride(), basis.dtype, basis._version)
        hit = self.cache.get(key)
        if hit is not None:
            return hit[1]
        with torch.no_grad():
            # gathers from rows: the gradients of the Legendre bases arrive order-major (strides (1, T)),
            # where the row gather took 38.8 ms against 3 ms for rows (quadruplets, 555,710 × 7, one core)
            if transpose:
                values = basis.contiguous().index_select(0, self.maps_t()[2]).reshape(-1)  # [T·K] in Aᵀ's order
            elif self.by_order:
                values = basis.t().contiguous()  # [K, T] (a view where the basis lies order-major)
            else:
                values = basis.contiguous().reshape(-1).index_select(0, self.maps()[2])  # [T·K] in A's order
        if basis.is_leaf and basis.requires_grad:
            return values
        while len(self.cache) >= CACHED_LAYOUTS:
            self.cache.pop(next(iter(self.cache)))  # the oldest
        self.cache[key] = (basis, values)
        return values

    def maps(self) -> tuple[torch.Tensor, ...]:
        """``(crow, col, gather)`` of ``A`` (:attr:`by_order`: ``(crow, col)`` of each order's ``[O, I]``),
        built once (on the first sparse product)."""
        if self.twin is not None:
            return self.twin.maps()
        if self.csr is None:
            with torch.no_grad():
                self.csr = order_maps(self) if self.by_order else csr_maps(self)
        return self.csr

    def maps_t(self) -> tuple[torch.Tensor, ...]:
        """``(crow_t, col_t, order_t)`` of ``Aᵀ``, built once (on the first backward: inference needs none)."""
        if self.twin is not None:
            return self.twin.maps_t()
        if self.csr_t is None:
            with torch.no_grad():
                self.csr_t = transpose_maps(self)
        return self.csr_t


def share_index_maps(plans: Iterable[OuterPlan]) -> None:
    """Let plans with the same structure (:meth:`OuterPlan.same_structure`) build their index maps once.

    GemNet-OC's three triplet plans coincide where the atom-to-edge graph holds the same edges as the
    main graph (the same cutoff, and molecules under both neighbour limits); at the defaults (main
    cutoff 6 Å, atom-to-edge 8 Å) they differ in size and the check stops at the sizes. Otherwise it is
    two comparisons of ``[T]`` index tensors per pair, against ``[T·K]`` maps built for each.
    Each plan whose structure matches an earlier one gets that one as its :attr:`~OuterPlan.twin`.
    """
    first: list[OuterPlan] = []
    for plan in plans:
        plan.twin = next((other for other in first if plan.same_structure(other)), None)
        if plan.twin is None:
            first.append(plan)


def sparse_capable(*tensors: torch.Tensor) -> bool:
    """Whether the CSR product can run here (see the module docstring for when it cannot)."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    return all(t.dtype in (torch.float32, torch.float64) and not t.is_meta for t in tensors)


def outer_sum(basis: torch.Tensor, x: torch.Tensor, plan: OuterPlan) -> torch.Tensor:
    """``y[o, k, c] = Σ_{t: out[t] = o} basis[t, k] · x[in[t], c]``: ``[T, K], [I, C] → [O, K, C]``.

    GemNet-OC's bilinear sum of basis ⊗ message over a neighbourhood (arXiv 2204.02782, Sec. 3
    "Efficient basis calculation"); units are those of ``basis`` times those of ``x``. Derivatives
    of every order with respect to both operands (see the module docstring). Raises ``ValueError``
    if the shapes do not fit the plan, or (on the first sparse product) if ``plan.out`` is not sorted.
    """
    if basis.shape != (plan.out.numel(), plan.k) or x.shape[0] != plan.num_in:
        raise ValueError(f"outer_sum: basis {tuple(basis.shape)} / x {tuple(x.shape)} do not fit the plan "
                         f"(T={plan.out.numel()}, K={plan.k}, I={plan.num_in})")
    if plan.out.numel() == 0 or not sparse_capable(basis, x):
        # where the CSR product cannot run, the zero-padded batched matmul of before: what the FLOP
        # counters see stays as it was
        return padded_sum(basis, x, plan)
    return _Product.apply(basis, x, plan)  # [O, K, C]


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
    kmax, rows, inputs, _ = plan.padding()
    basis_pad = torch.cat([basis, basis.new_zeros(1, k)]).index_select(0, rows).view(plan.num_out, kmax, k)
    x_pad = torch.cat([x, x.new_zeros(1, c)]).index_select(0, inputs).view(plan.num_out, kmax, c)
    return basis_pad.transpose(1, 2) @ x_pad  # [O, K, C]


def outer_sum_dense(basis: torch.Tensor, x: torch.Tensor, plan: OuterPlan) -> torch.Tensor:
    """The reference formulation of :func:`outer_sum`: gather, outer product, ``index_add``."""
    outer = basis.unsqueeze(2) * x.index_select(0, plan.inp).unsqueeze(1)  # [T, K, C]
    y = x.new_zeros(plan.num_out, plan.k, x.shape[1])
    return y.index_add(0, plan.out, outer)  # [O, K, C]


def _product(basis: torch.Tensor, x: torch.Tensor, plan: OuterPlan) -> torch.Tensor:
    """``A(basis)·x``: ``[T, K], [I, C] → [O, K, C]`` (one CSR product; ``K`` of them for a plan
    :attr:`~OuterPlan.by_order`)."""
    c = x.shape[-1]
    if plan.by_order:
        crow, col = plan.maps()
        values, x, y = plan.values(basis, transpose=False), x.contiguous(), x.new_empty(plan.num_out, plan.k, c)
        for k in range(plan.k):  # order k into the strided y[:, k] [O, C] (no copy)
            matrix = torch.sparse_csr_tensor(crow, col, values[k], (plan.num_out, plan.num_in), check_invariants=False)
            torch.addmm(y[:, k], matrix, x, beta=0, out=y[:, k])
        return y  # [O, K, C]
    rows = plan.num_out * plan.k
    crow, col, _ = plan.maps()
    matrix = torch.sparse_csr_tensor(crow, col, plan.values(basis, transpose=False), (rows, plan.num_in),
                                     check_invariants=False)  # [O·K, I]
    # addmm with beta=0: the uninitialised output is ignored, not added (no zero fill, no copy)
    return torch.addmm(x.new_empty(rows, c), matrix, x.contiguous(), beta=0).view(plan.num_out, plan.k, c)


def _product_t(basis: torch.Tensor, g: torch.Tensor, plan: OuterPlan) -> torch.Tensor:
    """``A(basis)ᵀ·g``: ``[T, K], [O, K, C] → [I, C]`` (one CSR product with ``Aᵀ``'s maps)."""
    rows, c = plan.num_out * plan.k, g.shape[-1]
    crow_t, col_t, _ = plan.maps_t()
    matrix = torch.sparse_csr_tensor(crow_t, col_t, plan.values(basis, transpose=True), (plan.num_in, rows),
                                     check_invariants=False)  # [I, O·K]
    return torch.addmm(g.new_empty(plan.num_in, c), matrix, g.reshape(rows, c), beta=0)  # [I, C]


def _sampled(g: torch.Tensor, x: torch.Tensor, plan: OuterPlan) -> torch.Tensor:
    """``s[t, k] = Σ_c g[out[t], k, c] · x[in[t], c]``: ``[O, K, C], [I, C] → [T, K]``.

    The dot products at ``A``'s non-zeros (a sampled dense-dense product), as one zero-padded batched
    matmul ``[O, K, C] @ [O, C, Kmax]`` whose real entries are then picked by one flat
    ``index_select``. Measured on CPU (one core, the quadruplet sum, 555,710 × 7 × 8): the matmul
    4.5 ms against 11 ms with the operands the other way round (``[O, Kmax, C] @ [O, C, K]``), the
    pick 2.2 ms against 4.8 ms for advanced indexing; ``torch.sparse.sampled_addmm`` took 42 ms for
    the whole, gathering ``g`` per basis row 87 ms.
    """
    kmax, _, inputs, _ = plan.padding()
    c = x.shape[-1]
    x_pad = torch.cat([x, x.new_zeros(1, c)]).index_select(0, inputs).view(plan.num_out, kmax, c)
    dots = torch.bmm(g, x_pad.transpose(1, 2))  # [O, K, Kmax]
    return dots.view(-1).index_select(0, plan.sampling()).view(-1, plan.k)  # [T, K]


class _Bilinear(torch.autograd.Function):
    """A bilinear ``f(u, v)`` whose two partial derivatives are other such Functions (made by
    :func:`_bilinear`): ``∂u = grad_u(∂f, v)``, ``∂v = grad_v(∂f, u)``. Each operand is kept only for
    the other's gradient, and only the gradients that the running backward will use are computed
    (:func:`zoo.models.dense.engine_will_run`): where the parameters' gradients of a conservative step
    are taken (:mod:`zoo.models.parameter_gradients`), a geometric basis's gradient is not, two of the
    three sampled dot products ``S`` of each such sum per step."""

    @staticmethod
    def forward(ctx, u, v, plan: OuterPlan):
        raise NotImplementedError("use a Function made by _bilinear")

    @staticmethod
    def backward(ctx, grad):
        u, v = ctx.saved_tensors
        need_u, need_v, _ = ctx.needs_input_grad
        # only what this backward will use: not a basis gradient that leads to the positions alone while
        # the parameters' gradients are taken (zoo.models.parameter_gradients)
        need_u, need_v = need_u and engine_will_run(ctx.nodes[0]), need_v and engine_will_run(ctx.nodes[1])
        rule_u, rule_v = ctx.rules
        grad_u = rule_u(grad, v, ctx.plan) if need_u else None
        grad_v = rule_v(grad, u, ctx.plan) if need_v else None
        return grad_u, grad_v, None


def _bilinear(name: str, kernel, grad_u, grad_v, doc: str) -> type:
    """A :class:`_Bilinear` Function computing ``kernel(u, v, plan)``."""

    def forward(ctx, u, v, plan: OuterPlan):
        need_u, need_v, _ = ctx.needs_input_grad
        ctx.save_for_backward(u if need_v else None, v if need_u else None)
        ctx.plan, ctx.rules, ctx.nodes = plan, (grad_u, grad_v), (gradient_node(u), gradient_node(v))
        return kernel(u, v, plan)

    return type(name, (_Bilinear,), {"forward": staticmethod(forward), "__doc__": doc})


# the three are each other's derivatives (module docstring); g: the incoming gradient
_Product = _bilinear(
    "_Product", _product,
    lambda g, x, plan: _Sampled.apply(g, x, plan), lambda g, basis, plan: _ProductT.apply(basis, g, plan),
    "``y = A(basis)·x`` ``[T, K], [I, C] → [O, K, C]``; ``∂basis = S(∂y, x)``, ``∂x = A(basis)ᵀ·∂y``.")
_ProductT = _bilinear(
    "_ProductT", _product_t,
    lambda g, out, plan: _Sampled.apply(out, g, plan), lambda g, basis, plan: _Product.apply(basis, g, plan),
    "``z = A(basis)ᵀ·g`` ``[T, K], [O, K, C] → [I, C]``; ``∂basis = S(g, ∂z)``, ``∂g = A(basis)·∂z``.")
_Sampled = _bilinear(
    "_Sampled", _sampled,
    lambda g, x, plan: _Product.apply(g, x, plan), lambda g, out, plan: _ProductT.apply(g, out, plan),
    "``s = S(g, x)`` ``[O, K, C], [I, C] → [T, K]``; ``∂g = A(∂s)·x``, ``∂x = A(∂s)ᵀ·g``.")
