"""docker/compose.yaml's smoke test, run here without Docker: each service's command and
environment, as ``docker compose config`` resolves them, started as a process on this machine —
the two torchrun agents meet at a c10d rendezvous on 127.0.0.1 instead of ``node0``, and a
temporary folder stands in for the shared volume. What only Docker adds (the images, the network
between containers, the volume) is not exercised: docs/docker.md says how to check it."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest

from launch_lines import REPO, compose_config, torchrun, train_config
from processes import TaggedProcess

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_compose_smoke_command_trains_on_two_nodes(tmp_path, monkeypatch):
    config, _ = compose_config()
    services = config["services"]
    endpoint = torchrun(services["node0"]["command"]).rdzv_endpoint
    (mount,) = {v["target"] if isinstance(v, dict) else v.split(":")[1]  # the shared volume's mount point
                for service in services.values() for v in service["volumes"]}
    shared = tmp_path / "shared"
    here = f"127.0.0.1:{free_port()}"

    def local(text: str) -> str:  # the container's names and paths → this machine's
        return text.replace(endpoint, here).replace(mount + "/", f"{shared}/")

    jobs = {}
    try:
        for name, service in sorted(services.items()):
            command = [local(word) for word in service["command"]]
            env = {**os.environ, **{k: local(str(v)) for k, v in service["environment"].items()}}
            for inherited in ("MASTER_ADDR", "MASTER_PORT"):  # torchrun sets them from the rendezvous
                env.pop(inherited, None)
            jobs[name] = TaggedProcess([sys.executable, "-m", "torch.distributed.run", *command[1:]],
                                       cwd=REPO, env=env)
        results = {name: job.wait(timeout=1200) for name, job in jobs.items()}
    finally:
        for job in jobs.values():
            job.kill()
    for name, result in results.items():
        assert result.returncode == 0, f"{name}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"

    monkeypatch.chdir(REPO)
    cfg = train_config(torchrun(services["node0"]["command"]).training_script_args)
    run_dir = shared / cfg.run_dir.removeprefix(mount + "/")
    assert (run_dir / "config.json").is_file()
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 2, checkpoints  # --checkpoint-fraction=0.5: half-way and the end
    final = json.loads((checkpoints[-1] / "metadata.json").read_text())
    assert final["world_size"] == 2 and final["step"] == final["steps_total"]
    assert 0 < final["atoms_seen"] <= cfg.max_atoms and (checkpoints[-1] / "model.safetensors").is_file()
    # each node's rank wrote its part of the checkpoint into the shared run directory
    assert sorted(p.name for p in checkpoints[-1].glob("loader-rank*.json")) == \
        ["loader-rank00000.json", "loader-rank00001.json"]
    # rank 0 converted the raw files into the shared cache; both ranks read it from there
    cache = Path(local(services["node0"]["environment"]["SYMSCALE_CACHE"])) / "shards"
    assert list(cache.glob("train-*/index.json")) and list(cache.glob("val-*/index.json"))
