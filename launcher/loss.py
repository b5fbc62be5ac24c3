"""The training loss of arXiv 2510.09768, with means that are global across ranks.

In units of the training force RMS σ (eV/Å), for a global batch of ``B`` structures and ``N`` atoms
(all ranks together):

.. math::

    L = \\frac{1}{B} \\sum_b \\frac{|\\hat E_b - E_b|}{n_b\\,σ}
      + \\frac{1}{N} \\sum_i \\frac{\\lVert \\hat F_i - F_i \\rVert_2}{σ}

— the per-atom energy MAE plus the per-atom force L2 norm (not squared), equal weights. Batches
are packed by atoms, so ranks hold different numbers of structures and atoms; a mean per rank
followed by DeepSpeed's gradient average would weight structures unequally. Instead the sums
and counts are all-reduced (as fairchem's ``DDPMTLoss`` and torchtitan's global token count do)
and each rank back-propagates ``world_size × local_sum / global_count``; the engine's average over
ranks then yields the gradient of the global mean exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from datapipe import keys


@dataclass
class LossTerms:
    """Local (this rank's) sums of one batch.

    energy_sum : scalar tensor, Σ_b |ΔE_b| / (n_b σ) (differentiable).
    force_sum : scalar tensor, Σ_i ‖ΔF_i‖₂ / σ (differentiable).
    structures, atoms : counts of this rank's batch.
    nonfinite : ids of the structures whose energy or force error is not finite (empty when all are).
    """

    energy_sum: torch.Tensor
    force_sum: torch.Tensor
    structures: int
    atoms: int
    nonfinite: list = field(default_factory=list)


def loss_terms(prediction: dict[str, torch.Tensor], batch, force_rms: float, strict: bool = True) -> LossTerms:
    """Per-rank sums of the normalised energy and force errors.

    Parameters
    ----------
    prediction : the model's ``{"energy": [B] eV, "forces": [N, 3] eV/Å}``.
    batch : the torch-geometric batch with reference ``energy`` ``[B]``, ``forces`` ``[N, 3]``
        and ``natoms`` ``[B]``.
    force_rms : σ, eV/Å.
    strict : raise on a non-finite error (validation); False (training) records the structures in
        :attr:`LossTerms.nonfinite` instead, so that every rank can take the same decision after
        the global all-reduce (:func:`global_loss`) rather than one rank raising while the others
        wait in a collective.

    Raises
    ------
    ValueError
        with ``strict``, if a prediction or label is not finite (naming the first structure affected).
    """
    natoms = batch[keys.NATOMS].to(torch.float64)  # [B]
    energy_error = (prediction[keys.ENERGY].double() - batch[keys.ENERGY].double()).abs()  # [B] eV
    force_error = prediction[keys.FORCES].float() - batch[keys.FORCES].float()  # [N, 3] eV/Å
    energy_sum = (energy_error / natoms).sum() / force_rms
    force_sum = torch.linalg.vector_norm(force_error, dim=-1).sum() / force_rms
    nonfinite = []
    if not (torch.isfinite(energy_sum) and torch.isfinite(force_sum)):
        per_structure = energy_error.detach() + torch.zeros_like(energy_error).index_add(
            0, batch[keys.BATCH], force_error.detach().abs().sum(-1).double()
        )  # [B]
        ids = getattr(batch, keys.STRUCTURE_ID, None)
        nonfinite = [ids[i] if isinstance(ids, (list, tuple)) else f"#{i}"
                     for i in (~torch.isfinite(per_structure)).nonzero()[:, 0].tolist()]
        if strict:
            raise ValueError(f"structure {nonfinite[0]!r}: non-finite energy or force error in the loss")
    return LossTerms(energy_sum, force_sum, int(natoms.numel()), int(natoms.sum().item()), nonfinite)


def global_loss(terms: LossTerms, extra: list[float] | None = None) -> tuple[torch.Tensor, dict]:
    """The loss this rank back-propagates so that the engine's gradient average is the global mean.

    One all-reduce (float64) carries the structure and atom counts, the detached sums for logging
    and any ``extra`` per-rank numbers to be summed (e.g. FLOPs).

    Returns
    -------
    loss : scalar tensor, ``world_size · (energy_sum / B_global + force_sum / N_global)``.
    stats : ``{"loss", "energy_loss", "force_loss"}`` global means (floats, normalised units; over
        the finite ranks' sums), ``{"structures", "atoms"}`` global counts, ``"nonfinite"`` the
        number of structures with a non-finite error on all ranks (the same on every rank: skip
        the step when it is not 0) and ``"extra"`` (the summed list).
    """
    extra = list(extra or [])
    device = terms.energy_sum.device
    sums = [0.0, 0.0] if terms.nonfinite else [terms.energy_sum.item(), terms.force_sum.item()]
    numbers = torch.tensor(
        [terms.structures, terms.atoms, *sums, float(len(terms.nonfinite)), *extra],
        dtype=torch.float64,
        device=device,
    )
    world = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(numbers)
        world = dist.get_world_size()
    structures, atoms = numbers[0].item(), numbers[1].item()
    if structures < 1 or atoms < 1:
        raise ValueError("the global batch holds no structure")
    loss = world * (terms.energy_sum / structures + terms.force_sum / atoms)
    stats = {
        "energy_loss": numbers[2].item() / structures,
        "force_loss": numbers[3].item() / atoms,
        "structures": round(structures),
        "atoms": round(atoms),
        "nonfinite": round(numbers[4].item()),
        "extra": numbers[5:].tolist(),
    }
    stats["loss"] = stats["energy_loss"] + stats["force_loss"]
    return loss.float(), stats
