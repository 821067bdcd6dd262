"""Download a registered dataset and verify every file against its sha256 manifest.

``fetch("Set12", root)`` puts each file of ``manifests/Set12.sha256`` at ``root/<local path>``,
downloading only what is missing or differs, through a temporary ``.part`` file that becomes
the real file once its sha256 matches. ``mirror`` replaces the source with a copy laid out like
a data root (``<mirror>/Set12/01.png``): a lab server, or a local ``http.server``.

Failures are named: :class:`OfflineError` at the first connection that fails (short timeout,
no retries), with the list of files to place by hand; :class:`ChecksumError` for a file whose
bytes differ from the manifest; :class:`FetchError` for everything else (no verified download
for the set, HTTP errors).
"""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from .datasets import file_sha256
from .registry import DatasetSpec, ManifestEntry, get

DEFAULT_TIMEOUT_S = 5.0  # per connection: an offline machine learns it at once


class FetchError(RuntimeError):
    """A dataset could not be fetched; the message says why and what to do."""


class OfflineError(FetchError):
    """The source cannot be reached; the message lists which files to place where."""


class ChecksumError(FetchError):
    """A downloaded file's sha256 differs from the manifest."""


@dataclass
class FetchReport:
    name: str
    root: Path
    downloaded: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)  # already there with the right sha256

    @property
    def files(self) -> int:
        return len(self.downloaded) + len(self.present)


def verify(name: str, root: str | os.PathLike) -> dict[str, list[str]]:
    """``{"ok", "missing", "mismatch"}``: local paths of the set's files under ``root`` (a
    registered re-encoding, e.g. McMaster's PNGs, stands in for a missing source file)."""
    spec = _downloadable(name, root)
    out: dict[str, list[str]] = {"ok": [], "missing": [], "mismatch": []}
    alternates = {str(Path(local).with_suffix("")): (local, sha) for local, sha in spec.alternates().items()}
    for entry in spec.manifest():
        local, sha = entry.local, entry.sha256
        if not (Path(root) / local).is_file() and str(Path(local).with_suffix("")) in alternates:
            local, sha = alternates[str(Path(local).with_suffix(""))]  # the same image, re-encoded
        path = Path(root) / local
        key = "missing" if not path.is_file() else "ok" if file_sha256(path) == sha else "mismatch"
        out[key].append(local)
    return out


def _downloadable(name: str, root: str | os.PathLike) -> DatasetSpec:
    spec = get(name)
    if not spec.downloadable:
        raise FetchError(f"{spec.name} has no verified public download. {spec.placement(root)}")
    return spec


def _url(spec: DatasetSpec, entry: ManifestEntry, mirror: str | None) -> str:
    return f"{mirror.rstrip('/')}/{entry.local}" if mirror else f"{spec.base_url}/{entry.remote}"


def download_verified(url: str, path: Path, sha256: str, *, timeout: float = DEFAULT_TIMEOUT_S,
                      placement: str = "") -> None:
    """Download ``url`` to ``path`` through ``path.part``; keep it only if its sha256 is ``sha256``.

    Raises :class:`OfflineError` (with ``placement`` appended) when the host cannot be reached,
    :class:`FetchError` for an HTTP error, :class:`ChecksumError` for different bytes.
    """
    part = path.with_name(path.name + ".part")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, part.open("wb") as out:  # noqa: S310
            while block := response.read(1 << 16):
                out.write(block)
    except urllib.error.HTTPError as err:
        part.unlink(missing_ok=True)
        raise FetchError(f"{url} answered HTTP {err.code} ({err.reason})") from err
    except (urllib.error.URLError, socket.timeout, ConnectionError, OSError) as err:
        part.unlink(missing_ok=True)
        raise OfflineError(f"cannot reach {url} ({getattr(err, 'reason', err)}); nothing more was downloaded.\n"
                           f"{placement}") from err
    got = file_sha256(part)
    if got != sha256:
        part.unlink()
        raise ChecksumError(f"{url} -> {path} has sha256 {got}, the manifest says {sha256} "
                            "(corrupted or changed at the source); the file was not kept")
    part.replace(path)


def fetch(name: str, root: str | os.PathLike, *, mirror: str | None = None, timeout: float = DEFAULT_TIMEOUT_S,
          progress: bool = True) -> FetchReport:
    """Download the missing or differing files of ``name`` under ``root`` and verify them all."""
    spec = _downloadable(name, root)
    root = Path(root)
    report = FetchReport(spec.name, root)
    todo = []
    for entry in spec.manifest():
        path = root / entry.local
        if path.is_file() and file_sha256(path) == entry.sha256:
            report.present.append(entry.local)
        else:
            todo.append(entry)
    bar = tqdm(todo, desc=f"{spec.name} ({len(report.present)} present)", unit="file", disable=not progress or not todo)
    for entry in bar:
        download_verified(_url(spec, entry, mirror), root / entry.local, entry.sha256, timeout=timeout,
                          placement=spec.placement(root))
        report.downloaded.append(entry.local)
    return report
