"""The model contract shared by every architecture of the zoo.

A :class:`ForceField` maps a batch (a torch-geometric ``Batch`` holding the fields of
:mod:`datapipe.keys`) to ``{"energy": [B] eV, "forces": [N, 3] eV/Å}``. Subclasses implement
:meth:`ForceField.interact`, which returns per-atom energies in normalised units and, for a
direct force head, per-atom forces in normalised units. The base class does everything that is
the same for all architectures:

- input checks with clear errors (unsupported elements, coincident atoms), naming the structure;
- edge vectors from positions (differentiable, so conservative forces are exact);
- the sum of per-atom energies per structure;
- de-normalisation: ``E = Σ_i E_ref[Z_i] + σ · Ê`` and ``F = σ · F̂`` with per-element linear
  references ``E_ref`` (eV) and the training force RMS ``σ`` (eV/Å), so that the training loss in
  normalised units is the paper's loss (arXiv 2510.09768: per-atom energy MAE + per-atom force
  L2 norm, forces divided by the force RMS);
- forces either from the direct head or as ``F = −∂E/∂positions`` (computed inside ``forward``,
  as DeepSpeed requires).

References and σ are kept in float64 outside the parameter/buffer tree, so that an engine that
casts the module to bf16 cannot round a −10⁴ eV reference to the nearest 64 eV. Under bf16
(:mod:`zoo.models.precision`) positions, edge vectors, the energy sum, the direct force output
and ``−∂E/∂positions`` stay in at least fp32; only the architecture's learned layers run in bf16.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from datapipe import keys
from zoo.models.common import ChargeSpinEmbedding
from zoo.models.parameter_gradients import parameter_gradients_only
from zoo.models.precision import compute_dtype, geometry_dtype


@dataclass(frozen=True)
class PretrainHook:
    """A step run once on training batches before the first optimizer step, identical on every rank.

    Attributes
    ----------
    metadata_key : where the record goes in checkpoint metadata (``scale_factors``).
    batches : how many training batches (index order, no shuffling) ``fit`` sees.
    fit : ``fit(model, batches, progress=None) -> dict`` — fits in place and returns a JSON-able record;
        ``progress(done, total)``, if given, is called as it goes (for the launcher's progress bar).
    restore : ``restore(model, record)`` — puts a record (from ``fit`` or a checkpoint) into a model.
    description : one line for the run log.
    """

    metadata_key: str
    batches: int
    fit: Callable[[ForceField, list], dict]
    restore: Callable[[ForceField, dict], None]
    description: str



class ForceField(nn.Module):
    """Base class of every zoo model.

    Parameters
    ----------
    cutoff : float
        Radius of the interaction graph, Å. Edges of the batch longer than this are dropped.
    direct_forces : bool
        True: forces from a direct (non-conservative) head, the paper's choice.
        False: forces are ``−∂E/∂positions`` (conservative; needs a double backward to train).
    max_atomic_number : int
        Largest Z the embedding accepts; Z < 1 or Z > this raises ``ValueError``.
    min_distance : float
        Two atoms of one structure closer than this (Å) raise ``ValueError`` naming the
        structure (coincident atoms give undefined directions and infinite energies).
    """

    def __init__(
        self,
        *,
        cutoff: float = keys.DEFAULT_CUTOFF,
        direct_forces: bool = True,
        max_atomic_number: int = keys.MAX_ATOMIC_NUMBER,
        min_distance: float = 0.1,
    ) -> None:
        super().__init__()
        self.cutoff = float(cutoff)
        #: every cutoff (Å) the model's graphs use; a model with several graphs (GemNet-OC) sets more
        self.graph_cutoffs: tuple[float, ...] = (self.cutoff,)
        self.direct_forces = bool(direct_forces)
        self.max_atomic_number = int(max_atomic_number)
        self.min_distance = float(min_distance)
        # as_tensor, not zeros: zero.Init would re-type zeros' output to bf16 (zoo.models.esen.so2)
        self.element_references = torch.as_tensor([0.0] * (self.max_atomic_number + 1), dtype=torch.float64)
        self.force_rms = 1.0
        self._compiled_interact: Callable | None = None

    #: why :meth:`enable_compile` is refused for this architecture (None: compile is offered)
    compile_refusal: str | None = None

    def enable_compile(self, **options) -> ForceField:
        """Run the architecture's tensor program through ``torch.compile`` (``dynamic=True``
        unless ``options`` say otherwise: atoms and edges change from batch to batch).

        Direct forces: :meth:`interact` is compiled. Conservative forces: :meth:`interact` and
        the gradient of the energy with respect to the edge vectors (and positions) are compiled
        as one function, the gradient taken with ``torch.func.grad`` inside it, so the compiled
        graph returns forces as an ordinary output: training then needs only a first-order
        backward through that graph, which AOTAutograd supports (``torch.autograd.grad`` with
        ``create_graph`` on a compiled graph does not: "double backward"). The input checks, the
        energy sum and the de-normalisation stay eager. Returns ``self``.

        Raises
        ------
        RuntimeError
            if the architecture does not compile (:attr:`compile_refusal` says why).
        """
        if self.compile_refusal is not None:
            raise RuntimeError(f"torch.compile is not offered for {type(self).__name__}: {self.compile_refusal}")
        options.setdefault("dynamic", True)
        program = self.interact if self.direct_forces else self._energy_and_gradient
        self._compiled_interact = torch.compile(program, **options)
        return self

    def _energy_and_gradient(self, atomic_numbers, positions, edge_index, edge_vectors, batch, charge, spin,
                             num_graphs) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-atom energies ``[N]`` (normalised) and ``∂(Σ_i E_i)/∂positions`` ``[N, 3]``, in one
        function for ``torch.compile``: the gradient through the edge vectors
        ``r_ij = x_source − x_target`` (and any direct use of positions) by ``torch.func.grad``.
        Forces of each structure are the gradient of its own energy, as every atom belongs to one."""

        def total(positions, edge_vectors):
            node_energy, _ = self.interact(atomic_numbers, positions, edge_index, edge_vectors, batch, charge, spin,
                                           num_graphs)  # [N]
            node_energy = node_energy.to(positions.dtype)  # the fp32 island of the energy sum
            return node_energy.sum(), node_energy

        (d_positions, d_vectors), node_energy = torch.func.grad(total, argnums=(0, 1), has_aux=True)(
            positions, edge_vectors)  # [N, 3], [E, 3], [N]
        gradient = d_positions.index_add(0, edge_index[0], d_vectors).index_add(0, edge_index[1], -d_vectors)
        return node_energy, gradient  # [N], [N, 3]

    def disable_compile(self) -> ForceField:
        """Back to the eager :meth:`interact`. Returns ``self``."""
        self._compiled_interact = None
        return self

    @property
    def compiled(self) -> bool:
        """True after :meth:`enable_compile`."""
        return self._compiled_interact is not None

    def repeated_blocks(self) -> list[nn.Module]:
        """The model's repeated blocks (every entry of its top-level ``nn.ModuleList`` children),
        in forward order: the units an engine shards or recomputes (activation checkpointing) one
        at a time. Single-device code: this only names them."""
        return [block for child in self.children() if isinstance(child, nn.ModuleList) for block in child]

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype of the learned layers in this forward (:func:`zoo.models.precision.compute_dtype`):
        island outputs are cast to it where the learned layers take them."""
        return compute_dtype(self, device)

    @property
    def data_cutoff(self) -> float:
        """The cutoff (Å) the input graph must be built with: the largest of :attr:`graph_cutoffs`.

        The one answer to "which cutoff does this model's graph need" (loader, calculator, FLOP
        counter and tests all ask it here). Edges longer than a block's own cutoff are dropped
        inside the model.
        """
        return float(max(self.graph_cutoffs))

    # ------------------------------------------------------------------------------------------
    def set_normalization(self, element_references: Sequence[float] | None, force_rms: float) -> None:
        """Set per-element energy references (eV, indexed by Z) and the force scale σ (eV/Å).

        Raises ``ValueError`` if σ is not positive and finite or the references are not finite.
        """
        if not (force_rms > 0 and torch.isfinite(torch.tensor(force_rms))):
            raise ValueError(f"force_rms must be positive and finite, got {force_rms}")
        refs = torch.zeros(self.max_atomic_number + 1, dtype=torch.float64)
        if element_references is not None:
            given = torch.as_tensor(list(element_references), dtype=torch.float64)
            if not torch.isfinite(given).all():
                raise ValueError("element_references contain NaN or inf")
            n = min(len(given), len(refs))
            refs[:n] = given[:n]
        self.element_references = refs
        self.force_rms = float(force_rms)

    def normalization(self) -> dict:
        """The normalisation as JSON-ready data: ``{"element_references": [...], "force_rms": σ}``."""
        return {"element_references": self.element_references.tolist(), "force_rms": self.force_rms}

    # ------------------------------------------------------------------------------------------
    def interact(
        self,
        atomic_numbers: torch.Tensor,
        positions: torch.Tensor,
        edge_index: torch.Tensor,
        edge_vectors: torch.Tensor,
        batch: torch.Tensor,
        charge: torch.Tensor,
        spin: torch.Tensor,
        num_graphs: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Architecture-specific part. Implemented by subclasses.

        Parameters
        ----------
        atomic_numbers : ``[N]`` int64. positions : ``[N, 3]`` Å. edge_index : ``[2, E]``
        (source, target), only edges shorter than ``self.cutoff``. edge_vectors : ``[E, 3]`` Å,
        positions[source] − positions[target]. batch : ``[N]`` int64. charge, spin : ``[B]`` int64.

        Returns
        -------
        node_energy : ``[N]`` per-atom energy, normalised units (divided by σ).
        forces : ``[N, 3]`` normalised direct forces, or None when ``direct_forces`` is False.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------
    def check_input(self, batch) -> None:
        """Raise ``ValueError`` naming the structure for unsupported elements or coincident atoms."""
        z = batch[keys.ATOMIC_NUMBERS]
        bad = (z < 1) | (z > self.max_atomic_number)
        if bool(bad.any()):
            atom = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"structure {_structure_name(batch, atom)}: unsupported element Z={int(z[atom])} "
                f"(this model embeds Z = 1..{self.max_atomic_number})"
            )
        if self.compiled:  # the compiled region skips the embedding's own data-dependent check
            for module in self.modules():
                if isinstance(module, ChargeSpinEmbedding):
                    module.check(batch[keys.CHARGE], batch[keys.SPIN])

    def forward(self, batch) -> dict[str, torch.Tensor]:
        """Energy ``[B]`` (eV) and forces ``[N, 3]`` (eV/Å) of every structure in ``batch``."""
        self.check_input(batch)
        atomic_numbers = batch[keys.ATOMIC_NUMBERS]  # [N]
        node_batch = batch[keys.BATCH]  # [N]
        num_graphs = int(batch.num_graphs)
        # geometry in at least fp32 (zoo.models.precision): bf16 would hold a 10 Å coordinate to ±0.03 Å
        geometry = geometry_dtype(self.compute_dtype(batch[keys.POSITIONS].device))
        positions = batch[keys.POSITIONS].to(geometry)  # [N, 3]
        eager_gradient = not self.direct_forces and not self.compiled  # compiled: taken inside (torch.func)
        if eager_gradient:
            # a non-leaf view: autograd.grad w.r.t. it works under engines and flop counters
            positions = positions.detach().requires_grad_(True).view_as(positions)
        run = functools.partial(self._normalised_outputs, batch, positions, geometry, num_graphs)
        if eager_gradient and self.training:
            # the trainer's backward then reaches the parameters only (zoo.models.parameter_gradients; exact)
            normalised, gradient = parameter_gradients_only(run, self.parameters())
        else:
            normalised, gradient = run()  # [B], [N, 3]

        refs = self.element_references.to(positions.device)
        reference = torch.zeros(num_graphs, dtype=torch.float64, device=positions.device)
        reference = reference.index_add(0, node_batch, refs[atomic_numbers])  # [B] eV
        energy = reference + self.force_rms * normalised.double()  # [B] eV
        sign = 1.0 if self.direct_forces else -1.0  # direct head, or −∂E/∂positions
        forces = sign * self.force_rms * gradient  # [N, 3] eV/Å
        return {keys.ENERGY: energy, keys.FORCES: forces}

    def _normalised_outputs(self, batch, positions: torch.Tensor, geometry: torch.dtype,
                            num_graphs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalised energies ``[B]`` and the direct forces, or ``∂(ΣÊ)/∂positions``, ``[N, 3]``
        (normalised units, ``geometry`` dtype) of :meth:`forward`, from its checked inputs."""
        edge_index = batch[keys.EDGE_INDEX]  # [2, E]
        source, target = edge_index[0], edge_index[1]
        edge_vectors = positions[source] - positions[target]  # [E, 3]
        lengths = edge_vectors.detach().norm(dim=-1)  # [E]
        if lengths.numel() and bool((lengths < self.min_distance).any()):
            edge = int((lengths < self.min_distance).nonzero()[0, 0])
            raise ValueError(
                f"structure {_structure_name(batch, int(target[edge]))}: atoms {int(source[edge])} and "
                f"{int(target[edge])} are {float(lengths[edge]):.3g} Å apart (coincident atoms)"
            )
        keep = lengths < self.cutoff
        if not bool(keep.all()):
            edge_index, edge_vectors = edge_index[:, keep], edge_vectors[keep]

        node_batch = batch[keys.BATCH]  # [N]
        program = self.interact if self._compiled_interact is None else self._compiled_interact
        node_energy, direct = program(
            batch[keys.ATOMIC_NUMBERS],
            positions,
            edge_index,
            edge_vectors,
            node_batch,
            batch[keys.CHARGE],
            batch[keys.SPIN],
            num_graphs,
        )  # [N], [N, 3] | None (compiled conservative: [N], ∂(ΣE)/∂positions [N, 3])
        # the energy sum and the force output are fp32 islands (a bf16 running sum rounds at every atom)
        node_energy = node_energy.to(geometry)  # [N]
        normalised = torch.zeros(num_graphs, dtype=geometry, device=node_energy.device)
        normalised = normalised.index_add(0, node_batch, node_energy)  # [B]
        if self.direct_forces or self.compiled:
            return normalised, direct.to(geometry)  # the head's forces / the compiled program's gradient
        return normalised, self.energy_gradient(normalised, positions, edge_index)  # [B], [N, 3]


    def energy_gradient(self, energy: torch.Tensor, positions: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """``∂(Σ energy)/∂positions`` ``[N, 3]`` for conservative forces, never silently zero.

        Positions enter the energy only through edge vectors, so without edges (every atom
        isolated) the gradient is exactly zero and is returned as zeros. With edges, a gradient
        that autograd did not compute (energy built under ``torch.no_grad``/``inference_mode``, a
        compiled or detached forward) is an error: zeros there would be wrong forces that look right.

        Raises
        ------
        RuntimeError
            if the batch has edges but the energy has no autograd path to the positions.
        """
        gradient = None
        if torch.is_grad_enabled() and energy.requires_grad:
            (gradient,) = torch.autograd.grad(energy.sum(), positions, create_graph=self.training, allow_unused=True)
        if gradient is not None:
            return gradient  # [N, 3]
        if edge_index.shape[1] == 0:  # no edges: the energy does not depend on positions
            return torch.zeros_like(positions)
        why = ("gradients are disabled (torch.no_grad / torch.inference_mode): evaluate conservative forces "
               "under torch.enable_grad()") if not torch.is_grad_enabled() else (
               "autograd found no path from the energy to the positions (a detached, compiled or "
               "otherwise traced forward)")
        raise RuntimeError(f"conservative forces: no gradient of the energy with respect to positions although "
                           f"the batch has {edge_index.shape[1]} edges; {why}. Refusing to return zero forces.")


def _structure_name(batch, atom: int) -> str:
    """The id of the structure that holds ``atom`` (falls back to its index in the batch)."""
    index = int(batch[keys.BATCH][atom])
    ids = getattr(batch, keys.STRUCTURE_ID, None)
    if isinstance(ids, (list, tuple)) and index < len(ids) and ids[index]:
        return f"{ids[index]!r} (#{index} in batch)"
    return f"#{index} in batch"
