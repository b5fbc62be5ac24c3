"""Across nodes, emulated on 127.0.0.1 (docs/multinode.md): 2 nodes × 1 rank through torchrun's c10d
rendezvous and through the DeepSpeed launcher (hostfile, ``--no_ssh``) train exactly as 1 node × 2
ranks; a node that does not share the run directory or the shards, or never starts, stops the
others with a message naming it; a checkpoint of 2 ranks resumes on 1 and on 4 ranks (elastic)
with its weights and optimizer state bitwise and every structure trained on once over the run."""

import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from jobs import PYTHON, REPO, TINY, free_port, run
from processes import TaggedProcess
from safetensors.torch import load_file

from datapipe.index import ShardIndex
from launcher import elastic
from launcher.optim import eval_from_train
from zoo.hub.checkpoint import read_metadata

DEEPSPEED = str(Path(PYTHON).parent / "deepspeed")
LIMIT = 600


def train_args(data, run_dir, *extra):
    return ["launcher/train.py", *TINY, "--train", str(data["train"]), "--val", str(data["val"]),
            "--atoms-per-batch", "100", "--checkpoint-fraction", "0.5", "--run-dir", str(run_dir),
            "--log-every", "1", "--max-atoms", "all", "--max-val-structures", "all", *extra]


def records(run_dir, kind):
    return [r for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == kind]


def losses(run_dir):
    return [(r["step"], r["loss"]) for r in records(run_dir, "train")]


def env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **extra}


def together(commands, timeout=LIMIT):
    """Start every command at once (one per emulated node); wait for all; their results."""
    jobs = [TaggedProcess(args, cwd=REPO, env=environment) for args, environment in commands]
    try:
        return [job.wait(timeout) for job in jobs]
    finally:
        for job in jobs:
            job.kill()


def structure_ids(folder, up_to=None):
    seen = Counter()
    for path in Path(folder).glob("ids-rank*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if up_to is None or record["step"] <= up_to:
                seen.update(record["ids"])
    return seen


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """1 node × 2 ranks (torchrun), checkpoints at half way and at the end, structure ids recorded."""
    root = tmp_path_factory.mktemp("one-node")
    (root / "ids").mkdir()
    result = run([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
                  *train_args(data, root / "run")], env={"SYMSCALE_RECORD_IDS": str(root / "ids")}, timeout=LIMIT)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"run": root / "run", "ids": root / "ids"}


@pytest.mark.slow
def test_two_nodes_through_torchrun_c10d_train_as_one_node(data, reference, tmp_path):
    port = free_port()
    node = [PYTHON, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
            "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "two-nodes", *train_args(data, tmp_path / "run")]
    results = together([(node, env()), (node, env())])
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    assert losses(tmp_path / "run") == losses(reference["run"])  # bitwise: the same global batches and sums
    assert records(tmp_path / "run", "start")[0]["world_size"] == 2
    final = sorted((reference["run"] / "checkpoints").glob("step-*"))[-1].name
    a, b = (load_file(r / "checkpoints" / final / "model.safetensors") for r in (reference["run"], tmp_path / "run"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_nodes_through_the_deepspeed_launcher_train_as_one_node(data, reference, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")  # two names: two nodes for the launcher
    port = free_port()
    nodes = [([DEEPSPEED, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(n), "--master_addr",
               "127.0.0.1", "--master_port", port, *train_args(data, tmp_path / "run")], env()) for n in (0, 1)]
    for result in together(nodes):
        assert result.returncode == 0, result.stderr[-3000:]
    assert losses(tmp_path / "run") == losses(reference["run"])


def copy_checkpoint(run_dir, step, target):
    """A run directory holding ``run_dir``'s config, log and its checkpoint of ``step`` only."""
    (target / "checkpoints").mkdir(parents=True)
    for name in ("config.json", "metrics.jsonl"):
        shutil.copy(run_dir / name, target / name)
    source = run_dir / "checkpoints" / f"step-{step:08d}"
    shutil.copytree(source, target / "checkpoints" / source.name)
    return target / "checkpoints" / source.name


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 4])
def test_a_two_rank_checkpoint_resumes_on_one_and_on_four_ranks(data, reference, tmp_path, world):
    half = min(r["step"] for r in records(reference["run"], "checkpoint"))
    steps = records(reference["run"], "start")[0]["steps"]
    assert 0 < half < steps
    checkpoint = copy_checkpoint(reference["run"], half, tmp_path / "run")
    saved = load_file(checkpoint / elastic.ELASTIC_DIR / elastic.TENSORS)
    # the consolidated state is the run's: its averaged weights x = (y - (1-β1) z)/β1 are the saved model's
    model = load_file(checkpoint / "model.safetensors")
    for key in (k.partition("/")[2] for k in saved if k.startswith("y/")):
        assert torch.equal(eval_from_train(saved[f"y/{key}"], saved[f"z/{key}"], 0.9), model[key]), key
    (tmp_path / "ids").mkdir()
    extra = {"SYMSCALE_RECORD_IDS": str(tmp_path / "ids")}
    command = [PYTHON, *(["-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port", free_port()]
                         if world > 1 else []), "launcher/train.py", "--resume", str(checkpoint)]
    result = run(command, env=extra, timeout=LIMIT)
    assert result.returncode == 0, result.stderr[-3000:]

    resumed = records(tmp_path / "run", "resume")[-1]
    assert resumed["world_size"] == world and resumed["step"] == half
    # weights and optimizer state, gathered back from the new ranks' partitions, are the saved ones
    assert resumed["elastic"]["from_world_size"] == 2 and resumed["elastic"]["to_world_size"] == world
    assert resumed["elastic"]["sha256"] == elastic.digest(saved)
    assert resumed["lineage"] == [{"world_size": 2, "num_workers": 0, "batches": half}]
    # every structure trained on exactly once over the run: 2 ranks before the checkpoint, `world` after
    seen = structure_ids(reference["ids"], up_to=half) + structure_ids(tmp_path / "ids")
    assert seen == structure_ids(reference["ids"])
    assert max(seen.values()) == 1
    index = ShardIndex.load(data["train"])
    assert len(seen) == index.n_structures
    final = sorted((tmp_path / "run" / "checkpoints").glob("step-????????"))[-1]
    meta = read_metadata(final)
    assert meta["atoms_seen"] == index.n_atoms and meta["samples_seen"] == index.n_structures
    assert meta["world_size"] == world and meta["engine"]["engine"] == "deepspeed"
    assert meta["elastic"]["state"] == "elastic/" and meta["elastic"]["segments"] == [
        {"world_size": 2, "num_workers": 0, "batches": half},
        {"world_size": world, "num_workers": 0, "batches": meta["step"] - half}]


def rank_env(rank, port, **extra):
    """One rank of 2 started by hand, as on its own node (one rank per node)."""
    return env(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=port, **extra)


@pytest.mark.slow
def test_a_node_with_another_run_directory_stops_every_rank_before_training(data, tmp_path):
    port = free_port()
    ranks = [([PYTHON, *train_args(data, tmp_path / f"node{r}-run", "--dist-timeout", "120")], rank_env(r, port))
             for r in (0, 1)]
    results = together(ranks)
    assert [r.returncode for r in results] == [2, 2], results[0].stderr[-3000:]
    last = results[0].stderr.strip().splitlines()[-1]
    assert last.startswith("error: the run directory is not shared") and "rank(s) [1]" in last, last
    assert f"rank 1 on {os.uname().nodename}: {tmp_path / 'node1-run'} does not exist there" in last, last
    assert not (tmp_path / "node0-run" / "checkpoints").exists()


@pytest.mark.slow
def test_a_node_without_the_shards_stops_every_rank_naming_it(data, tmp_path):
    port = free_port()
    elsewhere = tmp_path / "not-copied"
    ranks = [([PYTHON, *train_args(data, tmp_path / "run", "--dist-timeout", "120")], rank_env(0, port)),
             ([PYTHON, *train_args(data, tmp_path / "run", "--dist-timeout", "120", "--train", str(elsewhere))],
              rank_env(1, port))]
    results = together(ranks)
    assert [r.returncode for r in results] == [2, 2], results[0].stderr[-3000:]
    last = results[0].stderr.strip().splitlines()[-1]
    assert f"--train {elsewhere}: input {str(elsewhere)!r} does not exist (rank(s) [1] on" in last, last
    assert "every node must see the same run directory and shards" in last, last


@pytest.mark.slow
def test_a_node_that_never_starts_is_named_within_the_timeout_deepspeed(data, tmp_path):
    """Node 0 of 2 started alone through the DeepSpeed launcher: its rank stops after --dist-timeout
    naming rank 1 on node 1; nothing is written. (Rank 0 hosts the store and checks in before its
    wait starts: a 3 s timeout is safe on a loaded machine and is the test's idle time.)"""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    started = time.time()
    [result] = together([([DEEPSPEED, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", "0", "--master_addr",
                           "127.0.0.1", "--master_port", free_port(),
                           *train_args(data, tmp_path / "run", "--dist-timeout", "3")], env())])
    waited = time.time() - started
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors, result.stderr[-3000:]
    assert "rank(s) [1] of 2 did not join within 3 s" in errors[-1] and "node(s) [1] of 2" in errors[-1], errors
    assert waited < 3 + 240, f"took {waited:.0f} s"  # the bound plus start-up on a loaded 2-core machine
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_a_node_that_never_joins_torchrun_c10d_ends_at_the_join_timeout(data, tmp_path):
    """With torchrun's c10d rendezvous the agent itself waits for the nodes: ``join_timeout`` bounds it
    (3 s: the agent hosts the store, so the wait is all idle time)."""
    started = time.time()
    [result] = together([([PYTHON, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "--rdzv_id",
                           "alone", "--rdzv_conf", "join_timeout=3", *train_args(data, tmp_path / "run")], env())])
    waited = time.time() - started
    assert result.returncode != 0 and "RendezvousTimeoutError" in result.stderr, result.stderr[-3000:]
    assert waited < 3 + 120, f"took {waited:.0f} s"
    assert not (tmp_path / "run").exists()
