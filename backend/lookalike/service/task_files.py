"""Task images downloaded from Label Studio, cached on disk and shared by a machine's workers and
web process: a retried batch, a reindex and an interactive query on the same task don't fetch
the image again.

Every file enters the cache by an atomic rename from a private download directory, so a process
killed mid-download never leaves a truncated image under the cache's name for another process to
take for the whole file (that once failed a task for good as "corrupt"). The cache is kept under
a size limit, least recently used first. Trimming lists the whole directory (~24 ms at 3,000
files), so a process trims on its first download into a directory and then each time it has
added 1/TRIM_SHARE of the limit, not after every download; with P processes the cache can run
over its limit by at most P/TRIM_SHARE of it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from lookalike.core.images import ImageLimits, ImageLoadError, read_source

PARTIAL_PREFIX = ".partial-"
PARTIAL_MAX_AGE = 3600.0  # a download directory this old belongs to a process that died
TRIM_SHARE = 32

# Bytes this process added to each cache directory since it last trimmed it (none: never).
_added_since_trim: dict[Path, int] = {}
_added_lock = threading.Lock()


def cache_name(url: str) -> str:
    """The cache's file name for a URL: its hash, and its extension for the reader's sake."""
    suffix = Path(urllib.parse.urlsplit(url).path).suffix.lower()
    suffix = suffix if suffix[1:].isalnum() and len(suffix) <= 6 else ""
    return hashlib.sha256(url.encode()).hexdigest()[:32] + suffix


def _read(path: Path, url: str, limits: ImageLimits) -> bytes:
    try:
        return read_source(path, limits)
    except ImageLoadError as exc:  # name the task's URL, not a cache file the user never saw
        raise ImageLoadError(exc.reason, str(exc.args[0]).replace(str(path), url)) from exc


class TaskFileCache:
    def __init__(self, directory: Path, limit_bytes: int) -> None:
        self.directory, self.limit_bytes = Path(directory), int(limit_bytes)

    def read(
        self, url: str, download: Callable[[Path], str | os.PathLike[str]], limits: ImageLimits
    ) -> bytes:
        """The bytes behind `url`: from the cache, or `download(directory)` (which returns the
        path it wrote inside `directory`, or a path on local disk to read in place)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        cached = self.directory / cache_name(url)
        if cached.is_file():
            with contextlib.suppress(OSError):  # trimmed by another process meanwhile
                os.utime(cached)  # most recently used: the last to be trimmed
                return _read(cached, url, limits)
        partial = Path(tempfile.mkdtemp(prefix=PARTIAL_PREFIX, dir=self.directory))
        try:
            try:
                path = Path(download(partial))
            except ImageLoadError:
                raise
            except Exception as exc:  # the SDK raises many kinds (HTTP, FileNotFound, ...)
                raise ImageLoadError("download_failed", f"cannot fetch {url}: {exc}") from exc
            if not path.is_relative_to(partial):
                return _read(path, url, limits)  # a local file: read in place, never moved
            size = path.stat().st_size
            os.replace(path, cached)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        try:
            return _read(cached, url, limits)
        except ImageLoadError:
            cached.unlink(missing_ok=True)  # e.g. over the size limit: no use keeping it
            raise
        finally:
            if self._trim_due(size):
                self.trim(keep=cached)

    def _trim_due(self, added: int) -> bool:
        with _added_lock:
            since = _added_since_trim.get(self.directory)
            if since is not None and since + added < self.limit_bytes // TRIM_SHARE:
                _added_since_trim[self.directory] = since + added
                return False
            _added_since_trim[self.directory] = 0
            return True

    def trim(self, keep: Path) -> None:
        """Delete the least recently used files until the cache holds at most its limit
        (`keep`, the file just used, stays unless it alone is over the limit), and the download
        directories of processes that died."""
        try:
            entries = list(self.directory.iterdir())
            files = [(f.stat(), f) for f in entries if f.is_file()]
        except OSError:
            return
        now = time.time()
        for entry in entries:
            with contextlib.suppress(OSError):
                if entry.name.startswith(PARTIAL_PREFIX) and (
                    now - entry.stat().st_mtime > PARTIAL_MAX_AGE
                ):
                    shutil.rmtree(entry, ignore_errors=True)
        total = sum(stat.st_size for stat, _ in files)
        for stat, path in sorted(files, key=lambda item: item[0].st_mtime):
            if total <= self.limit_bytes:
                break
            if path == keep and stat.st_size <= self.limit_bytes:
                continue
            try:
                path.unlink()
                total -= stat.st_size
            except OSError:
                pass  # another process took it first
