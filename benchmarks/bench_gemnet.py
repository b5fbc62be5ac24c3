"""Benchmark: GemNet-OC's step at HEAD against the same model at a baseline git revision.

Issue 12 asks GemNet-OC to be at least 2× faster than "today" (the code when the issue was filed,
``c4645d9^``) at width 64, with the same outputs to fp32 round-off. This script measures exactly
that, side by side:

- the baseline revision is extracted with ``git archive`` into a temporary directory and runs as a
  child process on the same virtual environment (``PYTHONPATH`` = that directory; the worker checks
  that it imported the baseline's ``zoo``, not this checkout's); this process runs HEAD;
- both build GemNet-OC at the same width and force mode; HEAD's weights and fitted scale factors
  (fitted on the first molecules of the batch) go to the child as a state dict, loaded strictly, so
  both hold the same parameter values; both read the same pickled batch (the same molecules and
  graph: the first structures of ``data/omol25_sample/val`` up to ``--atoms`` atoms);
- outputs are compared before timing: energy, forces and the parameter gradients of the loss, in
  float32 (max differences, relative to the largest value, printed beside the baseline's own
  float32-vs-float64 difference, the scale of fp32 round-off) and in float64
  (the formulations themselves: must agree to float64 round-off);
- both processes run with the glibc malloc settings the launcher sets for CPU training
  (:mod:`launcher.heap`), so the comparison is of the model code, not of page faults;
- A, B, A, B, … alternate step by step, each process timing its own step with its CPU clock by
  default (one thread: the work done, not the waits for a core on a shared machine); medians.

Modes: ``train`` = forward + forces (direct head, or −∂E/∂positions with a double backward for
conservative forces) + loss (mean |E| + mean ‖F‖) + backward; ``infer`` = energy + forces in eval
mode. ratio = baseline median / HEAD median (> 1: HEAD is faster); the goal is ratio ≥ 2 for
every row.

Run (CPU, fp32, one thread; the defaults)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_gemnet.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_gemnet.py --baseline 031f4f2 --forces direct
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_gemnet.py --profile 3   # HEAD's top ops, no baseline
"""

from __future__ import annotations

import argparse
import json
import re
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from json_worker import JsonWorker, same_malloc_for_both, serve  # benchmarks/ is on sys.path when run as a script
from sample import molecules

REPO = Path(__file__).resolve().parents[1]
GOAL = 2.0


class Runner:
    """One GemNet-OC model on one batch, in whatever checkout ``zoo`` is imported from."""

    def __init__(self, width: int, direct: bool, dtype: str, batch, state: dict | None = None) -> None:
        import torch

        from zoo.registry import build

        torch.manual_seed(0)
        self.model = build("gemnet-oc", width=width, direct_forces=direct).to(getattr(torch, dtype))
        self.model.set_normalization(None, 1.0)
        if state is not None:
            self.model.load_state_dict(state, strict=True)
        self.batch = batch.clone()
        self.batch["positions"] = self.batch["positions"].to(getattr(torch, dtype))

    def step(self, mode: str, keep: bool = False) -> tuple[float, float, dict | None]:
        """One step; (wall s, CPU s, outputs and gradients if ``keep``)."""
        import torch

        train = mode == "train"
        self.model.train(train)
        start, cpu_start = time.perf_counter(), time.process_time()
        if train:
            out = self.model(self.batch)
            loss = out["energy"].abs().mean() + out["forces"].norm(dim=-1).mean()
            loss.backward()
        else:
            with torch.no_grad() if self.model.direct_forces else torch.enable_grad():
                out = self.model(self.batch)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        kept = None
        if keep:
            kept = {"energy": out["energy"].detach().clone(), "forces": out["forces"].detach().clone()}
            if train:
                kept["grads"] = {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}
        self.model.zero_grad(set_to_none=True)
        return seconds, cpu, kept


def worker(root: str) -> None:
    """The baseline side: JSON commands on stdin, one JSON answer per line on stdout."""
    import torch

    import zoo

    if not Path(zoo.__file__).resolve().is_relative_to(Path(root).resolve()):
        raise SystemExit(f"worker imported zoo from {zoo.__file__}, not from the baseline at {root}")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    runner = None

    def handle(msg: dict) -> dict:
        nonlocal runner
        if msg["cmd"] == "build":
            from torch_geometric.data import Batch

            # the batch's fields (tensors, ints, strings), rebuilt here: nothing but data is unpickled
            batch = Batch(**torch.load(msg["batch"], weights_only=True))
            state = torch.load(msg["state"], weights_only=True)
            runner = Runner(msg["width"], msg["direct"], msg["dtype"], batch, state)
            return {"ok": True}
        if msg["cmd"] == "step":
            wall, cpu, kept = runner.step(msg["mode"], keep=bool(msg.get("save")))
            if kept is not None:
                torch.save(kept, msg["save"])
            return {"seconds": wall, "cpu_seconds": cpu}
        raise ValueError(f"unknown command {msg['cmd']!r}")

    serve(handle)


class Baseline(JsonWorker):
    """The baseline revision in a child process."""

    def __init__(self, rev: str, tmp: Path, threads: int, malloc_env: dict | None = None) -> None:
        self.root = tmp / "baseline"
        self.root.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev, "datapipe", "zoo"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(self.root)], input=archive, check=True)
        self.sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", rev], check=True,
                                  capture_output=True, text=True).stdout.strip()
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(self.root), **(malloc_env or {}))
        super().__init__([sys.executable, str(Path(__file__).resolve()), "--worker", str(self.root)], env,
                         "baseline worker", cwd=str(self.root))


def max_difference(a: dict, b: dict) -> dict:
    """Largest |a − b| of energy, forces and gradients, each also relative to the largest |a|."""
    import torch

    out = {}
    for key in ("energy", "forces"):
        diff = float((a[key].double() - b[key].double()).abs().max())
        out[key] = (diff, diff / max(float(a[key].abs().max()), 1e-30))
    if "grads" in a:
        if set(a["grads"]) != set(b["grads"]):
            raise SystemExit(f"different parameters got gradients: {sorted(set(a['grads']) ^ set(b['grads']))}")
        worst = (0.0, 0.0)
        for name, g in a["grads"].items():
            diff = float((g.double() - b["grads"][name].double()).abs().max())
            rel = diff / max(float(g.abs().max()), 1e-30)
            worst = max(worst, (rel, diff))
        out["grads"] = (worst[1], worst[0])
    return out


def fitted_state(width: int, batch, fit_molecules: int) -> dict:
    """HEAD's seed-0 weights with scale factors fitted on the first molecules of ``batch``."""
    import torch

    from zoo.models.gemnet_oc.blocks import fit_scale_factors
    from zoo.registry import build

    torch.manual_seed(0)
    model = build("gemnet-oc", width=width, direct_forces=True)
    model.set_normalization(None, 1.0)
    small = type(batch).from_data_list(batch.to_data_list()[:fit_molecules])
    fit_scale_factors(model, [small])
    return model.state_dict()


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline", default="c4645d9^", help="git revision to compare with (default: issue 12's filing)")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--atoms", type=int, default=360, help="atoms per batch (first molecules of the val split)")
    p.add_argument("--forces", default="direct,conservative")
    p.add_argument("--modes", default="train,infer")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=("wall", "cpu"), default="cpu")
    p.add_argument("--fit-molecules", type=int, default=3, help="molecules the scale factors are fitted on")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="instead of the comparison: profile HEAD's training step (per-op self CPU time, by module)")
    p.add_argument("--top", type=int, default=25, help="rows of the profile tables")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a.worker)
        return []
    sys.path.insert(0, str(REPO))
    import torch

    from datapipe.graph import batch_from_atoms
    from zoo.registry import build

    torch.set_num_threads(a.threads)
    if a.clock == "cpu" and a.threads != 1:
        p.error("--clock cpu measures one thread's work; use --clock wall with threads > 1")
    cutoff = build("gemnet-oc", width=4, num_blocks=1).data_cutoff
    mols = molecules(REPO / "data" / "omol25_sample" / "val", a.atoms)
    batch = batch_from_atoms(mols, cutoff=cutoff)
    n_atoms, n_edges = batch.num_nodes, int(batch.edge_index.shape[1])
    print(f"{len(mols)} molecules, {n_atoms} atoms, {n_edges} edges at {cutoff} Å (data/omol25_sample/val); "
          f"width {a.width}, {a.threads} thread(s), {a.clock} clock, load average {os.getloadavg()[0]:.2f}", flush=True)
    state = fitted_state(a.width, batch, a.fit_molecules)
    if a.profile:
        profile(a, batch, state)
        return []
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        torch.save(batch.to_dict(), tmp / "batch.pt")  # fields only: the worker loads it with weights_only=True
        # glibc's malloc as the launcher sets it for CPU training, in both processes alike (launcher.heap;
        # the baseline's releases had no such setting, so this is the model code compared on equal terms)
        malloc_env = same_malloc_for_both()
        base = Baseline(a.baseline, tmp, a.threads, malloc_env)
        print(f"HEAD {head_sha()} against baseline {a.baseline} = {base.sha} (git archive in a child process)")
        try:
            for forces in a.forces.split(","):
                direct = forces == "direct"
                rows += compare(a, batch, base, tmp, state, direct, n_atoms)
        finally:
            base.close()
    worst = min(r["ratio"] for r in rows)
    print(f"ratio = baseline median / HEAD median of {a.clock} time over {a.repeats} interleaved steps (after "
          f"{a.warmup} untimed). Goal ≥ {GOAL:g}×: {'PASS' if worst >= GOAL else 'FAIL'} (lowest {worst:.2f}×); "
          f"load average {os.getloadavg()[0]:.2f} at the end")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return rows


def profile(a, batch, state: dict) -> None:
    """HEAD's training step under torch.profiler: top ops by self CPU time, then by module.

    Modules are timed by forward hooks that open a ``record_function`` range per module (forward
    only; the backward shows up per autograd op in the first table).
    """
    import torch
    from torch.profiler import ProfilerActivity, record_function

    for forces in a.forces.split(","):
        ours = Runner(a.width, forces == "direct", "float32", batch)
        ours.model.load_state_dict({k: v for k, v in state.items() if k in ours.model.state_dict()}, strict=True)
        ranges = {}

        def enter(module, args, name=None):
            ranges[name] = record_function(f"module::{name}")
            ranges[name].__enter__()

        def leave(module, args, output, name=None):
            ranges.pop(name).__exit__(None, None, None)

        handles = []
        for name, module in ours.model.named_modules():
            if name and name.count(".") <= 2 and not name.endswith(("gaussians", "envelope")):
                name = re.sub(r"\.\d+(?=\.|$)", ".*", name) if name.count(".") == 2 else name
                handles.append(module.register_forward_pre_hook(lambda m, i, n=name: enter(m, i, n)))
                handles.append(module.register_forward_hook(lambda m, i, o, n=name: leave(m, i, o, n)))
        ours.step("train")
        with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(a.profile):
                ours.step("train")
        for h in handles:
            h.remove()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        print(f"\n{forces} training step, {a.profile} steps profiled: {total / 1e6 / a.profile:.3f} s CPU per step")
        print(f"{'op (self CPU)':<44} {'s/step':>8} {'share':>6} {'calls':>6}")
        for e in sorted((e for e in events if not e.key.startswith("module::")),
                        key=lambda e: -e.self_cpu_time_total)[:a.top]:
            print(f"{e.key[:44]:<44} {e.self_cpu_time_total / 1e6 / a.profile:>8.3f} "
                  f"{e.self_cpu_time_total / total:>6.1%} {e.count // a.profile:>6}")
        print(f"{'module (forward, total CPU)':<44} {'s/step':>8}")
        for e in sorted((e for e in events if e.key.startswith("module::")), key=lambda e: -e.cpu_time_total)[:a.top]:
            print(f"{e.key[8:52]:<44} {e.cpu_time_total / 1e6 / a.profile:>8.3f}")


def head_sha() -> str:
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip() + (" (+ uncommitted)" if subprocess.run(
                              ["git", "-C", str(REPO), "status", "--porcelain", "zoo"], capture_output=True,
                              text=True).stdout.strip() else "")


def compare(a, batch, base: Baseline, tmp: Path, state: dict, direct: bool, n_atoms: int) -> list[dict]:
    """Outputs checked (float64, float32), then interleaved timing of each mode."""
    import torch

    forces = "direct" if direct else "conservative"
    rows, exact = [], {}
    for dtype in ("float64", "float32"):
        ours = Runner(a.width, direct, dtype, batch)
        typed = {k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v for k, v in state.items()}
        typed = {k: v for k, v in typed.items() if k in ours.model.state_dict()}
        ours.model.load_state_dict(typed, strict=True)
        torch.save(typed, tmp / "state.pt")
        base.ask(cmd="build", width=a.width, direct=direct, dtype=dtype, batch=str(tmp / "batch.pt"),
                 state=str(tmp / "state.pt"))
        for mode in a.modes.split(","):
            _, _, mine = ours.step(mode, keep=True)
            base.ask(cmd="step", mode=mode, save=str(tmp / "out.pt"))
            theirs = torch.load(tmp / "out.pt", weights_only=True)
            diff = max_difference(theirs, mine)
            text = ", ".join(f"{k} {d:.2e} (rel {r:.1e})" for k, (d, r) in diff.items())
            print(f"  {forces} {mode} {dtype}: max |baseline − HEAD|: {text}", flush=True)
            if dtype == "float64":
                exact[mode] = theirs
            else:  # the scale of fp32 round-off: the baseline's own float32 result against its float64 one
                own = max_difference(exact[mode], theirs)
                text = ", ".join(f"{k} {d:.2e} (rel {r:.1e})" for k, (d, r) in own.items())
                print(f"  {forces} {mode} round-off scale, max |baseline fp32 − baseline fp64|: {text}", flush=True)
            if dtype == "float32":
                ta, tb = [], []
                for i in range(a.warmup + a.repeats):
                    wall, cpu, _ = ours.step(mode)
                    reply = base.ask(cmd="step", mode=mode)
                    if i >= a.warmup:
                        ta.append(cpu if a.clock == "cpu" else wall)
                        tb.append(reply["cpu_seconds"] if a.clock == "cpu" else reply["seconds"])
                mine_s, theirs_s = statistics.median(ta), statistics.median(tb)
                row = dict(width=a.width, forces=forces, mode=mode, baseline=base.sha, baseline_s=theirs_s,
                           head_s=mine_s, ratio=theirs_s / mine_s, atoms_per_s_head=n_atoms / mine_s,
                           atoms_per_s_baseline=n_atoms / theirs_s, max_rel_diff=max(r for _, r in diff.values()))
                rows.append(row)
                print(f"{forces:<13} {mode:<6} baseline {theirs_s:7.3f} s ({n_atoms / theirs_s:6.0f} atoms/s)  "
                      f"HEAD {mine_s:7.3f} s ({n_atoms / mine_s:6.0f} atoms/s)  ratio {theirs_s / mine_s:5.2f}×",
                      flush=True)
        del ours
    return rows


if __name__ == "__main__":
    main()
