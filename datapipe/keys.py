"""The names of every field that flows through symscale, with shape, dtype and unit.

One module names every key (as NequIP's ``_keys.py`` does) so that datapipe, launcher, zoo and
the tests speak the same words. ``N`` is the number of atoms in a batch, ``B`` the number of
structures, ``E`` the number of directed edges.

Conventions
-----------
- Units: positions in Å, energy in eV, forces in eV/Å, charge in elementary charges ``e``,
  spin as the multiplicity ``2S+1`` (OMol25's convention: ``atoms.info["charge"]``,
  ``atoms.info["spin"]``).
- ``edge_index[0]`` is the *source* atom ``j``, ``edge_index[1]`` the *target* atom ``i``;
  messages flow from source to target and are summed on the target.
- ``edge_vectors = positions[source] - positions[target]`` (the vector from ``i`` to ``j``).
- Both directions of every pair are present (a full neighbour list); no self edges.
"""

from __future__ import annotations

# --- per atom -------------------------------------------------------------------------------
POSITIONS = "positions"  #: ``[N, 3]`` float32, Å
ATOMIC_NUMBERS = "atomic_numbers"  #: ``[N]`` int64, Z in 1..MAX_ATOMIC_NUMBER
FORCES = "forces"  #: ``[N, 3]`` float32, eV/Å
BATCH = "batch"  #: ``[N]`` int64, index of the structure each atom belongs to

# --- per structure --------------------------------------------------------------------------
ENERGY = "energy"  #: ``[B]`` float64, eV, total energy
CHARGE = "charge"  #: ``[B]`` int64, e, total charge
SPIN = "spin"  #: ``[B]`` int64, spin multiplicity 2S+1 (1 = singlet)
NATOMS = "natoms"  #: ``[B]`` int64, atoms in each structure
STRUCTURE_ID = "structure_id"  #: ``list[str]`` of length B, stable id ``"{source}:{row}"``
SOURCE = "source"  #: ``list[str]`` of length B, the file the structure came from

# --- per edge -------------------------------------------------------------------------------
EDGE_INDEX = "edge_index"  #: ``[2, E]`` int64, (source j, target i), offsets already applied
EDGE_VECTORS = "edge_vectors"  #: ``[E, 3]`` float32, Å, positions[source] - positions[target]
EDGE_LENGTHS = "edge_lengths"  #: ``[E]`` float32, Å

# --- model outputs ----------------------------------------------------------------------------
#: A model maps a batch to ``{ENERGY: [B] eV, FORCES: [N, 3] eV/Å}``.
MODEL_OUTPUTS = (ENERGY, FORCES)

#: Heaviest element a model embeds (OMol25 covers H..Bi, Z = 83); Z = 0 or above this is refused.
MAX_ATOMIC_NUMBER = 100

#: Default radius-graph cutoff, Å (docs/DESIGN.md; the paper's main graph).
DEFAULT_CUTOFF = 6.0
