"""The fairchem side of ``bench_vs_fairchem.py``: runs in fairchem's own virtual environment.

Started by the benchmark as a child process with ``.venv-fairchem/bin/python``; imports only
torch, numpy and fairchem-core (never the project: the two environments pin their own torch).
It reads one JSON command per line on stdin and answers one JSON line on stdout:

- ``{"cmd": "load", "path": NPZ}``: the molecules (per structure ``z_i``, ``pos_i``,
  ``edge_index_i`` (local, source/target as the project's graph), ``charge_i``, ``spin_i``);
- ``{"cmd": "build", "channels", "lmax", "direct", "layers", "cutoff", "num_radial", "seed",
  "device", "dtype"}``: fairchem's ``eSCNMDBackbone`` with its energy (and direct force) heads →
  ``{"params": N}``;
- ``{"cmd": "step", "mode": "train" | "infer"}``: one timed step → ``{"seconds": wall, "cpu_seconds": process CPU time}``. A training
  step is forward + forces + loss + backward (double backward for conservative forces);
  inference is energy + forces in eval mode;
- ``{"cmd": "quit"}``.

The graph is the project's (the same edges on both sides), given to fairchem with
``otf_graph=False`` and zero cell offsets (molecules, no periodicity).
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

from json_worker import serve  # benchmarks/ is on sys.path: this file runs as a script


def _batch(path: str, device: str, dtype: torch.dtype):
    from fairchem.core.datasets.atomic_data import AtomicData, atomicdata_list_to_batch

    arrays = np.load(path)
    count = int(arrays["count"])
    items = []
    for i in range(count):
        z = torch.as_tensor(arrays[f"z_{i}"], dtype=torch.long)
        edge_index = torch.as_tensor(arrays[f"edge_index_{i}"], dtype=torch.long)
        n, e = z.shape[0], edge_index.shape[1]
        items.append(
            AtomicData(
                pos=torch.as_tensor(arrays[f"pos_{i}"], dtype=torch.float32),
                atomic_numbers=z,
                cell=torch.zeros(1, 3, 3),
                pbc=torch.zeros(1, 3, dtype=torch.bool),
                natoms=torch.tensor([n]),
                edge_index=edge_index,
                cell_offsets=torch.zeros(e, 3),
                nedges=torch.tensor([e]),
                charge=torch.tensor([int(arrays[f"charge_{i}"])]),
                spin=torch.tensor([int(arrays[f"spin_{i}"])]),
                fixed=torch.zeros(n, dtype=torch.long),
                tags=torch.zeros(n, dtype=torch.long),
            )
        )
    batch = atomicdata_list_to_batch(items)
    batch.pos = batch.pos.to(dtype)
    batch.cell = batch.cell.to(dtype)
    return batch.to(device)


class Runner:
    def __init__(self) -> None:
        self.path = None
        self.batch = None
        self.model = None

    def load(self, path: str) -> dict:
        self.path = path
        return {"ok": True}

    def build(self, cfg: dict) -> dict:
        from fairchem.core.models.uma.escn_md import (
            Linear_Force_Head,
            MLP_EFS_Head,
            MLP_Energy_Head,
            eSCNMDBackbone,
        )

        torch.manual_seed(int(cfg.get("seed", 0)))
        device, dtype = cfg.get("device", "cpu"), getattr(torch, cfg.get("dtype", "float32"))
        channels, direct = int(cfg["channels"]), bool(cfg["direct"])
        backbone = eSCNMDBackbone(
            max_num_elements=101,
            sphere_channels=channels,
            lmax=int(cfg["lmax"]),
            mmax=int(cfg["lmax"]),
            otf_graph=False,
            cutoff=float(cfg["cutoff"]),
            edge_channels=channels,
            num_distance_basis=int(cfg["num_radial"]),
            direct_forces=direct,
            regress_forces=True,
            num_layers=int(cfg["layers"]),
            hidden_channels=channels,
            norm_type="rms_norm_sh",
            act_type="gate",
            ff_type="spectral",
            chg_spin_emb_type="rand_emb",
            use_dataset_embedding=False,
            always_use_pbc=False,
        )
        if direct:
            heads = torch.nn.ModuleDict({"energy": MLP_Energy_Head(backbone), "forces": Linear_Force_Head(backbone)})
        else:
            heads = torch.nn.ModuleDict({"efs": MLP_EFS_Head(backbone, wrap_property=False)})
        self.backbone, self.heads, self.direct = backbone.to(device, dtype), heads.to(device, dtype), direct
        self.batch = _batch(self.path, device, dtype)
        self.device = device
        params = sum(p.numel() for m in (backbone, heads) for p in m.parameters() if p.requires_grad)
        return {"params": params, "atoms": int(self.batch.pos.shape[0]), "edges": int(self.batch.edge_index.shape[1])}

    def _energy_forces(self, data):
        emb = self.backbone(data)
        if self.direct:
            energy = self.heads["energy"](data, emb)["energy"]
            forces = self.heads["forces"](data, emb)["forces"]
        else:
            out = self.heads["efs"](data, emb)
            energy, forces = out["energy"], out["forces"]
        return energy, forces

    def step(self, mode: str) -> dict:
        data = self.batch.clone()
        train = mode == "train"
        self.backbone.train(train)
        self.heads.train(train)
        if self.device == "cuda":
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        if train:
            energy, forces = self._energy_forces(data)
            loss = energy.abs().mean() + forces.norm(dim=-1).mean()
            loss.backward()
        else:
            context = torch.enable_grad() if not self.direct else torch.no_grad()
            with context:
                energy, forces = self._energy_forces(data)
            energy, forces = energy.detach(), forces.detach()
        if self.device == "cuda":
            torch.cuda.synchronize()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        for module in (self.backbone, self.heads):
            module.zero_grad(set_to_none=True)
        return {"seconds": seconds, "cpu_seconds": cpu, "finite": bool(torch.isfinite(forces).all())}


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    runner = Runner()
    commands = {"load": lambda msg: runner.load(msg["path"]), "build": runner.build,
                "step": lambda msg: runner.step(msg["mode"])}

    def handle(msg: dict) -> dict:
        if msg["cmd"] not in commands:
            raise ValueError(f"unknown command {msg['cmd']!r}")
        return commands[msg["cmd"]](msg)

    serve(handle)


if __name__ == "__main__":
    main()
