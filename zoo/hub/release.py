"""Release manifests and the registry of releases: which pretrained models exist and where they live.

A *release* is a folder holding checkpoints in the project's format (:mod:`zoo.hub.checkpoint`)
and one ``manifest.json``; a model card ``README.md`` sits beside it. The manifest lists, per
model, a stable name (``esen-w16-d120k``: architecture, width, atoms seen), what it is (architecture,
width, overrides, N, atoms seen D, FLOPs C), its validation metrics on a named split, the
training data's identity, and each file with its size (bytes) and SHA-256::

    {"format": "symscale-release-1", "release": "symscale-sample-0", "source": ".",
     "models": [{"name": "esen-w16-d120k", "architecture": "esen", "width": 16, "overrides": {},
                 "N": 73552, "D": 120000, "C": 1.2e13, "step": 960,
                 "validation": {"split": "omol25_sample/val[:200]", "loss": 0.9, "force_mae_mev_per_A": 200.0},
                 "data_hash": "…", "files": [{"path": "esen-w16-d120k/model.safetensors",
                                              "size": 301234, "sha256": "…"}, …]}]}

``source`` says where the files are: a path relative to the manifest (``"."``: beside it), an
``http(s)://`` base URL (file URL = base + path), or ``hf://ORG/REPO@REVISION`` (a Hugging Face
Hub repository at a pinned commit). A relative source of a manifest read from a URL is resolved
against that URL.

The *registry* is every manifest the user can see: the releases shipped inside the package
(``zoo/hub/releases/*/manifest.json``), those named by the environment variable
:data:`REGISTRY_ENV` (``os.pathsep``-separated files or URLs), and those given with ``--registry``.
Model names must be unique across them; a clash is an error naming both manifests.

Manifests may come from the internet, so file paths are checked (:func:`check_relative_path`):
absolute paths, ``..``, backslashes and empty components are refused. This module imports no torch.

>>> entry = ModelEntry.from_json(example_manifest()["models"][0], "release", "<example>", ".")
>>> entry.name, entry.architecture, entry.width
('esen-w16-d1k', 'esen', 16)
>>> check_relative_path("../etc/passwd", "<example>")
Traceback (most recent call last):
...
zoo.hub.release.ManifestError: <example>: file path '../etc/passwd' escapes the release folder (absolute, '..', '.', empty or backslash components are refused)
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

#: the manifest format this code reads and writes
FORMAT = "symscale-release-1"
#: file name of a release's manifest
MANIFEST = "manifest.json"
#: environment variable naming extra registries (files or URLs, separated by os.pathsep)
REGISTRY_ENV = "SYMSCALE_REGISTRY"
#: environment variable: ``1`` forbids network access (as ``HF_HUB_OFFLINE`` does)
OFFLINE_ENV = "SYMSCALE_OFFLINE"
#: the folder of the releases shipped with the package
SHIPPED = Path(__file__).resolve().parent / "releases"
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def offline() -> bool:
    """True when ``SYMSCALE_OFFLINE`` or ``HF_HUB_OFFLINE`` is set to 1/true/yes/on."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in (OFFLINE_ENV, "HF_HUB_OFFLINE"))


class ManifestError(ValueError):
    """A manifest that is malformed, unsafe, or clashes with another."""


def check_name(name: str, what: str, where: str) -> str:
    """``name`` if it is a safe model/release name (lower-case letters, digits, ``._-``), else ``ManifestError``."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise ManifestError(f"{where}: {what} {name!r} is not a valid name (lower-case letters, digits, '.', '_', '-')")
    return name


def check_relative_path(path: str, where: str) -> str:
    """``path`` if it is a relative POSIX path that stays inside its folder, else ``ManifestError``."""
    parts = PurePosixPath(path).parts if isinstance(path, str) else ()
    if (not isinstance(path, str) or not path or "\\" in path or path.startswith("/") or "//" in path
            or any(p in ("..", ".", "") for p in parts) or ":" in parts[0]):
        raise ManifestError(f"{where}: file path {path!r} escapes the release folder (absolute, '..', '.', "
                            "empty or backslash components are refused)")
    return path


@dataclass(frozen=True)
class FileEntry:
    """One file of a model: path relative to the release, size (bytes), SHA-256 (hex)."""

    path: str
    size: int
    sha256: str


@dataclass
class ModelEntry:
    """One model of a release, as its manifest describes it (see the module docstring)."""

    name: str
    release: str
    architecture: str
    width: int
    overrides: dict
    N: int
    D: int
    C: float | None
    step: int
    validation: dict
    data_hash: str
    files: list[FileEntry]
    manifest: str  # where the manifest was read from (file path or URL)
    source: str  # resolved source: absolute directory, base URL ending in '/', or hf://ORG/REPO@REV
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict, release: str, manifest: str, source: str) -> ModelEntry:
        """Check one ``models[]`` object of a manifest; ``ManifestError`` naming ``manifest`` if bad."""
        where = f"{manifest}"
        if not isinstance(data, dict):
            raise ManifestError(f"{where}: each model must be a JSON object")
        missing = [k for k in ("name", "architecture", "width", "N", "D", "validation", "data_hash", "files")
                   if k not in data]
        if missing:
            raise ManifestError(f"{where}: model {data.get('name')!r} lacks {missing}")
        name = check_name(data["name"], "model name", where)
        files = []
        for item in data["files"]:
            try:
                path, size, sha = item["path"], int(item["size"]), str(item["sha256"]).lower()
            except (KeyError, TypeError, ValueError) as err:
                raise ManifestError(f"{where}: model {name!r} has a bad file entry {item!r}") from err
            check_relative_path(path, where)
            if PurePosixPath(path).parts[0] != name:
                raise ManifestError(f"{where}: file {path!r} of model {name!r} is not under '{name}/'")
            if not _SHA256.match(sha) or size < 0:
                raise ManifestError(f"{where}: file {path!r} needs a size >= 0 and a 64-hex sha256")
            files.append(FileEntry(path, size, sha))
        known = {"name", "architecture", "width", "overrides", "N", "D", "C", "step", "validation",
                 "data_hash", "files"}
        return cls(name=name, release=release, architecture=str(data["architecture"]), width=int(data["width"]),
                   overrides=dict(data.get("overrides") or {}), N=int(data["N"]), D=int(data["D"]),
                   C=None if data.get("C") is None else float(data["C"]), step=int(data.get("step", 0)),
                   validation=dict(data["validation"]), data_hash=str(data["data_hash"]), files=files,
                   manifest=manifest, source=source, extra={k: v for k, v in data.items() if k not in known})

    def to_json(self) -> dict:
        """The ``models[]`` object of a manifest."""
        return {"name": self.name, "architecture": self.architecture, "width": self.width,
                "overrides": self.overrides, "N": self.N, "D": self.D, "C": self.C, "step": self.step,
                "validation": self.validation, "data_hash": self.data_hash, **self.extra,
                "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files]}


def _is_url(text: str) -> bool:
    return urllib.parse.urlsplit(str(text)).scheme in ("http", "https")


def resolve_source(source: str, manifest: str) -> str:
    """The absolute source of a manifest read from ``manifest`` (file path or URL).

    ``hf://`` sources must pin a revision (``hf://ORG/REPO@REVISION``); URL sources get a trailing
    slash; relative paths are resolved against the manifest's folder (or URL).
    """
    if source.startswith("hf://"):
        repo, sep, revision = source[5:].partition("@")
        if not sep or not revision or repo.count("/") != 1:
            raise ManifestError(f"{manifest}: hub source {source!r} must be hf://ORG/REPO@REVISION (a pinned revision)")
        return source
    if _is_url(source):
        return source if source.endswith("/") else source + "/"
    if _is_url(manifest):
        joined = urllib.parse.urljoin(manifest, source)
        return joined if joined.endswith("/") else joined + "/"
    return str((Path(manifest).resolve().parent / source).resolve())


def parse_manifest(data: dict, manifest: str) -> list[ModelEntry]:
    """The checked models of a manifest object read from ``manifest`` (a path or URL, for messages)."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ManifestError(f"{manifest}: not a symscale release manifest (format must be {FORMAT!r})")
    release = check_name(data.get("release"), "release name", manifest)
    source = resolve_source(str(data.get("source", ".")), manifest)
    entries = [ModelEntry.from_json(m, release, manifest, source) for m in data.get("models", [])]
    names = [e.name for e in entries]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ManifestError(f"{manifest}: model names {dup} appear more than once")
    return entries


def read_manifest(location: str | os.PathLike, timeout: float = 30.0) -> list[ModelEntry]:
    """Read and check the manifest at ``location``: a file, a release folder, or an http(s) URL.

    Raises ``FileNotFoundError`` for a missing file, ``ManifestError`` for a bad manifest, and
    ``ConnectionError`` (naming the URL) when a URL cannot be fetched, e.g. in offline mode.
    """
    location = str(location)
    if _is_url(location):
        if offline():
            raise ConnectionError(f"offline mode is on; cannot read the registry {location}")
        try:
            with urllib.request.urlopen(location, timeout=timeout) as response:  # noqa: S310 - http(s) only
                text = response.read().decode()
        except OSError as err:
            raise ConnectionError(f"cannot read the registry {location}: {err}") from err
    else:
        path = Path(location)
        path = path / MANIFEST if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"no release manifest at {location}")
        location, text = str(path.resolve()), path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ManifestError(f"{location}: not valid JSON ({err})") from err
    return parse_manifest(data, location)


def registry_locations(extra: list[str] | None = None) -> list[str]:
    """Manifests in registry order: shipped, then :data:`REGISTRY_ENV`, then ``extra`` (``--registry``)."""
    shipped = sorted(str(p) for p in SHIPPED.glob(f"*/{MANIFEST}"))
    env = [p for p in os.environ.get(REGISTRY_ENV, "").split(os.pathsep) if p.strip()]
    out: list[str] = []
    for loc in shipped + env + list(extra or []):
        key = loc if _is_url(loc) else str(Path(loc).resolve() / MANIFEST if Path(loc).is_dir() else Path(loc).resolve())
        if key not in out:
            out.append(key)
    return out


def load_registry(extra: list[str] | None = None) -> dict[str, ModelEntry]:
    """Every model of every registry, by name.

    Raises ``ManifestError`` if two manifests define the same model name (naming both).
    """
    models: dict[str, ModelEntry] = {}
    for location in registry_locations(extra):
        for entry in read_manifest(location):
            if entry.name in models:
                raise ManifestError(f"model name {entry.name!r} is defined twice: in {models[entry.name].manifest} "
                                    f"(release {models[entry.name].release}) and in {entry.manifest} "
                                    f"(release {entry.release}); names must be unique across registries")
            models[entry.name] = entry
    return models


def example_manifest() -> dict:
    """A small valid manifest object (for examples and tests)."""
    return {"format": FORMAT, "release": "example", "source": ".", "models": [{
        "name": "esen-w16-d1k", "architecture": "esen", "width": 16, "overrides": {}, "N": 100, "D": 1000,
        "C": 2e9, "step": 10, "validation": {"split": "val", "loss": 0.5}, "data_hash": "0" * 64,
        "files": [{"path": "esen-w16-d1k/model.safetensors", "size": 3, "sha256": "a" * 64}]}]}
