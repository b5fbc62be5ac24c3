"""Conversion of a large source split across machines: each converts a range of the input
files, a final step merges the parts' indexes; the result is byte-identical to converting
everything on one machine (shards, ``natoms.npy`` and ``index.json``).

Usage (machine ``i`` of ``n``, ``i = 0..n-1``, e.g. a SLURM array task id)::

    python -m datapipe.parts /data/omol25/train --out /scratch/shards/train --part 3/8 --workers 16
    # gather every part's folder into one (rsync), or let all parts write to one shared folder, then:
    python -m datapipe.parts --merge /scratch/shards/train

    from datapipe.parts import convert_part, merge
    convert_part(["/data/omol25/train"], "shards/train", part=(3, 8))
    index = merge("shards/train")

How
---
The input files (sorted by stem, as :func:`datapipe.sources.expand_inputs` gives them) are cut
into ``n`` contiguous ranges of (as nearly as possible) equal file counts; part ``i`` takes files
``floor(i*F/n)`` up to ``floor((i+1)*F/n)`` (a part may be empty when ``n > F``). Shards never span
input files, so a part writes exactly the shards one machine would. Beside them it writes
``index.part-0000i-of-0000n.json`` (its files' shards, rejects and statistics, the fingerprints
of *all* inputs by hash, so that parts of different splits or inputs are never merged) and
``natoms.part-0000i-of-0000n.npy``. Statistics are kept per input file, exactly (JSON floats
round-trip), and the merge adds them in sorted-stem order as the one-machine conversion does: the
floating-point sums, and so the index, are bit-identical. The merge checks that every part is
there, of the same split and settings, with its sidecar and shards intact, writes ``index.json``
and ``natoms.npy``, and removes the part files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path

import numpy as np

from datapipe.convert import MARKER, _fingerprint, _settings, assemble, convert_files
from datapipe.index import INDEX_NAME, NATOMS_NAME, ShardIndex, Stats, write_sidecar
from datapipe.shards import file_sha256
from datapipe.sources import expand_inputs

PART_FORMAT = "symscale-shards-part/1"
_PART = re.compile(r"index\.part-(\d+)-of-(\d+)\.json$")


def part_range(n_files: int, part: tuple[int, int]) -> tuple[int, int]:
    """``(first, stop)`` file numbers of ``part = (i, n)``.

    >>> [part_range(10, (i, 4)) for i in range(4)]
    [(0, 2), (2, 5), (5, 7), (7, 10)]
    """
    i, n = part
    if not 0 <= i < n:
        raise ValueError(f"part {i}/{n}: need 0 <= i < n")
    return i * n_files // n, (i + 1) * n_files // n


def _names(part: tuple[int, int]) -> tuple[str, str]:
    i, n = part
    return f"index.part-{i:05d}-of-{n:05d}.json", f"natoms.part-{i:05d}-of-{n:05d}.npy"


def _stats_to_json(stats: Stats) -> dict:
    present = np.flatnonzero(stats.element_counts)
    return {"present": present.tolist(), "ctc": stats.ctc[np.ix_(present, present)].tolist(),
            "cte": stats.cte[present].tolist(), "ete": stats.ete, "element_counts": stats.element_counts[present].tolist(),
            "force_sq": stats.force_sq, "n_force": stats.n_force, "n_structures": stats.n_structures}


def _stats_from_json(item: dict) -> Stats:
    stats, present = Stats(), np.asarray(item["present"], np.int64)
    stats.ctc[np.ix_(present, present)] = np.asarray(item["ctc"], np.float64).reshape(len(present), len(present))
    stats.cte[present] = item["cte"]
    stats.element_counts[present] = item["element_counts"]
    stats.ete, stats.force_sq = float(item["ete"]), float(item["force_sq"])
    stats.n_force, stats.n_structures = int(item["n_force"]), int(item["n_structures"])
    return stats


def _inputs_digest(fingerprints: list[dict]) -> str:
    return hashlib.sha256(json.dumps(fingerprints, sort_keys=True).encode()).hexdigest()


def _refuse_foreign(out: Path, stems: set[str]) -> None:
    """Raise FileExistsError if ``out`` holds files other than shards of these inputs and our own."""
    if not out.is_dir():
        return
    for path in out.iterdir():
        name = path.name
        ours = (name.startswith((".partial-", MARKER, "index.", "natoms.")) or
                (name.endswith(".tar") and name.rsplit("-", 1)[0] in stems))
        if not ours:
            raise FileExistsError(f"{out} holds {name}, which is not a shard of these inputs; refusing to write "
                                  "shards beside it: choose an empty or new directory (or force=True / --force)")


def convert_part(inputs, out_dir, part: tuple[int, int], shard_size: int = 1000, workers: int = 1,
                 force: bool = False, progress=None) -> Path:
    """Convert part ``part = (i, n)`` of ``inputs`` into ``out_dir``; returns its part index path.

    The arguments are those of :func:`datapipe.convert.convert`, which this does for a range of
    the files (see the module docstring); an up-to-date part is not redone unless ``force``.

    Raises
    ------
    ValueError for a bad ``part`` or inputs; FileExistsError when ``out_dir`` holds files that are
    not shards of these inputs (unless ``force``); RuntimeError naming a file that cannot be read.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    files = expand_inputs(inputs)
    first, stop = part_range(len(files), part)
    everything = [_fingerprint(p) for p in files]
    out, settings = Path(out_dir), _settings(shard_size)
    index_name, natoms_name = _names(part)
    head = {"format": PART_FORMAT, "settings": settings, "part": part[0], "parts": part[1],
            "inputs_digest": _inputs_digest(everything), "n_inputs": len(files), "inputs": everything[first:stop]}
    previous = _read_json(out / index_name)
    if not force and previous is not None and {k: previous.get(k) for k in head} == head and all(
            (out / s["name"]).is_file() and (out / s["name"]).stat().st_size == s["bytes"]
            for f in previous["files"] for s in f["shards"]):
        return out / index_name
    if not force:
        _refuse_foreign(out, {p.stem for p in files})
    out.mkdir(parents=True, exist_ok=True)
    (out / index_name).unlink(missing_ok=True)
    (out / INDEX_NAME).unlink(missing_ok=True)  # a merged index would describe shards being rewritten
    results = convert_files(files[first:stop], out, shard_size, workers, progress)
    natoms = np.concatenate([r["natoms"] for r in results]) if results else np.zeros(0, np.int32)
    entries = [{"name": fp["name"], "shards": r["shards"], "structures": len(r["natoms"]),
                "stats": _stats_to_json(r["stats"]), "rejected": r["rejected"], "n_defaulted": r["n_defaulted"]}
               for fp, r in zip(head["inputs"], results)]
    raw = {**head, "natoms": write_sidecar(out / natoms_name, natoms), "files": entries}
    current = {s["name"] for f in entries for s in f["shards"]}
    others = {p.stem for p in files[:first] + files[stop:]}  # other parts' shards may share the folder
    for f in (previous or {}).get("files", []):
        for s in f["shards"]:
            if s["name"] not in current and s["name"].rsplit("-", 1)[0] not in others:
                (out / s["name"]).unlink(missing_ok=True)
    tmp = out / (index_name + ".tmp")
    tmp.write_text(json.dumps(raw, indent=1) + "\n")
    os.replace(tmp, out / index_name)
    return out / index_name


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def merge(out_dir) -> ShardIndex:
    """Merge the parts in ``out_dir`` into ``index.json`` + ``natoms.npy``; returns the index.

    Raises
    ------
    FileNotFoundError if there is no part, a part, its sidecar or a shard is missing (naming
    them); ValueError if parts come from different splits, inputs or settings, or a part's
    sidecar does not match it.
    """
    out = Path(out_dir)
    found = sorted((p for p in out.glob("index.part-*-of-*.json") if _PART.search(p.name)), key=lambda p: p.name)
    if not found:
        raise FileNotFoundError(f"{out}: no index.part-*-of-*.json to merge; run `python -m datapipe.parts INPUT "
                                f"--out {out} --part i/n` for every part first")
    parts = [json.loads(p.read_text()) for p in found]
    head = {k: parts[0].get(k) for k in ("format", "settings", "parts", "inputs_digest", "n_inputs")}
    for path, raw in zip(found, parts):
        if {k: raw.get(k) for k in head} != head or raw["format"] != PART_FORMAT:
            raise ValueError(f"{path} is a part of another conversion than {found[0].name} (other inputs, "
                             "settings or number of parts)")
    n = head["parts"]
    missing = sorted(set(range(n)) - {raw["part"] for raw in parts})
    if missing:
        raise FileNotFoundError(f"{out}: parts {', '.join(f'{i}/{n}' for i in missing)} are missing "
                                f"({len(parts)} of {n} present)")
    results, fingerprints, absent = [], [], []
    for path, raw in zip(found, parts):
        entry = raw["natoms"]
        sidecar = out / entry["file"]
        if not sidecar.is_file() or sidecar.stat().st_size != entry["bytes"] or file_sha256(sidecar) != entry["sha256"]:
            raise ValueError(f"{sidecar}: missing or not the counts {path.name} records (size, SHA-256)")
        counts = np.load(sidecar, allow_pickle=False).astype(np.int32)
        offset = 0
        for f in raw["files"]:
            results.append({"shards": f["shards"], "natoms": counts[offset:offset + f["structures"]],
                            "stats": _stats_from_json(f["stats"]), "rejected": f["rejected"],
                            "n_defaulted": f["n_defaulted"]})
            offset += f["structures"]
            absent += [s["name"] for s in f["shards"]
                       if not (out / s["name"]).is_file() or (out / s["name"]).stat().st_size != s["bytes"]]
        fingerprints += raw["inputs"]
    if absent:
        raise FileNotFoundError(f"{out}: shards missing or of another size than their part records: "
                                f"{', '.join(absent[:5])}{' …' if len(absent) > 5 else ''}")
    if _inputs_digest(fingerprints) != head["inputs_digest"] or len(fingerprints) != head["n_inputs"]:
        raise ValueError(f"{out}: the parts' inputs do not add up to the inputs they were split from")
    raw = assemble(out, head["settings"], fingerprints, results)
    for path, part in zip(found, parts):
        (out / part["natoms"]["file"]).unlink()
        path.unlink()
    return ShardIndex(out, raw, np.load(out / NATOMS_NAME, mmap_mode="r"))


def main(argv=None) -> int:
    """Command line: ``python -m datapipe.parts INPUT... --out DIR --part i/n`` or ``--merge DIR``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m datapipe.parts", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="*", help="files or directories of structures (all parts give the same)")
    parser.add_argument("--out", help="output directory of this part's shards")
    parser.add_argument("--part", help="i/n: convert part i (0-based) of n")
    parser.add_argument("--merge", metavar="DIR", help="merge the parts in DIR into index.json")
    parser.add_argument("--shard-size", type=int, default=1000, help="structures per shard (default 1000)")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes over input files")
    parser.add_argument("--force", action="store_true", help="convert even if up to date or beside other files")
    args = parser.parse_args(argv)
    try:
        if args.merge:
            index = merge(args.merge)
            print(f"{index.location}: {len(index.shards)} shards, {index.n_structures} structures, "
                  f"{index.n_atoms} atoms, data hash {index.data_hash[:16]}")
            return 0
        match = re.fullmatch(r"(\d+)/(\d+)", args.part or "")
        if not (args.inputs and args.out and match):
            parser.error("give INPUT... --out DIR --part i/n, or --merge DIR")
        path = convert_part(args.inputs, args.out, (int(match[1]), int(match[2])), args.shard_size, args.workers,
                            args.force)
        raw = json.loads(path.read_text())
        print(f"{path}: {len(raw['inputs'])} of {raw['n_inputs']} input files, "
              f"{raw['natoms']['length']} structures")
    except (ValueError, FileExistsError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

