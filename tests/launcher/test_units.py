"""Fast in-process checks: configuration, loss, schedule-free averaged weights, checkpoint format."""

import copy
import os
import json
from pathlib import Path

import ase.db
import pytest
import torch

from datapipe.graph import batch_from_atoms
from launcher.config import TrainConfig, parse
from launcher.dsconfig import deepspeed_config
from zoo.registry import transferred_lr
from launcher.job import checkpoint_steps, checkpoint_steps_at
from launcher.loss import global_loss, loss_terms
from launcher.optim import averaged_weights_plain, build_optimizer
from zoo.hub.checkpoint import load_model, read_metadata, save_checkpoint
from zoo.hub.metadata import REQUIRED_KEYS
from zoo.registry import build


def molecules(path, n=6):
    with ase.db.connect(str(path)) as db:
        atoms = [row.toatoms() for row in db.select(limit=n)]
    for a in atoms:
        a.info.update(charge=0, spin=1 + int(a.numbers.sum()) % 2)  # multiplicity fits Σ Z
    return atoms


def tiny():
    torch.manual_seed(0)
    model = build("mpnn", 8, num_layers=1)
    model.set_normalization([0.0, -13.6, 0, 0, 0, 0, -1030.0, -1480.0, -2040.0], 0.8)
    return model


def test_lr_transfer_and_schedule():
    assert transferred_lr(64, 2e-3, 64) == pytest.approx(2e-3)
    assert transferred_lr(256, 2e-3, 64) == pytest.approx(5e-4)
    with pytest.raises(ValueError):
        transferred_lr(0, 2e-3, 64)
    assert checkpoint_steps(100, 0.1) == set(range(10, 101, 10))
    assert checkpoint_steps(7, 0.1) == {1, 2, 3, 4, 5, 6, 7}
    assert max(checkpoint_steps(95, 0.25)) == 95


def test_deepspeed_config_layers(tmp_path):
    base = tmp_path / "ds.json"
    base.write_text(json.dumps({"zero_optimization": {"stage": 1, "reduce_bucket_size": 123},
                                "gradient_clipping": 5.0, "bf16": {"enabled": False}}))
    cfg = parse(["--deepspeed_config", str(base)])
    ds = deepspeed_config(cfg, bf16_supported=True)
    assert ds["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 123}  # file over defaults
    assert ds["gradient_clipping"] == 5.0 and ds["bf16"]["enabled"] is False
    assert ds["train_micro_batch_size_per_gpu"] == 1
    ds = deepspeed_config(parse(["--deepspeed_config", str(base), "--zero-stage", "3", "--precision", "bf16"]), True)
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is True  # flags over file
    assert deepspeed_config(parse([]), bf16_supported=False)["bf16"]["enabled"] is False  # CPU: fp32
    assert deepspeed_config(parse([]), bf16_supported=True)["bf16"]["enabled"] is True  # CUDA: bf16
    assert deepspeed_config(parse([]), False)["zero_optimization"]["stage"] == 2
    with pytest.raises(ValueError, match="zero-stage 3 --conservative is not exact.*use --engine fsdp --conservative"):
        deepspeed_config(parse(["--zero-stage", "3", "--conservative"]), False)
    ds = deepspeed_config(parse(["--zero-stage", "3"]), False)
    assert ds["zero_optimization"]["memory_efficient_linear"] is False  # FLOP counter sees plain linears
    base.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ValueError, match="optimizer"):
        deepspeed_config(parse(["--deepspeed_config", str(base)]), False)


def test_loss_is_the_papers_loss(data):
    """One process: per-atom energy MAE + mean force L2 norm, in units of σ."""
    atoms = molecules(data["raw_train"])
    batch = batch_from_atoms(atoms)
    model = tiny()
    out = model(batch)
    loss, stats = global_loss(loss_terms(out, batch, 0.8))
    n = batch["natoms"].double()
    energy = ((out["energy"] - batch["energy"]).abs() / n).mean() / 0.8
    force = (out["forces"] - batch["forces"]).norm(dim=-1).mean() / 0.8
    assert loss.item() == pytest.approx((energy + force).item(), rel=1e-6)
    assert stats["structures"] == len(atoms) and stats["atoms"] == int(n.sum())
    bad = batch.clone()
    bad["forces"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        loss_terms(model(bad), bad, 0.8)


def test_averaged_weights_match_schedulefree_eval(data):
    """x assembled from y and z equals the weights schedulefree's own ``optimizer.eval()`` gives."""
    batch = batch_from_atoms(molecules(data["raw_train"]))
    model = tiny()
    optimizer = build_optimizer(model, lr=1e-2, warmup_steps=2)
    target = copy.deepcopy(model)
    averaged_weights_plain(model, optimizer, target)  # before any step: x = y
    for p, q in zip(target.parameters(), model.parameters()):
        assert torch.equal(p, q)
    for _ in range(4):
        optimizer.zero_grad()
        terms = loss_terms(model(batch), batch, 0.8)
        (terms.energy_sum / terms.structures + terms.force_sum / terms.atoms).backward()
        optimizer.step()
    averaged_weights_plain(model, optimizer, target)
    optimizer.eval()
    for (name, p), q in zip(target.named_parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
    assert any(not torch.equal(p, q) for p, q in zip(target.parameters(), tiny().parameters()))


def test_checkpoint_round_trip(data, tmp_path):
    """load_model rebuilds the model and gives the same predictions; metadata keys are enforced."""
    model = tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    meta = {k: 0 for k in REQUIRED_KEYS if k not in ("architecture", "width", "N", "config")}
    meta.update(config={"model_overrides": {"num_layers": 1}}, validation={"loss": 1.0}, flops=None)
    save_checkpoint(tmp_path / "ck", model, meta)
    loaded = load_model(tmp_path / "ck")
    batch = batch_from_atoms(molecules(data["raw_train"]))
    expected, got = model.eval()(batch), loaded(batch)
    torch.testing.assert_close(got["energy"], expected["energy"], rtol=0, atol=1e-9)
    torch.testing.assert_close(got["forces"], expected["forces"], rtol=0, atol=0)
    saved = read_metadata(tmp_path / "ck")
    assert saved["architecture"] == "mpnn" and saved["width"] == 8 and saved["N"] > 0
    assert saved["config"]["normalization"]["force_rms"] == 0.8
    with pytest.raises(KeyError, match="step"):
        save_checkpoint(tmp_path / "bad", model, {k: v for k, v in meta.items() if k != "step"})
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path)


class _StateWritingEngine:
    """Writes one engine-state file where a DeepSpeed engine writes its own (``save_checkpoint``'s call)."""

    def save_checkpoint(self, folder, tag, client_state, save_latest):
        Path(folder, tag).mkdir(parents=True)
        Path(folder, tag, "state.json").write_text(json.dumps(client_state))


def test_a_failed_first_checkpoint_names_its_cause(tmp_path, monkeypatch):
    """The first save of a run fails (a full disk while rank 0 writes the weights): the error names that
    cause and that no checkpoint is complete yet, instead of the refusal a resume would give; nothing is
    left behind."""
    from launcher import checkpoint as ckpt
    from launcher.engine import Runtime

    monkeypatch.setenv("SYMSCALE_FAULT", "enospc-in-checkpoint:1")
    one = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), bf16_supported=False)
    with pytest.raises(ckpt.CheckpointError, match=r"\(the disk is full\).*No space left.*latest complete: none yet"):
        ckpt.save(tmp_path / "run", 1, _StateWritingEngine(), tiny(), ckpt.TrainState(), {}, {"step": 1}, one)
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []


def test_each_rank_syncs_the_checkpoint_files_it_sees_and_skips_those_renamed_meanwhile(tmp_path, monkeypatch):
    """Every rank fsyncs the partial checkpoint while the others still write theirs: a file listed by the
    walk and renamed before it is opened (rank 0's ``model.safetensors.tmp``) is skipped, not an error
    that fails the save under load; the files that are there are synced."""
    from launcher import checkpoint as ckpt

    (tmp_path / "loader-rank00001.json").write_text("{}")
    listing = [(str(tmp_path), [], ["loader-rank00001.json", "model.safetensors.tmp"])]  # the .tmp renamed since
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(ckpt.os, "walk", lambda root: iter(listing))
    monkeypatch.setattr(ckpt.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    ckpt._sync_tree(tmp_path)
    assert str(tmp_path / "loader-rank00001.json") in synced and str(tmp_path) in synced


def test_config_json_round_trip():
    cfg = parse(["--model", "mpnn", "--width", "8", "--model-arg", "num_layers=1", "--zero-stage", "1"])
    again = TrainConfig.from_json(cfg.to_json())
    assert again == cfg and again.model_overrides == {"num_layers": 1} and again.zero_stage == 1


def test_checkpoint_at_fractions_give_a_geometric_ladder():
    cfg = parse(["--checkpoint-at", "0.5,0.125,0.25"])
    assert cfg.checkpoint_at == [0.125, 0.25, 0.5]
    assert TrainConfig.from_json(cfg.to_json()).checkpoint_at == [0.125, 0.25, 0.5]  # resumed runs keep it
    assert sorted(checkpoint_steps_at(58, cfg.checkpoint_at)) == [7, 14, 29, 58]
    assert sorted(checkpoint_steps_at(3, [0.01, 0.5])) == [1, 2, 3]  # never step 0, always the last
    for bad in ("0", "1.5", "a,b", ""):
        with pytest.raises(SystemExit):
            parse(["--checkpoint-at", bad])


def test_one_rank_under_torchrun_keeps_the_agents_store_port():
    """``torchrun --nproc_per_node 1``: the agent hosts the store at MASTER_PORT, so the launcher must
    not move a one-rank job to a fresh port (it did, and the rank waited for a store nobody hosted);
    a plain one-process job still gets a fresh port."""
    import json
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "MASTER_"))}
    expected = (("True", True), (None, False))  # (TORCHELASTIC_USE_AGENT_STORE, MASTER_PORT kept)
    envs = [{**base, "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999",
             **({"TORCHELASTIC_USE_AGENT_STORE": agent} if agent else {})} for agent, _ in expected]
    # one process tries both environments, each set whole before the call (its imports are most of the cost)
    probe = ("import json, os, sys; from launcher.engine import setup_environment\n"
             "for env in json.loads(sys.argv[1]):\n"
             "    os.environ.clear(); os.environ.update(env); setup_environment(); print(os.environ['MASTER_PORT'])")
    out = subprocess.run([sys.executable, "-c", probe, json.dumps(envs)], env=envs[0], capture_output=True,
                         text=True, check=True)
    for (agent, same), port in zip(expected, out.stdout.split(), strict=True):
        assert (port == "29999") is same, (agent, out.stdout)


def test_cpu_matmul_choice_is_parsed_saved_and_kept_by_old_configs():
    """--cpu-matmul: oneDNN by default, "blas" on request, saved in config.json; a config written
    before the option existed reads back as the default."""
    assert parse([]).cpu_matmul == "onednn"
    cfg = parse(["--cpu-matmul", "blas"])
    assert TrainConfig.from_json(json.loads(json.dumps(cfg.to_json()))).cpu_matmul == "blas"
    old = {k: v for k, v in parse([]).to_json().items() if k != "cpu_matmul"}
    assert TrainConfig.from_json(old).cpu_matmul == "onednn"
    with pytest.raises(SystemExit):
        parse(["--cpu-matmul", "mkl"])
