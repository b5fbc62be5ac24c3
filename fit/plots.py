"""PNG figures of the fits: frontier, L(N, D) iso-loss contours with the optimal path, residuals."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fit.allocation import optimal_allocation  # noqa: E402
from fit.frontier import frontier_owners  # noqa: E402


def _colors(n):
    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


def _note(ax, lines: list[str]) -> None:
    """Write ``lines`` (failed fits, warnings) in red across the middle of ``ax``."""
    if lines:
        import textwrap

        text = "\n".join(textwrap.fill(line, 70) for line in lines)
        ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=7, color="darkred",
                bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "darkred"}, zorder=10)


def plot_frontier(tables: dict, fits: dict, path: Path, loss_label: str, data_label: str = "data",
                  failures: dict | None = None, warnings: list | None = None) -> Path:
    """All checkpoints (faint), frontier owners (filled) and fitted L(C) per group, log-log.

    Parameters
    ----------
    tables : dict[str, RunTable]
    fits : dict[str, FrontierFit | None]
    path : Path
        Output PNG.
    failures : ``{group: {law: message}}`` of fits that failed; the frontier's are written on the plot.
    warnings : lines written on the plot (e.g. a frontier from one model).
    """
    fig, ax = plt.subplots(figsize=(7.5, 5.2), dpi=130)
    for (name, t), col in zip(tables.items(), _colors(len(tables))):
        ax.scatter(t.C, t.L, s=8, color=col, alpha=0.18, lw=0)
        own = frontier_owners(t.C, t.L)
        ax.scatter(t.C[own], t.L[own], s=16, color=col, edgecolor="k", lw=0.3, zorder=3)
        f = fits.get(name)
        if f is not None and f.converged:
            cs = np.geomspace(t.C[own].min(), t.C[own].max(), 100)
            p = f.params
            lab = f"{name}: γ_c = {p['gamma_c']:.3f}"
            if name in fits and f.intervals.get("gamma_c") is not None:
                iv = f.intervals["gamma_c"]
                lab += f" [{iv.lo:.3f}, {iv.hi:.3f}]"
            if f.l_inf_free:
                lab += f", L∞ = {p['L_inf']:.3g}"
            ax.plot(cs, f.predict(cs), color=col, lw=1.8, label=lab)
        else:
            ax.plot([], [], color=col, lw=0, label=f"{name}: frontier fit failed")
    notes = [f"{name}: frontier fit failed: {msg['frontier']}" for name, msg in (failures or {}).items()
             if "frontier" in msg]
    _note(ax, notes + [w for w in warnings or [] if "fit failed" not in w and "could not be made" not in w])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel(f"validation loss L ({loss_label})")
    ax.set_title("Compute frontier  L(C) = L∞ + F_c·C^(−γ_c)\n(faint: all checkpoints; outlined: frontier)", fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, title="group: exponent [95% CI]", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_nd(t, fit, k: float, path: Path, group: str, loss_label: str, data_unit: str) -> Path:
    """Iso-loss contours of the fitted L(N, D), data coloured by loss, iso-FLOP lines and N*(C)."""
    fig, ax = plt.subplots(figsize=(7.5, 5.6), dpi=130)
    ln, ld = np.log10(t.N), np.log10(t.D)
    pad = 0.25
    gx = np.linspace(ln.min() - pad, ln.max() + pad, 200)
    gy = np.linspace(ld.min() - pad, ld.max() + pad, 200)
    xx, yy = np.meshgrid(gx, gy)
    zz = fit.predict(10**xx, 10**yy)
    lv = np.quantile(t.L, np.linspace(0.02, 0.98, 10))
    lv = np.unique(np.round(lv, 4))
    cs = ax.contour(xx, yy, zz, levels=lv, colors="0.35", linewidths=0.8)
    ax.clabel(cs, fontsize=7, fmt="%.3g")
    sc = ax.scatter(ln, ld, c=t.L, s=14, cmap="viridis_r", norm=matplotlib.colors.LogNorm(), zorder=3,
                    edgecolor="k", lw=0.2)
    fig.colorbar(sc, ax=ax, label=f"observed loss ({loss_label})")
    cgrid = 10 ** np.linspace(np.log10(t.C.min()), np.log10(t.C.max()), 5)
    for c in cgrid:  # iso-FLOP lines N·D = C/k
        ax.plot(gx, np.log10(c / k) - gx, ls=":", color="tab:gray", lw=0.8)
        ax.annotate(f"C={c:.1e}", (gx[-1], np.log10(c / k) - gx[-1]), fontsize=6, color="tab:gray",
                    xytext=(-40, 0), textcoords="offset points")
    cpath = np.geomspace(t.C.min(), t.C.max(), 60)
    opt = optimal_allocation(fit.theta, cpath, k)
    ax.plot(np.log10(opt["N_opt"]), np.log10(opt["D_opt"]), color="tab:red", lw=2.2,
            label=f"compute-optimal N*(C) ∝ C^{fit.params['a']:.2f}, D* ∝ C^{fit.params['b']:.2f}")
    ax.set_xlim(gx[0], gx[-1])
    ax.set_ylim(gy[0], gy[-1])
    ax.set_xlabel("log10 N (parameters)")
    ax.set_ylabel(f"log10 D ({data_unit} seen)")
    p = fit.params
    ax.set_title(f"{group}: L(N,D) = {p['E']:.3g} + {p['A']:.3g}·N^-{p['alpha']:.3f} + {p['B']:.3g}·D^-{p['beta']:.3f}"
                 f"\ncontours: fitted loss; dotted: iso-FLOP C = {k:.3g}·N·D", fontsize=9)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_residuals(tables: dict, nd_fits: dict, frontier_fits: dict, path: Path, failures: dict | None = None) -> Path:
    """Log residuals log L̂ − log L against compute: L(N, D) (all points) and frontier (owners).

    ``failures`` (``{group: {law: message}}``): a failed fit is written on its panel instead of
    leaving it empty.
    """
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), dpi=130, sharey=False)
    for (name, t), col in zip(tables.items(), _colors(len(tables))):
        f = nd_fits.get(name)
        if f is not None and f.converged:
            r = np.log(f.predict(t.N, t.D)) - np.log(t.L)
            axes[0].scatter(t.C, r, s=8, color=col, alpha=0.6, label=f"{name} (rms {np.sqrt(np.mean(r * r)):.3f})")
        ff = frontier_fits.get(name)
        if ff is not None and ff.converged:
            o = ff.owners
            r = np.log(ff.predict(t.C[o])) - np.log(t.L[o])
            axes[1].plot(t.C[o], r, "o-", ms=3, lw=0.6, color=col, label=f"{name} (rms {np.sqrt(np.mean(r * r)):.3f})")
    for ax, law in zip(axes, ("nd", "frontier")):
        _note(ax, [f"{name}: {'L(N, D)' if law == 'nd' else 'frontier'} fit failed: {msg[law]}"
                   for name, msg in (failures or {}).items() if law in msg])
    for ax, title in zip(axes, ("L(N, D) fit, all points", "frontier fit, frontier checkpoints")):
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("training compute C (FLOPs)")
        ax.set_ylabel("log residual  ln L̂ − ln L")
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.25)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_isoflop(fit, path: Path, group: str, loss_label: str) -> Path:
    """Loss against N at each compute level with the fitted parabolas, and N_opt(C)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), dpi=130)
    cols = plt.get_cmap("viridis")(np.linspace(0, 0.9, max(1, len(fit.levels))))
    for lv, col in zip(fit.levels, cols):
        x = np.array(lv["log10_N"])
        axes[0].scatter(10**x, lv["L"], s=10, color=col)
        xs = np.linspace(x.min(), x.max(), 50)
        axes[0].plot(10**xs, np.polyval(lv["coef"], xs), color=col, lw=1, label=f"C={lv['C']:.1e}")
        axes[0].axvline(lv["N_opt"], color=col, ls=":", lw=0.7)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("N (parameters)")
    axes[0].set_ylabel(f"loss ({loss_label})")
    axes[0].set_title(f"{group}: isoFLOP profiles ({fit.mode})", fontsize=10)
    axes[0].legend(fontsize=6)
    c = np.array([lv["C"] for lv in fit.levels])
    n = np.array([lv["N_opt"] for lv in fit.levels])
    axes[1].scatter(c, n, color="k", s=14)
    if fit.converged:
        cs = np.geomspace(c.min(), c.max(), 50)
        axes[1].plot(cs, 10 ** (fit.params["log10_N_coef"] + fit.params["a"] * np.log10(cs)), "r-",
                     label=f"N_opt ∝ C^{fit.params['a']:.3f}")
        axes[1].legend(fontsize=8)
    axes[1].set_xscale("log")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("training compute C (FLOPs)")
    axes[1].set_ylabel("loss-minimising N_opt (parameters)")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.25)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
