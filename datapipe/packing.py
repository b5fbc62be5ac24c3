"""Build a batch straight from decoded shard records (the loader's hot path).

:func:`batch_from_records` returns the same torch_geometric ``Batch`` as
``datapipe.graph.collate([datapipe.graph.structure_to_data(...) for each record])`` — same keys,
values, dtypes, ``batch``/``ptr`` vectors and ``num_graphs``, and ``to_data_list()`` still works —
but concatenates numpy arrays once per batch instead of building one ``Data`` per structure and
collating them (2-3x faster; ``benchmarks/bench_loader.py`` prints the ratio). The radius graph
is :func:`datapipe.graph.radius_graph` (vesin, uncapped), computed per structure.

It is split in two so that DataLoader workers send plain numpy arrays (a cheap pickle through
the pipe) instead of tensors (which torch moves through shared memory, costing as much CPU as
building the batch): :func:`batch_arrays` runs in the worker, :func:`to_batch` in the consumer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch_geometric.data import Batch, Data

from datapipe import keys
from datapipe.graph import radius_graph
from datapipe.shards import Record

_PER_ATOM = (keys.ATOMIC_NUMBERS, keys.POSITIONS, keys.FORCES)
_PER_STRUCTURE = (keys.ENERGY, keys.CHARGE, keys.SPIN, keys.NATOMS)


def batch_from_records(records: Sequence[Record], cutoff: float = keys.DEFAULT_CUTOFF) -> Batch:
    """One torch_geometric ``Batch`` of ``records`` with radius graphs (cutoff in Å).

    Returns
    -------
    Batch with ``atomic_numbers [N]`` int64, ``positions [N, 3]`` float32 Å, ``forces [N, 3]``
    float32 eV/Å, ``energy [B]`` float64 eV, ``charge [B]``, ``spin [B]``, ``natoms [B]`` int64,
    ``edge_index [2, E]`` int64 (source, target; offsets applied), ``batch [N]``, ``ptr [B+1]``,
    ``structure_id``/``source`` lists of B strings.

    Raises
    ------
    ValueError if ``records`` is empty.
    """
    return to_batch(batch_arrays(records, cutoff))


def batch_arrays(records: Sequence[Record], cutoff: float = keys.DEFAULT_CUTOFF) -> dict:
    """The fields of :func:`batch_from_records` as numpy arrays (and lists of strings), plus
    ``"ptr"`` ``[B + 1]`` and ``"n_edges"`` ``[B]``. Raises ValueError if ``records`` is empty."""
    if len(records) == 0:
        raise ValueError("cannot batch an empty list of structures")
    natoms = np.array([r.natoms for r in records], dtype=np.int64)  # [B]
    ptr = np.concatenate([[0], np.cumsum(natoms)])  # [B + 1]
    edges = [radius_graph(r.positions, cutoff) for r in records]  # each [2, E_s]
    return {
        keys.EDGE_INDEX: np.concatenate([e + offset for e, offset in zip(edges, ptr[:-1])], axis=1),  # [2, E]
        keys.ATOMIC_NUMBERS: np.concatenate([r.numbers for r in records]).astype(np.int64),  # [N]
        keys.POSITIONS: np.concatenate([r.positions for r in records]).astype(np.float32),  # [N, 3]
        keys.FORCES: np.concatenate([r.forces for r in records]).astype(np.float32),  # [N, 3]
        keys.ENERGY: np.array([r.energy for r in records], dtype=np.float64),  # [B]
        keys.CHARGE: np.array([r.charge for r in records], dtype=np.int64),  # [B]
        keys.SPIN: np.array([r.spin for r in records], dtype=np.int64),  # [B]
        keys.NATOMS: natoms,
        keys.STRUCTURE_ID: [r.structure_id for r in records],
        keys.SOURCE: [r.source for r in records],
        "ptr": ptr,
        "n_edges": np.array([e.shape[1] for e in edges], dtype=np.int64),  # [B]
    }


def to_batch(arrays: dict) -> Batch:
    """Wrap :func:`batch_arrays` output as a torch_geometric ``Batch`` (no copies of the data)."""
    natoms, ptr = arrays[keys.NATOMS], arrays["ptr"]
    n_structures = len(natoms)
    out = Batch(_base_cls=Data)
    for key in (keys.EDGE_INDEX, *_PER_ATOM, *_PER_STRUCTURE):
        out[key] = torch.from_numpy(arrays[key])
    out[keys.STRUCTURE_ID] = arrays[keys.STRUCTURE_ID]
    out[keys.SOURCE] = arrays[keys.SOURCE]
    out[keys.BATCH] = torch.from_numpy(np.repeat(np.arange(n_structures, dtype=np.int64), natoms))  # [N]
    ptr_t = torch.from_numpy(ptr)  # [B + 1]
    out.ptr = ptr_t
    out.num_nodes = int(ptr[-1])

    # bookkeeping torch_geometric keeps to split a batch back into structures (to_data_list)
    out._store._num_nodes = natoms.tolist()
    per_structure, zeros = torch.arange(n_structures + 1), torch.zeros(n_structures, dtype=torch.int64)
    out._num_graphs = n_structures
    out._slice_dict = {keys.EDGE_INDEX: torch.from_numpy(np.concatenate([[0], np.cumsum(arrays["n_edges"])]))}
    out._inc_dict = {keys.EDGE_INDEX: ptr_t[:-1]}
    for key in _PER_ATOM:
        out._slice_dict[key], out._inc_dict[key] = ptr_t, zeros
    for key in _PER_STRUCTURE:
        out._slice_dict[key], out._inc_dict[key] = per_structure, zeros
    for key in (keys.STRUCTURE_ID, keys.SOURCE):
        out._slice_dict[key], out._inc_dict[key] = per_structure, None
    return out
