"""``zoo publish``: make a release (checkpoints + ``manifest.json`` + model card) from finished runs.

For each run directory (``RUN_DIR/checkpoints/step-*``) the checkpoints are chosen by ``select``:

- ``final``: the last checkpoint of each run;
- ``all``: every checkpoint;
- ``frontier``: the checkpoints that own the compute frontier of their architecture — those that set
  a new minimum validation loss as FLOPs grow, over all runs and checkpoints given
  (:func:`fit.frontier.frontier_owners`, read through the run table of :func:`zoo.hub.metadata.table_row`).

Each chosen checkpoint's weights are verified (:func:`zoo.hub.checkpoint.verify_weights`) and its
``model.safetensors`` and ``metadata.json`` copied to ``OUT/<name>/``, where ``name`` is
``<architecture>-w<width>-d<atoms seen>`` (``esen-w16-d120k``). The manifest lists every file with
its size and SHA-256; ``README.md`` is the model card.

``--to-hub ORG/REPO`` uploads the folder with ``huggingface_hub`` (``HfApi.upload_folder``). The
user authenticates as usual for the Hub: ``huggingface-cli login`` (or ``hf auth login``) once, or
the ``HF_TOKEN`` environment variable. The commit it makes is pinned in ``manifest.hub.json``
(source ``hf://ORG/REPO@COMMIT``), the manifest users then pass to ``--registry``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from zoo.hub.checkpoint import verify_weights
from zoo.hub.metadata import METADATA, WEIGHTS, read, sha256_file, table_row
from zoo.hub.release import FORMAT, MANIFEST, check_name, parse_manifest

SELECT = ("final", "frontier", "all")


def human_count(value: float) -> str:
    """``356460 → '356k'``, ``1.2e6 → '1.2m'`` (three significant figures at most, lower case).

    >>> human_count(356460), human_count(40000), human_count(1_200_000), human_count(950)
    ('356k', '40k', '1.2m', '950')
    """
    for factor, suffix in ((1e9, "g"), (1e6, "m"), (1e3, "k")):
        if value >= factor:
            text = f"{value / factor:.3g}"
            return (text if "e" not in text else f"{value / factor:.0f}") + suffix
    return f"{value:.0f}"


def model_name(meta: dict) -> str:
    """The stable release name of a checkpoint: ``<architecture>-w<width>-d<atoms seen>``."""
    return f"{meta['architecture']}-w{int(meta['width'])}-d{human_count(int(meta['atoms_seen']))}"


def checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run (``RUN_DIR/checkpoints/step-*`` with metadata), by step; or the dir itself."""
    run_dir = Path(run_dir)
    if (run_dir / METADATA).is_file():
        return [run_dir]
    found = sorted(d for d in (run_dir / "checkpoints").glob("step-*")
                   if d.is_dir() and not d.name.endswith(".partial") and (d / METADATA).is_file())
    if not found:
        raise FileNotFoundError(f"{run_dir}: no finished checkpoint (checkpoints/step-*/{METADATA})")
    return found


def choose(run_dirs: list[str | os.PathLike], select: str = "final") -> list[Path]:
    """The checkpoints a release takes from ``run_dirs`` (see the module docstring)."""
    if select not in SELECT:
        raise ValueError(f"--select must be one of {SELECT}, got {select!r}")
    per_run = [checkpoints(d) for d in run_dirs]
    if select == "final":
        return [found[-1] for found in per_run]
    every = [c for found in per_run for c in found]
    if select == "all":
        return every
    from fit.frontier import frontier_owners

    rows = [table_row(read(c)) for c in every]
    chosen: list[Path] = []
    for arch in sorted({r["architecture"] for r in rows}):
        idx = [i for i, r in enumerate(rows) if r["architecture"] == arch and r["C"] is not None and r["loss"] is not None]
        if not idx:
            raise ValueError(f"--select frontier: no {arch} checkpoint records both FLOPs and a validation loss")
        owners = frontier_owners([rows[i]["C"] for i in idx], [rows[i]["loss"] for i in idx])
        chosen += [every[idx[int(k)]] for k in owners]
    return chosen


def _entry(meta: dict, name: str, files: list[dict], split: str) -> dict:
    validation = {"split": split, **{k: v for k, v in meta["validation"].items() if not isinstance(v, (dict, list))}}
    return {"name": name, "architecture": meta["architecture"], "width": int(meta["width"]),
            "overrides": meta.get("config", {}).get("model_overrides", {}), "N": int(meta["N"]),
            "D": int(meta["atoms_seen"]), "C": meta.get("flops"), "step": int(meta["step"]),
            "validation": validation, "data_hash": meta["data_hash"], "code_version": meta.get("code_version"),
            "init_from": meta.get("init_from"), "files": files}


def publish(run_dirs: list[str | os.PathLike], out: str | os.PathLike, release: str, select: str = "final",
            description: str = "", split: str | None = None, plots: str | os.PathLike | None = None) -> Path:
    """Write the release folder ``out`` (manifest, model card, checkpoints); returns the manifest path.

    ``split`` names the validation split the metrics were measured on (default: the run's
    ``config.val`` and subset size). The card shows the validation loss of every checkpoint of the
    runs against FLOPs (``loss_vs_flops.png``, chosen ones marked) and, with ``plots`` (a
    ``zoo fit`` output folder), that folder's PNG figures (the fit plots), copied beside it. Raises ``FileExistsError`` if ``out`` already holds a
    manifest, ``ValueError`` when two chosen checkpoints would get the same name, and
    ``CorruptCheckpointError`` when a checkpoint's weights fail their SHA-256.
    """
    out = Path(out)
    check_name(release, "release name", str(out))
    if (out / MANIFEST).exists():
        raise FileExistsError(f"{out} already holds a release ({MANIFEST}); choose another --out")
    models, seen = [], {}
    for ckpt in choose(run_dirs, select):
        meta = read(ckpt)
        verify_weights(ckpt, meta)
        name = model_name(meta)
        if name in seen:
            raise ValueError(f"{ckpt} and {seen[name]} would both be published as {name!r}")
        seen[name] = ckpt
        target = out / name
        target.mkdir(parents=True, exist_ok=True)
        files = []
        for file in (WEIGHTS, METADATA):
            shutil.copyfile(ckpt / file, target / file)
            files.append({"path": f"{name}/{file}", "size": (target / file).stat().st_size,
                          "sha256": sha256_file(target / file)})
        cfg = meta.get("config", {})
        where = split or f"{cfg.get('val', 'val')} (first {cfg.get('max_val_structures') or 'all'} structures)"
        models.append(_entry(meta, name, files, where))
    manifest = {"format": FORMAT, "release": release, "description": description, "source": ".", "models": models}
    parse_manifest(manifest, str(out / MANIFEST))  # what we write must read back
    figures = [plot_checkpoints([c for d in run_dirs for c in checkpoints(d)], list(seen.values()),
                                out / "loss_vs_flops.png")]
    for png in sorted(Path(plots).glob("*.png")) if plots else []:
        shutil.copyfile(png, out / png.name)
        figures.append(out / png.name)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    (out / "README.md").write_text(model_card(manifest, [f.name for f in figures if f is not None]))
    return out / MANIFEST


def plot_checkpoints(every: list[Path], chosen: list[Path], path: Path) -> Path | None:
    """Validation loss against training FLOPs of every checkpoint, one line per run, chosen ones
    circled (log-log PNG at ``path``); ``None`` when no checkpoint records FLOPs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(c, read(c)) for c in every]
    rows = [(c, m) for c, m in rows if m.get("flops") and m["validation"].get("loss") is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=110)
    runs: dict[Path, list] = {}
    for c, m in rows:
        runs.setdefault(c.parent.parent, []).append((m["flops"], m["validation"]["loss"], c, m))
    for points in runs.values():
        points.sort(key=lambda p: p[0])
        m = points[-1][3]
        line, = ax.plot([p[0] for p in points], [p[1] for p in points], "o-", ms=3, lw=1,
                        label=f"{m['architecture']} w{m['width']}")
        picked = [p for p in points if p[2] in chosen]
        ax.scatter([p[0] for p in picked], [p[1] for p in picked], s=60, facecolors="none", edgecolors=line.get_color())
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="validation loss L",
           title="checkpoints of the published runs (circled: in the release)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def model_card(manifest: dict, figures: list[str] | None = None) -> str:
    """The release's README.md: description, a table of its models, and its figures."""
    lines = [f"# {manifest['release']}", "", manifest.get("description") or "", "",
             "| name | architecture | width | N | D (atoms) | C (FLOPs) | val loss | force MAE (meV/Å) | "
             "energy MAE (meV/atom) | split |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for m in manifest["models"]:
        v = m["validation"]
        lines.append(f"| {m['name']} | {m['architecture']} | {m['width']} | {m['N']:,} | {m['D']:,} | "
                     f"{_fmt(m['C'], '.3g')} | {_fmt(v.get('loss'), '.4f')} | {_fmt(v.get('force_mae_mev_per_A'), '.1f')} | "
                     f"{_fmt(v.get('energy_mae_mev_per_atom'), '.1f')} | {v.get('split', '')} |")
    lines += ["", "Use: `zoo list`, `zoo download NAME`, `zoo.load(NAME)` or `ZooCalculator(NAME)`. Every file's "
              "size and SHA-256 are in `manifest.json`; each checkpoint's `metadata.json` records the SHA-256 of "
              "its weights, checked on every load.", ""]
    lines += [f"![{name}]({name})\n" for name in figures or []]
    return "\n".join(lines)


def push_to_hub(folder: str | os.PathLike, repo_id: str, private: bool = False) -> Path:
    """Upload a release folder to the Hub repo ``repo_id`` and pin the commit in ``manifest.hub.json``.

    Authentication is huggingface_hub's: ``huggingface-cli login`` or ``HF_TOKEN``. Returns the
    path of ``manifest.hub.json`` (source ``hf://REPO@COMMIT``), written beside the manifest.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="symscale release",
                             ignore_patterns=["manifest.hub.json"])
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["source"] = f"hf://{repo_id}@{info.oid}"
    path = folder / "manifest.hub.json"
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return path
