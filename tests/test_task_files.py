"""The task-file cache shared by workers: a download killed midway (a real process, SIGKILLed)
never leaves a truncated image where another process would take it for the whole file."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lookalike.core.images import ImageLimits, ImageLoadError, decode_image
from lookalike.service.task_files import PARTIAL_MAX_AGE, TRIM_SHARE, TaskFileCache, cache_name

URL = "http://127.0.0.1:8080/data/upload/1/photo.png"


@pytest.fixture
def photo_file(tmp_path: Path, photos) -> Path:
    buffer = io.BytesIO()
    photos["coffee"].save(buffer, "PNG")
    path = tmp_path / "photo.png"
    path.write_bytes(buffer.getvalue())
    return path


def test_a_download_killed_midway_leaves_no_truncated_file(tmp_path: Path, photo_file) -> None:
    cache = tmp_path / "cache"
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from lookalike.core.images import ImageLimits
        from lookalike.service.task_files import TaskFileCache

        def download(directory: Path) -> str:
            data = Path({str(photo_file)!r}).read_bytes()
            target = directory / "photo.png"
            with open(target, "wb") as handle:
                handle.write(data[: len(data) // 2])
                handle.flush()
                print("half", flush=True)
                time.sleep(60)  # killed here
            return str(target)

        TaskFileCache(Path({str(cache)!r}), 10**9).read({URL!r}, download, ImageLimits())
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "half"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert not (cache / cache_name(URL)).exists()
    (leftover,) = cache.iterdir()  # the dead process's private download directory
    assert leftover.name.startswith(".partial-") and any(leftover.iterdir())

    calls = []

    def download(directory: Path) -> str:
        calls.append(directory)
        return shutil.copy(photo_file, directory / "photo.png")

    fresh = TaskFileCache(cache, 10**9)
    raw = fresh.read(URL, download, ImageLimits())
    assert raw == photo_file.read_bytes() and len(calls) == 1
    decode_image(raw)  # whole, decodable
    assert fresh.read(URL, download, ImageLimits()) == raw and len(calls) == 1  # cached now
    assert leftover.exists()  # younger than PARTIAL_MAX_AGE: maybe still downloading
    old = time.time() - PARTIAL_MAX_AGE - 60
    os.utime(leftover, (old, old))
    fresh.trim(keep=cache / cache_name(URL))
    assert not leftover.exists()
    assert [p.name for p in cache.iterdir()] == [cache_name(URL)]


def test_a_local_file_is_read_in_place_and_never_moved(tmp_path: Path, photo_file) -> None:
    cache = TaskFileCache(tmp_path / "cache", 10**9)
    raw = cache.read("/data/local-files/?d=photo.png", lambda _: str(photo_file), ImageLimits())
    assert raw == photo_file.read_bytes() and photo_file.exists()


def test_a_failed_download_is_a_download_failure(tmp_path: Path) -> None:
    def download(directory: Path) -> str:
        raise ConnectionError("refused")

    with pytest.raises(ImageLoadError, match=r"cannot fetch .*refused") as info:
        TaskFileCache(tmp_path / "cache", 10**9).read(URL, download, ImageLimits())
    assert info.value.reason == "download_failed"
    assert not [p for p in (tmp_path / "cache").iterdir()]  # no download directory left


def test_cache_names_keep_the_extension_only_when_sane() -> None:
    assert cache_name(URL).endswith(".png")
    assert "." not in cache_name("http://x/data/file.p%20ng?x=1")
    assert cache_name(URL) != cache_name(URL + "?v=2")


def test_a_file_over_the_limit_names_its_url_and_is_not_kept(tmp_path: Path, photo_file) -> None:
    cache = TaskFileCache(tmp_path / "cache", 10**9)
    limits = ImageLimits(max_download_bytes=100)
    with pytest.raises(ImageLoadError, match="over the 100-byte limit") as info:
        cache.read(URL, lambda d: shutil.copy(photo_file, d / "photo.png"), limits)
    assert info.value.reason == "too_large" and URL in str(info.value)
    assert not list((tmp_path / "cache").iterdir())


def _download_bytes(size: int, tag: int):
    def download(directory: Path) -> Path:
        path = directory / f"{tag}.jpg"
        path.write_bytes(bytes([tag % 251]) * size)
        return path

    return download


def test_the_cache_stays_near_its_limit_least_recently_used_first(tmp_path: Path) -> None:
    cache_dir, limit, size = tmp_path / "cache", 64_000, 1_000
    cache = TaskFileCache(cache_dir, limit)
    url = "http://127.0.0.1:8080/data/upload/1/{}.jpg"
    peak = 0
    for tag in range(200):
        cache.read(url.format(tag), _download_bytes(size, tag), ImageLimits())
        if tag == 190:  # a file about to go, used again: it stays, its neighbour goes
            cache.read(url.format(130), _download_bytes(size, 130), ImageLimits())
        peak = max(peak, sum(f.stat().st_size for f in cache_dir.iterdir() if f.is_file()))
    assert limit < peak <= limit + limit // TRIM_SHARE + size  # trimmed now and then
    kept = {f.name for f in cache_dir.iterdir()}
    assert cache_name(url.format(199)) in kept and cache_name(url.format(130)) in kept
    assert cache_name(url.format(131)) not in kept and cache_name(url.format(0)) not in kept


def test_trimming_is_amortized_over_downloads(tmp_path: Path) -> None:
    trims = []

    class Counted(TaskFileCache):
        def trim(self, keep: Path) -> None:
            trims.append(keep)
            super().trim(keep)

    limit, size = 32_000, 100  # each trim is due after 1,000 bytes: every 10 downloads
    cache = Counted(tmp_path / "cache", limit)
    for tag in range(100):
        cache.read(f"http://127.0.0.1:8080/{tag}.jpg", _download_bytes(size, tag), ImageLimits())
    assert len(trims) == 10  # the first download, then one per 1,000 bytes added
