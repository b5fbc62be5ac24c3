"""Validation on the held-out split: energy and force MAE, the loss, and the zero-force baseline.

The single-device model holding the schedule-free averaged weights exists on rank 0 only
(:mod:`launcher.materialise`), which evaluates the whole split; the other ranks pass ``model=None``
and no batches and join the all-reduce of the sums, so every rank returns the same metrics.

Metrics (all global over the split):

- ``energy_mae_mev_per_atom`` — mean over structures of |ΔE| / n_atoms, meV/atom;
- ``force_mae_mev_per_A`` — mean over force components of |ΔF_ia|, meV/Å (fairchem's
  ``forces_mae`` convention);
- ``zero_force_mae_mev_per_A`` — the same for a model that predicts zero forces (mean |F_ia|), the
  baseline the force MAE must beat;
- ``force_l2_mae_mev_per_A`` — mean over atoms of ‖ΔF_i‖₂ (the loss's force term, in meV/Å);
- ``loss`` (and ``energy_loss``, ``force_loss``) — the training loss (:mod:`launcher.loss`) in
  units of the force RMS.
"""

from __future__ import annotations

import torch

from datapipe import keys
from launcher.engine import all_reduce_sum
from launcher.loss import loss_terms


def validate(model, batches, device: torch.device, force_rms: float, progress=None) -> dict:
    """Evaluate ``model`` on ``batches`` (this rank's share) and reduce over ranks.

    Parameters
    ----------
    model : single-device :class:`~zoo.models.base.ForceField` (fp32), or None on a rank that evaluates nothing.
    batches : iterable of torch-geometric batches with reference energy and forces.
    force_rms : σ of the training split (eV/Å), for the loss.
    progress : optional ``progress(structures)`` called after each batch with its structure count.

    Returns
    -------
    dict of floats (see the module docstring) plus ``structures`` and ``atoms`` counts.
    """
    was_training = model is not None and model.training
    if model is not None:
        model.eval()
    # structures, atoms, components, Σ|ΔE|/n (eV), Σ|ΔF| (eV/Å), Σ|F|, Σ‖ΔF‖₂
    sums = [0.0] * 7
    for batch in batches:
        batch = batch.to(device)
        with torch.set_grad_enabled(not model.direct_forces):
            out = model(batch)
        out = {name: value.detach() for name, value in out.items()}
        terms = loss_terms(out, batch, force_rms=1.0)  # Σ|ΔE|/n in eV, Σ‖ΔF‖₂ in eV/Å
        df = out[keys.FORCES].float() - batch[keys.FORCES].float()  # [N, 3]
        sums[0] += terms.structures
        sums[1] += terms.atoms
        sums[2] += float(df.numel())
        sums[3] += float(terms.energy_sum)
        sums[4] += float(df.abs().double().sum())
        sums[5] += float(batch[keys.FORCES].abs().double().sum())
        sums[6] += float(terms.force_sum)
        if progress is not None:
            progress(terms.structures)
    if model is not None:
        model.train(was_training)
    n_struct, n_atoms, n_comp, e_abs, f_abs, zero_abs, f_l2 = all_reduce_sum(sums, device)
    if n_struct < 1:
        raise ValueError("the validation split holds no structure")
    energy_loss = e_abs / n_struct / force_rms
    force_loss = f_l2 / n_atoms / force_rms
    return {
        "loss": energy_loss + force_loss,
        "energy_loss": energy_loss,
        "force_loss": force_loss,
        "energy_mae_mev_per_atom": 1000.0 * e_abs / n_struct,
        "force_mae_mev_per_A": 1000.0 * f_abs / n_comp,
        "zero_force_mae_mev_per_A": 1000.0 * zero_abs / n_comp,
        "force_l2_mae_mev_per_A": 1000.0 * f_l2 / n_atoms,
        "structures": int(n_struct),
        "atoms": int(n_atoms),
    }
