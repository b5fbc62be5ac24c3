"""Benchmark: ``torch.compile`` (``ForceField.enable_compile``) against eager, per architecture.

For every architecture and force mode asked for, one model is built (seed 0) and a second, compiled
copy holds the same weights. Both run the same batches — consecutive structures of
``data/omol25_sample/val``, cut into batches of different sizes, so that the number of atoms and
edges changes from one batch to the next as it does in training — and the script reports:

- compile: wall seconds of the compiled model's first pass over every batch (training step, then
  inference), that is, dynamo's capture, AOTAutograd and the backend's code generation (inductor
  compiles C++ on CPU), with the number of graphs dynamo compiled (a recompilation for new sizes or
  a new grad mode counts one more) and of graph breaks;
- equality: the largest difference compiled − eager of energies (eV), forces (eV/Å) and, for the
  direct-force training step, parameter gradients, each divided by the largest eager value;
- speed: training step (forward + forces + loss + backward) and inference (energy + forces, eval
  mode) timed interleaved (eager, compiled, eager, compiled …) after the warm-up, medians of the
  process's CPU time (``--clock wall`` for elapsed time) over ``--repeats`` passes over the batches,
  and the ratio eager / compiled (> 1: compiled is faster).

Conservative forces: the compiled program returns the energy gradient (``torch.func.grad`` inside
it), so the training step's backward is first order (``ForceField.enable_compile``).

Run (CPU, fp32, one thread; ``TORCHINDUCTOR_COMPILE_THREADS=1`` keeps inductor's C++ builds in one
process)::

    OMP_NUM_THREADS=1 TORCHINDUCTOR_COMPILE_THREADS=1 .venv/bin/python benchmarks/bench_compile.py

``--backend aot_eager`` checks dynamo's capture and AOTAutograd without code generation (fast to
compile; no speed-up expected). ``--device cuda`` runs the same on a GPU (written without one:
untested).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from datapipe import keys  # noqa: E402
from datapipe.graph import batch_from_atoms  # noqa: E402
from datapipe.sources import expand_inputs, iter_atoms  # noqa: E402
from zoo.registry import MODELS, build  # noqa: E402

#: the widths and depths benchmarked by default: each architecture's default width, its usual depth
WIDTHS = {"mpnn": 128, "mc-egnn": 96, "gemnet-oc": 64, "esen": 64}


def batches(split: Path, sizes: list[int], cutoff: float, device: str) -> list:
    """Consecutive structures of ``split`` cut into batches of at most ``sizes[i]`` atoms each."""
    out, chosen, total, wanted = [], [], 0, list(sizes)
    for path in expand_inputs(split):
        for mol in iter_atoms(path):
            if total + len(mol) > wanted[0] and chosen:
                out.append(batch_from_atoms(chosen, cutoff=cutoff).to(device))
                wanted.pop(0)
                chosen, total = [], 0
                if not wanted:
                    return out
            chosen.append(mol)
            total += len(mol)
    raise SystemExit(f"{split} holds too few structures for batches of {sizes} atoms")


def loss_of(out) -> torch.Tensor:
    return out[keys.ENERGY].abs().mean() + out[keys.FORCES].norm(dim=-1).mean()


def step(model, batch, mode: str, clock: str, device: str):
    """One training step or one inference; returns (seconds, energy, forces, parameter gradients)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    model.train(mode == "train")
    sync()
    start = time.process_time() if clock == "cpu" else time.perf_counter()
    if mode == "train":
        out = model(batch)
        loss_of(out).backward()
    else:
        with torch.no_grad() if model.direct_forces else torch.enable_grad():
            out = model(batch)
    sync()
    seconds = (time.process_time() if clock == "cpu" else time.perf_counter()) - start
    grads = [p.grad.detach().clone() if p.grad is not None else None for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return seconds, out[keys.ENERGY].detach(), out[keys.FORCES].detach(), grads


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b| (0 when both vanish)."""
    scale = float(b.abs().max()) if b.numel() else 0.0
    return float((a - b).abs().max()) / scale if scale else float((a - b).abs().max()) if a.numel() else 0.0


def bench(arch: str, direct: bool, a, data: list) -> dict:
    torch.manual_seed(0)
    overrides = {"num_layers": a.layers} if a.layers and arch != "gemnet-oc" else {}
    if a.layers and arch == "gemnet-oc":
        overrides = {"num_blocks": a.layers}
    eager = build(arch, a.width or WIDTHS[arch], direct_forces=direct, **overrides).to(a.device)
    compiled = copy.deepcopy(eager).enable_compile(backend=a.backend)
    modes = ["train", "infer"]
    row = {"arch": arch, "forces": "direct" if direct else "conservative", "compile_s": 0.0, "err": {}}
    torch._dynamo.utils.counters.clear()
    for mode in modes:
        for batch in data:  # warm-up: compiles (and recompiles) here, not in the timed passes
            start = time.perf_counter()
            _, e_c, f_c, g_c = step(compiled, batch, mode, a.clock, a.device)
            row["compile_s"] += time.perf_counter() - start
            _, e_e, f_e, g_e = step(eager, batch, mode, a.clock, a.device)
            err = row["err"]
            err[f"{mode} E"] = max(err.get(f"{mode} E", 0.0), relative(e_c, e_e))
            err[f"{mode} F"] = max(err.get(f"{mode} F", 0.0), relative(f_c, f_e))
            if mode == "train":
                worst = max(relative(x, y) for x, y in zip(g_c, g_e) if y is not None)
                err["grad"] = max(err.get("grad", 0.0), worst)
    stats = torch._dynamo.utils.counters["stats"]
    row["graphs"] = int(stats.get("unique_graphs", 0))
    row["breaks"] = sum(torch._dynamo.utils.counters["graph_break"].values())
    for mode in modes:
        times = {"eager": [], "compiled": []}
        for _ in range(a.repeats):
            for batch in data:
                times["eager"].append(step(eager, batch, mode, a.clock, a.device)[0])
                times["compiled"].append(step(compiled, batch, mode, a.clock, a.device)[0])
        e, c = statistics.median(times["eager"]), statistics.median(times["compiled"])
        row[mode] = (e, c, e / c)
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archs", nargs="+", default=sorted(MODELS), choices=sorted(MODELS))
    p.add_argument("--forces", nargs="+", default=["direct", "conservative"], choices=["direct", "conservative"])
    p.add_argument("--width", type=int, default=None, help="one width for all (default: each one's default)")
    p.add_argument("--layers", type=int, default=None, help="layers (GemNet-OC: blocks); default the model's own")
    p.add_argument("--batch-atoms", type=int, nargs="+", default=[100, 140, 120],
                   help="atoms per batch, one batch per value (sizes differ: dynamic shapes)")
    p.add_argument("--repeats", type=int, default=5, help="timed passes over the batches")
    p.add_argument("--backend", default="inductor")
    p.add_argument("--device", default="cpu")
    p.add_argument("--clock", default="cpu", choices=["cpu", "wall"])
    a = p.parse_args(argv)
    if a.device == "cuda":
        a.clock = "wall"
    print(f"torch {torch.__version__}, backend {a.backend}, device {a.device}, {torch.get_num_threads()} thread(s), "
          f"{a.clock} clock, medians of {a.repeats} passes; batches {a.batch_atoms} atoms", flush=True)
    rows = []
    for arch in a.archs:
        model_cutoff = build(arch, 16 if arch != "esen" else 8).data_cutoff
        data = batches(REPO / "data" / "omol25_sample" / "val", a.batch_atoms, model_cutoff, a.device)
        shapes = ", ".join(f"{b.num_nodes}/{b[keys.EDGE_INDEX].shape[1]}" for b in data)
        for forces in a.forces:
            row = bench(arch, forces == "direct", a, data)
            rows.append(row)
            cells = [f"{arch:9s} {forces:12s} atoms/edges {shapes}", f"compile {row['compile_s']:.1f} s",
                     f"graphs compiled {row['graphs']}, breaks {row['breaks']}"]
            for mode in ("train", "infer"):
                e, c, r = row[mode]
                cells.append(f"{mode} eager {e * 1e3:.1f} ms compiled {c * 1e3:.1f} ms ratio {r:.2f}")
            cells.append("max rel. diff " + ", ".join(f"{k} {v:.1e}" for k, v in row["err"].items()))
            print(" | ".join(cells), flush=True)
    return rows


if __name__ == "__main__":
    main()
