"""Download release models into a local cache, verified by SHA-256.

Every file of a model (:class:`zoo.hub.release.ModelEntry`) lands under
``<cache>/<release>/<path>``; the cache root is :data:`CACHE_ENV` if set, else
``$XDG_CACHE_HOME/symscale/models`` (``~/.cache/symscale/models``). A file is fetched into
``<path>.part``, checked against the manifest's size and SHA-256, and renamed atomically. A cached
file counts as present only if its SHA-256 matches (not its size), so re-running a download
repairs a damaged file (with a warning naming it).

Sources (see :mod:`zoo.hub.release`):

- a folder on disk: the file is copied;
- ``http(s)://``: streamed with ``urllib``; an interrupted ``.part`` file is resumed with an HTTP
  ``Range`` request (RFC 9110 §14) — a server that answers 200 instead of 206 restarts it; if the
  finished file's hash is wrong, it is fetched once more from scratch before giving up;
- ``hf://ORG/REPO@REVISION``: ``huggingface_hub.hf_hub_download`` at that pinned revision (the
  endpoint is ``HF_ENDPOINT``; the token is the user's as usual: ``huggingface-cli login`` or
  ``HF_TOKEN``).

Offline mode (``HF_HUB_OFFLINE=1`` or :data:`OFFLINE_ENV` ``=1``): cached models load, folders on
disk are still copied, and anything that needs the network raises ``ConnectionError`` that says so.
A rich progress bar is shown for files over :data:`PROGRESS_BYTES`.
"""

from __future__ import annotations

import http.client
import os
import shutil
import urllib.error
import warnings
import urllib.request
from pathlib import Path

from zoo.hub.metadata import sha256_file
from zoo.hub.release import OFFLINE_ENV, FileEntry, ManifestError, ModelEntry, check_relative_path, offline

#: environment variable: cache root for downloaded models
CACHE_ENV = "SYMSCALE_CACHE"
#: files larger than this many bytes get a progress bar
PROGRESS_BYTES = 2 << 20
_CHUNK = 1 << 16


def cache_root() -> Path:
    """The cache folder (not created)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "symscale" / "models"


def safe_target(root: Path, relative: str, where: str) -> Path:
    """``root/relative``, refusing paths that escape ``root`` or pass through a symbolic link.

    Raises ``ManifestError`` naming ``where``.
    """
    check_relative_path(relative, where)
    root = root.resolve()
    target = root.joinpath(*relative.split("/"))
    node = root
    for part in relative.split("/"):
        node = node / part
        if node.is_symlink():
            raise ManifestError(f"{where}: {node} is a symbolic link; refusing to write or read through it")
    if root not in target.resolve().parents:
        raise ManifestError(f"{where}: {relative!r} resolves outside the cache {root}")
    return target


def model_dir(entry: ModelEntry, root: Path | None = None) -> Path:
    """The cached checkpoint directory of ``entry`` (``<cache>/<release>/<name>``)."""
    return safe_target(root or cache_root(), f"{entry.release}/{entry.name}", entry.manifest)


def _is_valid(path: Path, item: FileEntry) -> bool:
    return path.is_file() and not path.is_symlink() and path.stat().st_size == item.size and \
        sha256_file(path) == item.sha256


def is_cached(entry: ModelEntry, root: Path | None = None) -> bool:
    """True when every file of ``entry`` is in the cache with its manifest SHA-256."""
    root = root or cache_root()
    return all(_is_valid(safe_target(root, f"{entry.release}/{f.path}", entry.manifest), f) for f in entry.files)


def _progress(total: int, label: str, quiet: bool):
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                        transient=True, disable=quiet or total < PROGRESS_BYTES)
    return progress, label


def _copy(source: Path, part: Path, item: FileEntry, quiet: bool) -> None:
    if not source.is_file():
        raise FileNotFoundError(f"release file {source} is missing")
    progress, label = _progress(item.size, item.path, quiet)
    with progress, open(source, "rb") as src, open(part, "wb") as dst:
        task = progress.add_task(label, total=item.size)
        while block := src.read(_CHUNK):
            dst.write(block)
            progress.advance(task, len(block))


def _http(url: str, part: Path, item: FileEntry, quiet: bool, timeout: float = 60.0) -> None:
    """Fetch ``url`` into ``part``, resuming from its current length with a Range request."""
    have = part.stat().st_size if part.exists() else 0
    if have > item.size:
        part.unlink()
        have = 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - http(s) only
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing left to send: the .part may already be complete
            return
        raise ConnectionError(f"GET {url}: HTTP {err.code} {err.reason}") from err
    except OSError as err:
        raise ConnectionError(f"GET {url}: {err}") from err
    with response:
        mode = "ab" if have and response.status == 206 else "wb"
        have = have if mode == "ab" else 0
        progress, label = _progress(item.size, item.path, quiet)
        with progress, open(part, mode) as out:
            task = progress.add_task(label, total=item.size, completed=have)
            try:
                while block := response.read(_CHUNK):
                    out.write(block)
                    progress.advance(task, len(block))
            except (http.client.HTTPException, OSError) as err:  # e.g. IncompleteRead: keep .part to resume
                raise ConnectionError(f"GET {url}: interrupted after {out.tell()} of {item.size} bytes ({err!r}); "
                                      "run the download again to resume") from err
            if out.tell() < item.size:  # the server closed early (http.client's read(n) does not raise)
                raise ConnectionError(f"GET {url}: connection closed after {out.tell()} of {item.size} bytes; "
                                      "run the download again to resume")


def _hf(source: str, item: FileEntry, part: Path, quiet: bool) -> None:
    from huggingface_hub import hf_hub_download

    repo, _, revision = source[5:].partition("@")
    staging = part.with_name(part.name + ".hf")
    try:
        got = hf_hub_download(repo_id=repo, filename=item.path, revision=revision, local_dir=staging,
                              endpoint=os.environ.get("HF_ENDPOINT") or None)
    except Exception as err:  # noqa: BLE001 - huggingface_hub raises many kinds; say which file
        raise ConnectionError(f"hf://{repo}@{revision}/{item.path}: {type(err).__name__}: {err}") from err
    os.replace(got, part)
    shutil.rmtree(staging, ignore_errors=True)


def fetch_file(entry: ModelEntry, item: FileEntry, root: Path, force: bool = False, quiet: bool = False) -> Path:
    """Bring one file of ``entry`` into the cache, verified; returns its path.

    Raises ``ConnectionError`` (offline mode, network), ``FileNotFoundError`` (missing source
    file) or ``ManifestError`` when the fetched file does not match the manifest's size/SHA-256.
    """
    target = safe_target(root, f"{entry.release}/{item.path}", entry.manifest)
    if not force and _is_valid(target, item):
        return target
    if target.exists() and not force:
        warnings.warn(f"{target} does not match the SHA-256 of {entry.manifest}; fetching it again", stacklevel=2)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    if force and part.exists():
        part.unlink()
    remote = entry.source.startswith("hf://") or "://" in entry.source
    if remote and offline():
        raise ConnectionError(f"{entry.name}: {item.path} is not in the cache ({root}) and offline mode is on "
                              f"(HF_HUB_OFFLINE / {OFFLINE_ENV}); run `zoo download {entry.name}` while online")
    for attempt in range(2):
        if entry.source.startswith("hf://"):
            _hf(entry.source, item, part, quiet)
        elif remote:
            _http(entry.source + item.path, part, item, quiet)
        else:
            _copy(safe_target(Path(entry.source), item.path, entry.manifest), part, item, quiet)
        size, digest = part.stat().st_size, sha256_file(part)
        if size == item.size and digest == item.sha256:
            os.replace(part, target)
            return target
        part.unlink()
        if not remote or attempt:
            raise ManifestError(f"{entry.name}: {item.path} from {entry.source} has {size} bytes, SHA-256 "
                                f"{digest[:16]}…; the manifest {entry.manifest} says {item.size} bytes, "
                                f"{item.sha256[:16]}…; refusing it")
    raise AssertionError("unreachable")


def download(entry: ModelEntry, force: bool = False, quiet: bool = False, root: Path | None = None) -> Path:
    """Fetch every file of ``entry`` into the cache (verified); returns its checkpoint directory."""
    root = root or cache_root()
    for item in entry.files:
        fetch_file(entry, item, root, force=force, quiet=quiet)
    return model_dir(entry, root)
