"""The zoo's hub: publish → manifest → download (disk, HTTP with Range, Hub stand-in) → verified load.

Servers run on 127.0.0.1 inside the test (tests/zoo/hub_servers.py). Each test gets its own cache
(``SYMSCALE_CACHE``) and an empty ``SYMSCALE_REGISTRY``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_servers import FileServer  # noqa: E402

import zoo  # noqa: E402
from zoo.cli import app  # noqa: E402
from zoo.hub import metadata as schema  # noqa: E402
from zoo.hub.checkpoint import CorruptCheckpointError, load_model, save_checkpoint  # noqa: E402
from zoo.hub.fetch import cache_root, download, is_cached, model_dir  # noqa: E402
from zoo.hub.publish import choose, publish  # noqa: E402
from zoo.hub.release import MANIFEST, ManifestError, load_registry, parse_manifest, read_manifest  # noqa: E402
from zoo.registry import build  # noqa: E402

runner = CliRunner()


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("SYMSCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SYMSCALE_REGISTRY", "")
    for var in ("SYMSCALE_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)


def fake_run(root: Path, width: int, steps=(10, 20), losses=(0.9, 0.8), flops=(1e9, 2e9)) -> Path:
    """A run directory with real checkpoints of a small MPNN (weights differ per checkpoint)."""
    for step, loss, c in zip(steps, losses, flops):
        torch.manual_seed(step + width)
        model = build("mpnn", width, num_layers=1)
        meta = schema.example()
        meta.pop("N")
        meta["config"] = {}  # overrides (num_layers) are taken from the model
        meta.update(architecture="mpnn", width=width, step=step, atoms_seen=step * 100, flops=c,
                    validation={"loss": loss, "force_mae_mev_per_A": 100 * loss})
        save_checkpoint(root / "checkpoints" / f"step-{step:08d}", model, meta)
    return root


@pytest.fixture
def release(tmp_path) -> Path:
    runs = [fake_run(tmp_path / "run-a", 16), fake_run(tmp_path / "run-b", 24, losses=(0.7, 0.75), flops=(3e9, 4e9))]
    out = tmp_path / "release"
    result = runner.invoke(app, ["publish", *map(str, runs), "--out", str(out), "--release", "test-release",
                                 "--select", "all", "--description", "test"])
    assert result.exit_code == 0, result.output
    return out


def test_publish_then_download_gives_identical_weights(release, tmp_path):
    manifest = json.loads((release / MANIFEST).read_text())
    names = sorted(m["name"] for m in manifest["models"])
    assert names == ["mpnn-w16-d1k", "mpnn-w16-d2k", "mpnn-w24-d1k", "mpnn-w24-d2k"]
    assert "| mpnn-w24-d1k | mpnn | 24 |" in (release / "README.md").read_text()
    result = runner.invoke(app, ["download", "--all", "--registry", str(release / MANIFEST)])
    assert result.exit_code == 0, result.output
    models = load_registry([str(release)])
    for name in names:
        cached = model_dir(models[name]) / "model.safetensors"
        source = tmp_path / ("run-a" if "w16" in name else "run-b") / "checkpoints" / \
            f"step-{models[name].step:08d}" / "model.safetensors"
        assert cached.read_bytes() == source.read_bytes()
    listing = runner.invoke(app, ["list", "--registry", str(release)])
    assert listing.exit_code == 0 and "mpnn-w24-d2k" in listing.output and "yes" in listing.output


def test_select_final_and_frontier(tmp_path):
    runs = [fake_run(tmp_path / "a", 16), fake_run(tmp_path / "b", 24, losses=(0.7, 0.75), flops=(3e9, 4e9))]
    assert [p.parts[-3:] for p in choose(runs, "final")] == [("a", "checkpoints", "step-00000020"),
                                                             ("b", "checkpoints", "step-00000020")]
    # frontier over C: 1e9→0.9, 2e9→0.8, 3e9→0.7 own it; 4e9→0.75 does not
    owners = choose(runs, "frontier")
    assert [(p.parts[-3], p.name) for p in owners] == [("a", "step-00000010"), ("a", "step-00000020"),
                                                       ("b", "step-00000010")]


def test_http_download_interrupted_then_resumed(release):
    with FileServer(release) as server:
        entry = read_manifest(f"{server.url}/{MANIFEST}")[0]
        weights = next(f for f in entry.files if f.path.endswith("model.safetensors"))
        server.cut_after = weights.size // 2
        with pytest.raises(ConnectionError):
            download(entry, quiet=True)
        part = model_dir(entry) / "model.safetensors.part"
        assert 0 < part.stat().st_size < weights.size
        path = download(entry, quiet=True)
        ranges = [r for _, p, r in server.requests if p.endswith(weights.path)]
        assert ranges == [None, f"bytes={weights.size // 2}-"]  # the second request resumed
    assert (path / "model.safetensors").read_bytes() == (release / weights.path).read_bytes()
    assert not part.exists()


def test_zero_filled_tail_is_detected_and_repaired(release):
    entry = load_registry([str(release)])["mpnn-w16-d1k"]
    directory = download(entry, quiet=True)
    weights = directory / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) - 64] + bytes(64))  # same size, zeroed tail
    assert not is_cached(entry)
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors.*zoo download mpnn-w16-d1k --force"):
        load_model(directory, repair="run `zoo download mpnn-w16-d1k --force` to fetch a verified copy")
    result = runner.invoke(app, ["download", "mpnn-w16-d1k", "--registry", str(release)])  # re-run repairs
    assert result.exit_code == 0, result.output
    assert weights.read_bytes() == good
    assert zoo.load("mpnn-w16-d1k", registry=[str(release)]).width == 16


def test_altered_weights_refused_by_name(release):
    entry = load_registry([str(release)])["mpnn-w16-d2k"]
    directory = download(entry, quiet=True)
    tensors = load_file(directory / "model.safetensors")
    from safetensors.torch import save_file

    save_file({k: v + 1e-3 if v.is_floating_point() else v for k, v in tensors.items()},
              str(directory / "model.safetensors"))
    with pytest.raises(CorruptCheckpointError, match="corrupted or altered"):
        zoo.load(str(directory))


def test_wrong_hash_manifest_refused(release, tmp_path):
    manifest = json.loads((release / MANIFEST).read_text())
    manifest["models"][0]["files"][0]["sha256"] = "f" * 64
    (release / MANIFEST).write_text(json.dumps(manifest))
    entry = read_manifest(release)[0]
    with pytest.raises(ManifestError, match="refusing it"):
        download(entry, quiet=True)
    leftovers = list((cache_root() / "test-release").rglob("model.safetensors*"))
    assert leftovers == []


@pytest.mark.parametrize("path", ["../escape/model.safetensors", "/etc/passwd", "a/../../b", "a\\..\\b", "a//b"])
def test_path_traversal_refused(path):
    data = {"format": "symscale-release-1", "release": "bad", "source": ".", "models": [{
        "name": "a", "architecture": "mpnn", "width": 8, "N": 1, "D": 1, "validation": {}, "data_hash": "0",
        "files": [{"path": path, "size": 1, "sha256": "0" * 64}]}]}
    with pytest.raises(ManifestError, match="escapes|not under"):
        parse_manifest(data, "<test>")


def test_symlink_in_cache_refused(release, tmp_path):
    entry = load_registry([str(release)])["mpnn-w16-d1k"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (cache_root() / "test-release").mkdir(parents=True)
    (cache_root() / "test-release" / "mpnn-w16-d1k").symlink_to(elsewhere)
    with pytest.raises(ManifestError, match="symbolic link"):
        download(entry, quiet=True)
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("variable", ["SYMSCALE_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_mode(release, monkeypatch, variable):
    with FileServer(release) as server:
        online = read_manifest(f"{server.url}/{MANIFEST}")
        download(online[0], quiet=True)  # cached while online
        monkeypatch.setenv(variable, "1")
        assert load_model(model_dir(online[0])).width == 16  # the cached model loads
        with pytest.raises(ConnectionError, match="offline mode"):
            download(online[1], quiet=True)
        with pytest.raises(ConnectionError, match="offline mode"):
            read_manifest(f"{server.url}/{MANIFEST}")


def test_hub_source_through_a_local_endpoint(release, monkeypatch):
    revision = "0123456789abcdef0123456789abcdef01234567"
    with FileServer(release, hub_repo="symscale/test-release", hub_revision=revision) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        manifest = json.loads((release / MANIFEST).read_text())
        manifest["source"] = f"hf://symscale/test-release@{revision}"
        hub_manifest = release / "manifest.hub.json"
        hub_manifest.write_text(json.dumps(manifest))
        entry = load_registry([str(hub_manifest)])["mpnn-w24-d2k"]
        directory = download(entry, quiet=True)
        assert any(f"/resolve/{revision}/" in p for _, p, _ in server.requests)
    for item in entry.files:
        assert (cache_root() / "test-release" / item.path).read_bytes() == (release / item.path).read_bytes()
    assert load_model(directory).width == 24
    manifest["source"] = "hf://symscale/test-release"  # unpinned: refused
    with pytest.raises(ManifestError, match="pinned revision"):
        parse_manifest(manifest, "<test>")


def test_name_clash_names_both_manifests(release, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(release, copy)
    with pytest.raises(ManifestError, match=r"defined twice: in .*release.*manifest\.json.* and in .*copy"):
        load_registry([str(release), str(copy)])


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(FileNotFoundError, match="known models"):
        zoo.load("no-such-model")


def test_shipped_release_lists_and_loads_offline(monkeypatch):
    models = load_registry()
    assert {e.architecture for e in models.values()} == {"esen", "mpnn", "mc-egnn", "gemnet-oc"}
    monkeypatch.setenv("SYMSCALE_OFFLINE", "1")
    name = next(n for n, e in sorted(models.items()) if e.architecture == "esen")
    model = zoo.load(name)
    assert model.spec_name == "esen"
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0 and name in result.output


def test_publish_refuses_an_existing_release(release):
    with pytest.raises(FileExistsError):
        publish([release.parent / "run-a"], release, "again")
