"""Every architecture trains with the launcher's recipe: a few steps lower the training loss.

One process, tiny widths, one fixed batch of the EMT test data: the paper's loss
(:mod:`launcher.loss`), schedule-free AdamW (:mod:`launcher.optim`) at the launcher's learning
rate for the width, GemNet-OC's scale factors fitted first as the launcher does
(:mod:`zoo.models.gemnet_oc.scales`). The distributed path is covered by test_engines / test_resume.
"""

import ase.db
import pytest
import torch

from datapipe.graph import batch_from_atoms
from launcher.config import TrainConfig
from launcher.loss import global_loss, loss_terms
from launcher.optim import build_optimizer
from zoo.models.gemnet_oc.blocks import fit_scale_factors
from zoo.registry import build

#: (model, width, constructor overrides): small enough for a few seconds per model on one core
TINY_MODELS = [
    ("mpnn", 8, {"num_layers": 1}),
    ("mc-egnn", 8, {"num_layers": 2}),
    ("gemnet-oc", 8, {"num_blocks": 1}),
    ("esen", 8, {"num_layers": 1}),
]


@pytest.mark.parametrize("name,width,overrides", TINY_MODELS, ids=[m[0] for m in TINY_MODELS])
def test_training_lowers_the_loss(data, name, width, overrides):
    with ase.db.connect(str(data["raw_train"])) as db:
        atoms = [row.toatoms() for row in db.select(limit=6)]
    for a in atoms:
        a.info.update(charge=0, spin=1 + int(a.numbers.sum()) % 2)  # multiplicity fits Σ Z
    torch.manual_seed(0)
    model = build(name, width, **overrides)
    batch = batch_from_atoms(atoms, cutoff=model.data_cutoff)
    sigma = float(batch["forces"].pow(2).mean().sqrt())
    references = [0.0] * 10
    references[1], references[6], references[7], references[8] = -0.5, -2.0, -1.5, -1.0  # EMT energies, eV
    model.set_normalization(references, sigma)
    if name == "gemnet-oc":
        fit_scale_factors(model, [batch])
    lr = TrainConfig(model=name).learning_rate(width)
    optimizer = build_optimizer(model, lr)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss, stats = global_loss(loss_terms(model(batch), batch, sigma))
        loss.backward()
        optimizer.step()
        losses.append(stats["loss"])
    assert all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[-3:]) < 0.8 * losses[0], (name, losses)
