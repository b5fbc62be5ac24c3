"""Activation memory of a training step, measured on the model's own autograd graph.

What autograd keeps between the forward and the backward is the tensors each operator saves for
its gradient. :func:`measure_activations` runs the model's forward (and, for conservative forces,
the force backward with ``create_graph=True``) under ``torch.autograd.graph.saved_tensors_hooks``
and adds up the bytes of the distinct storages saved (parameters excluded: they are model state).
On the meta device this costs no memory and gives the byte count of the real run at any width
(dtypes and shapes are the same); a model whose forward needs values (GemNet-OC) is measured on
the CPU at small widths and extrapolated (:func:`activations_per_atom`).

The per-block part is recorded too, so activation checkpointing (only each block's inputs kept,
one block recomputed at a time) can be estimated from the same measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zoo.flops.trace import TraceableForceField, trace_inputs


@dataclass
class Activations:
    """Saved-tensor bytes of one training step on one batch.

    Attributes
    ----------
    total : bytes kept for the backward (distinct storages, parameters excluded).
    blocks : bytes saved inside each repeated block (in forward order).
    block_inputs : bytes of each block's input tensors (what checkpointing keeps).
    atoms, edges : batch size.
    """

    total: int
    blocks: list[int]
    block_inputs: list[int]
    atoms: int
    edges: int

    @property
    def checkpointed(self) -> int:
        """Bytes with per-block activation checkpointing: everything outside the blocks, each
        block's inputs, and one block's activations while it is recomputed."""
        outside = self.total - sum(self.blocks)
        return outside + sum(self.block_inputs) + (max(self.blocks) if self.blocks else 0)


def _storage_key(tensor: torch.Tensor) -> tuple[int, int]:
    storage = tensor.untyped_storage()
    return storage._cdata, storage.nbytes()


def measure_activations(model: torch.nn.Module, batch, direct_forces: bool | None = None) -> Activations:
    """Measure the saved-tensor bytes of ``model`` on ``batch`` (see module docstring).

    ``model`` may live on the meta device (then the inputs are moved there). Raises what the
    forward raises (e.g. ``RuntimeError`` for a value-dependent op on the meta device).
    """
    direct = model.direct_forces if direct_forces is None else bool(direct_forces)
    inputs = list(trace_inputs(model, batch))
    meta = next(model.parameters()).is_meta
    if meta:
        inputs = [t.to("meta") for t in inputs]
    params = {_storage_key(p)[0] for p in model.parameters()}
    saved: dict[int, int] = {}
    per_block: list[int] = []
    block_inputs: list[int] = []
    current: list[dict[int, int] | None] = [None]

    def pack(tensor):
        key, nbytes = _storage_key(tensor)
        if key not in params:
            saved[key] = max(saved.get(key, 0), nbytes)
            if current[0] is not None:
                current[0][key] = max(current[0].get(key, 0), nbytes)
        return tensor

    def before(module, args):
        current[0] = {}
        block_inputs.append(sum(a.numel() * a.element_size() for a in args if torch.is_tensor(a) and a.is_floating_point()))

    def after(module, args, output):
        per_block.append(sum(current[0].values()))
        current[0] = None

    handles = []
    for block in model.repeated_blocks():
        handles += [block.register_forward_pre_hook(before), block.register_forward_hook(after)]
    wrapper = TraceableForceField(model, int(batch.num_graphs))
    positions = inputs[1].detach().requires_grad_(not direct)
    inputs[1] = positions.view_as(positions) if not direct else positions
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = wrapper(*inputs)
            energy = out[0] if isinstance(out, tuple) else out  # [B]
            if not direct:
                torch.autograd.grad(energy.sum(), positions, create_graph=True)
    finally:
        for h in handles:
            h.remove()
    return Activations(total=sum(saved.values()), blocks=per_block, block_inputs=block_inputs,
                       atoms=int(inputs[0].shape[0]), edges=int(inputs[2].shape[1]))


def activations_per_atom(name: str, width: int, direct_forces: bool, structures, dtype=torch.float32,
                         **overrides) -> dict:
    """Saved-tensor bytes per atom of architecture ``name`` at ``width`` on ``structures``.

    Returns ``{"per_atom", "per_atom_checkpointed", "edges_per_atom", "method"}``; ``method`` is
    ``"meta"`` (measured at ``width`` on the meta device) or ``"extrapolated"`` (measured on the
    CPU at widths 8, 16, 32 and fitted as a quadratic in the width — activations are linear in
    the width for every zoo model; the quadratic term absorbs what is not).
    """
    from datapipe.graph import batch_from_atoms
    from zoo.registry import build

    def measure(w: int, device: str) -> Activations:
        torch.manual_seed(0)
        with torch.device(device):
            model = build(name, width=w, direct_forces=direct_forces, **overrides).to(dtype)
        model.train()
        return measure_activations(model, batch_from_atoms(structures, cutoff=model.data_cutoff))

    try:
        got = measure(width, "meta")
        total, checkpointed, method = got.total, got.checkpointed, "meta"
    except (RuntimeError, NotImplementedError):
        widths = [8, 16, 32]
        runs = [measure(w, "cpu") for w in widths]
        design = torch.tensor([[1.0, w, w * w] for w in widths], dtype=torch.float64)
        x = torch.tensor([1.0, width, width * width], dtype=torch.float64)
        fit = lambda ys: float(x @ torch.linalg.solve(design, torch.tensor(ys, dtype=torch.float64)))  # noqa: E731
        total, checkpointed = fit([r.total for r in runs]), fit([r.checkpointed for r in runs])
        got, method = runs[-1], "extrapolated"
    return {"per_atom": total / got.atoms, "per_atom_checkpointed": checkpointed / got.atoms,
            "edges_per_atom": got.edges / got.atoms, "method": method}
