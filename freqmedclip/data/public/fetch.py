"""The lock file of the public data and getting its files: from a local mirror, a cache, or GitHub.

``python -m freqmedclip.data.public.fetch --manifest MANIFEST.tsv [--lock freqmedclip/data/public/lock.tsv]``
regenerates the lock file from a mirror's manifest (columns domain, repo, commit, path, bytes, sha256).

The lock file (``lock.tsv``, kept in the repository) pins every file: ``repo, commit, path, bytes, sha256,
domain``. A file is fetched from ``https://raw.githubusercontent.com/<repo>/<commit>/<path>`` and lives,
in a mirror or in the download cache alike, at ``<owner>+<name>/<path>``.

Notable choices:
- Downloads go to a temp file in the cache folder and are moved into place only once their size and
  sha256 match the lock, so an interrupted download never leaves a half-written or wrong file under its
  final name; a rerun downloads only what is not yet in the cache.
- The first download is tried alone: when it fails for lack of network (not an HTTP error), the whole
  run stops with one message (:class:`NoNetwork`) instead of one failure per file.
- A cached file that no longer matches the lock is downloaded again. Checksums are checked once more by
  the conversion workers, right before decoding, so a mirror file that changed is caught and named.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import http.client
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from freqmedclip.data.converters.runner import CaseError, atomic_write

LOCK = Path(__file__).with_name("lock.tsv")
LOCK_COLUMNS = ("repo", "commit", "path", "bytes", "sha256", "domain")
URL = "https://raw.githubusercontent.com/{repo}/{commit}/{path}"
TIMEOUT_S = 60


@dataclass(frozen=True)
class LockedFile:
    """One pinned file of the lock."""

    repo: str  # owner/name
    commit: str
    path: str  # inside the repo
    bytes: int
    sha256: str
    domain: str

    @property
    def key(self) -> str:
        """Location inside a mirror or the cache: ``<owner>+<name>/<path>``."""
        return f"{self.repo.replace('/', '+')}/{self.path}"

    @property
    def url(self) -> str:
        return URL.format(repo=self.repo, commit=self.commit, path=self.path)


class NoNetwork(Exception):
    """Files have to be downloaded and the network cannot be reached."""


def read_lock(path: Path = LOCK) -> list[LockedFile]:
    """Rows of a lock file (tab separated, header ``repo commit path bytes sha256 domain``)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        if tuple(reader.fieldnames or ()) != LOCK_COLUMNS:
            raise ValueError(f"{path}: columns {reader.fieldnames}, expected {list(LOCK_COLUMNS)}")
        return [
            LockedFile(r["repo"], r["commit"], r["path"], int(r["bytes"]), r["sha256"].lower(), r["domain"])
            for r in reader
        ]


def write_lock(entries: Sequence[LockedFile], path: Path = LOCK) -> None:
    """Write ``entries`` as a lock file, sorted by domain then location (stable diffs)."""
    rows = sorted(entries, key=lambda e: (e.domain, e.key))
    text = "\t".join(LOCK_COLUMNS) + "\n"
    text += "".join(f"{e.repo}\t{e.commit}\t{e.path}\t{e.bytes}\t{e.sha256}\t{e.domain}\n" for e in rows)
    atomic_write(Path(path), text.encode())


def lock_from_manifest(manifest: Path) -> list[LockedFile]:
    """Lock entries from a mirror's MANIFEST.tsv (columns domain, repo, commit, path, bytes, sha256)."""
    with open(manifest, newline="", encoding="utf-8") as f:
        return [
            LockedFile(r["repo"], r["commit"], r["path"], int(r["bytes"]), r["sha256"].lower(), r["domain"])
            for r in csv.DictReader(f, delimiter="\t")
        ]


def check_bytes(data: bytes, entry: LockedFile, where: Path | str) -> None:
    """Raise CaseError naming ``where`` when ``data`` is not the pinned file (size, then sha256)."""
    if len(data) != entry.bytes:
        raise CaseError(f"{where}: {len(data)} bytes, the lock pins {entry.bytes} (truncated or wrong file)")
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry.sha256:
        raise CaseError(f"{where}: sha256 {digest[:12]}... differs from the lock's {entry.sha256[:12]}...")


def read_verified(path: Path | str, entry: LockedFile) -> bytes:
    """The bytes of a pinned file at ``path``, checked against the lock; CaseError naming the file otherwise."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as e:
        raise CaseError(f"{path}: missing file (pinned as {entry.repo}@{entry.commit[:7]}/{entry.path})") from e
    except OSError as e:
        raise CaseError(f"{path}: cannot read ({e.strerror})") from e
    check_bytes(data, entry, path)
    return data


def _download(entry: LockedFile, cache: Path, first: bool = False) -> str | None:
    """Download one file into the cache (atomic, verified). Returns None or the reason it failed.

    Raises NoNetwork when the ``first`` download cannot reach the host at all; later ones (the network worked)
    report a timeout, reset or short read as that file's failure, after one retry."""
    target = cache / entry.key
    for attempt in range(2):
        try:
            with urllib.request.urlopen(entry.url, timeout=TIMEOUT_S) as response:
                data = response.read()
            break
        except urllib.error.HTTPError as e:
            return f"{entry.url}: HTTP {e.code} {e.reason}"
        except (OSError, http.client.HTTPException) as e:  # URLError is an OSError: DNS, refused, timeout, reset
            if first and isinstance(e, OSError):
                raise NoNetwork(str(getattr(e, "reason", e))) from e
            if attempt:
                return f"{entry.url}: {getattr(e, 'reason', e)}"
    try:
        check_bytes(data, entry, entry.url)
    except CaseError as e:
        return str(e)
    atomic_write(target, data)
    return None


def _cached(path: Path, entry: LockedFile) -> bool:
    try:
        read_verified(path, entry)
        return True
    except CaseError:
        return False


def fetch(entries: Sequence[LockedFile], cache: Path, threads: int = 8) -> dict[str, str]:
    """Download the files of ``entries`` not yet in ``cache`` (or there but changed); returns {file key: reason}
    for failures."""
    cache = Path(cache)
    todo = [e for e in entries if not _cached(cache / e.key, e)]
    failures: dict[str, str] = {}
    if not todo:
        return failures
    first = _download(todo[0], cache, first=True)  # alone: a machine without network fails here, once
    if first:
        failures[todo[0].key] = first
    with ThreadPoolExecutor(threads) as pool, tqdm(total=len(todo), initial=1, desc="download", unit="file") as bar:
        for entry, reason in zip(todo[1:], pool.map(lambda e: _download(e, cache), todo[1:])):
            if reason:
                failures[entry.key] = reason
            bar.update(1)
    return failures


def no_network_message(reason: str, entries: Sequence[LockedFile]) -> str:
    """The one message shown when files must be downloaded and there is no network."""
    pins = sorted({(e.repo, e.commit) for e in entries})
    lines = [
        f"Cannot download the public data: no network ({reason}).",
        "Either pass --mirror DIR, a folder holding the files as <owner>+<repo>/<path> (e.g. a copy of a",
        "public-data mirror), or download them on a machine with internet from",
        "  https://raw.githubusercontent.com/<owner>/<repo>/<commit>/<path>",
        f"for every row of {LOCK} ({len(entries)} files), from:",
    ]
    lines += [f"  https://github.com/{repo}/tree/{commit}" for repo, commit in pins]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m freqmedclip.data.public.fetch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", type=Path, required=True, help="MANIFEST.tsv of a public-data mirror")
    parser.add_argument("--lock", type=Path, default=LOCK, help="lock file to write")
    args = parser.parse_args(argv)
    entries = lock_from_manifest(args.manifest)
    write_lock(entries, args.lock)
    print(f"wrote {len(entries)} pinned files to {args.lock}")


if __name__ == "__main__":
    main(sys.argv[1:])
