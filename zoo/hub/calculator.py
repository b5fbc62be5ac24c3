"""An ASE calculator over any zoo checkpoint, for running a trained model in one's own simulations.

>>> import tempfile
>>> from ase.build import molecule
>>> from zoo.hub.calculator import ZooCalculator
>>> from zoo.hub.checkpoint import save_checkpoint
>>> from zoo.hub.metadata import example
>>> from zoo.registry import build
>>> tmp = tempfile.TemporaryDirectory()
>>> run = {k: v for k, v in example().items() if k not in ("architecture", "width", "N")}
>>> checkpoint = save_checkpoint(f"{tmp.name}/step-00000010", build("mpnn", width=16), run)
>>> atoms = molecule("CH3CH2OH"); atoms.info.update(charge=0, spin=1)
>>> atoms.calc = ZooCalculator(checkpoint)  # or a release name (`zoo list`), e.g. "esen-w16-d60k"
>>> energy, forces = atoms.get_potential_energy(), atoms.get_forces()  # eV, eV/Å
>>> type(energy).__name__, forces.shape
('float', (9, 3))
>>> tmp.cleanup()

Charge (e) and spin multiplicity (2S+1) are read from ``atoms.info["charge"]`` and
``atoms.info["spin"]`` (OMol25's convention; defaults 0 and 1). They are checked
(:func:`datapipe.charge_spin.checked`: integers, multiplicity consistent with Σ Z − charge; a bad
value raises ``ValueError``, never rounded), and changing either on the same ``Atoms`` gives a
fresh result (ASE's own change detection ignores ``atoms.info``). Only non-periodic systems are
supported: the zoo's graphs are molecular (OMol25 has no periodicity), and a periodic ``Atoms``
raises ``ValueError`` rather than silently ignoring its images.
"""

from __future__ import annotations

import os

import torch
from ase.calculators.calculator import Calculator, all_changes

from datapipe import keys
from datapipe.graph import batch_from_atoms
from zoo.models.base import ForceField
from zoo.hub.load import load


class ZooCalculator(Calculator):
    """ASE calculator giving ``energy`` (eV) and ``forces`` (eV/Å) from a zoo model.

    Parameters
    ----------
    model : a release model name (``zoo list``; fetched and verified on first use), a checkpoint
        directory (see :mod:`zoo.hub.checkpoint`), or a built :class:`ForceField`.
    device : torch device to run on ("cpu", "cuda", …).
    """

    implemented_properties = ["energy", "forces", "free_energy"]

    def __init__(self, model: str | os.PathLike | ForceField, device: str = "cpu", **kwargs) -> None:
        super().__init__(**kwargs)
        self.device = torch.device(device)
        self.model = (model if isinstance(model, ForceField) else load(model, device=str(self.device))).eval()
        self.model.to(self.device)
        self.graph_cutoff = self.model.data_cutoff

    #: ``atoms.info`` keys the model reads: a change in any of them invalidates cached results
    info_keys = ("charge", "spin")

    def check_state(self, atoms, tol: float = 1e-15) -> list[str]:
        """What changed since the last calculation: ASE's comparison (positions, numbers, cell, …)
        plus the :attr:`info_keys` of ``atoms.info``, which ASE's ``compare_atoms`` ignores, so that
        a new charge or spin on the same ``Atoms`` never returns the previous result."""
        changes = list(super().check_state(atoms, tol))
        if self.atoms is not None and any(_info_value(atoms, key) != _info_value(self.atoms, key)
                                          for key in self.info_keys):
            changes.append("info")
        return changes

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        if self.atoms.pbc.any():
            raise ValueError("ZooCalculator supports non-periodic (molecular) systems only; atoms.pbc is set")
        dtype = next(self.model.parameters()).dtype
        batch = batch_from_atoms([self.atoms], cutoff=self.graph_cutoff, dtype=dtype).to(self.device)
        with torch.set_grad_enabled(not self.model.direct_forces):
            out = self.model(batch)
        energy = float(out[keys.ENERGY].detach()[0])
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "forces": out[keys.FORCES].detach().double().cpu().numpy(),
        }


def _info_value(atoms, key: str):
    """``atoms.info[key]`` in a comparable form (numpy scalars as Python numbers; None if absent)."""
    value = atoms.info.get(key)
    return value.item() if hasattr(value, "item") else value
