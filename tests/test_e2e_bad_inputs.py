"""The bad-input corpus through a real import: Label Studio 1.23 (uploads and URL tasks), a real
Redis, `lookalike serve` and a `lookalike worker`, and an image host on 127.0.0.1 that answers
404, stalls, drips, or sends nothing. Every bad input fails its own task with a reason a person
understands; the good but awkward ones (CMYK, 16-bit, GIF, a 48 MB PNG, an 81-megapixel JPEG)
are indexed; the worker stays alive and its peak memory bounded."""

from __future__ import annotations

import contextlib
import http.server
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from PIL import Image
from tests.services import (
    backend_env,
    free_port,
    label_studio_server,
    lookalike_process,
    redis_server,
    serving,
)
from tests.test_e2e_backend import connect, create_project, import_urls, upload, wait_for

from lookalike.core.weights import convert_efficientnet_lite0
from lookalike.service.state import ProjectState

pytestmark = [pytest.mark.e2e, pytest.mark.faults]
DOWNLOAD_TIMEOUT = 3  # seconds (LOOKALIKE_DOWNLOAD_TIMEOUT), so stalls fail quickly here


def encoded(image: Image.Image, kind: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind, **options)
    return buffer.getvalue()


def corpus() -> tuple[dict[str, bytes], dict[str, str]]:
    """Uploads: name -> bytes. And the expected reason of each bad one (None: indexed)."""
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).resize(
        (640, 480), Image.Resampling.BICUBIC
    )
    smooth = Image.linear_gradient("L").resize((10_400, 7_800)).convert("RGB")
    files = {
        "good.jpg": encoded(photo, "JPEG"),
        "cmyk.jpg": encoded(photo.convert("CMYK"), "JPEG"),
        "gray16.png": encoded(Image.fromarray((np.asarray(photo.convert("L")) * 250).astype(
            np.uint16)), "PNG"),
        "anim.gif": encoded(photo.convert("P"), "GIF"),
        "big48mb.png": encoded(Image.fromarray(rng.integers(
            0, 255, (4_000, 4_000, 3), dtype=np.uint8)), "PNG", compress_level=1),
        "huge81mpx.jpg": encoded(smooth, "JPEG", quality=70),
        "truncated.jpg": encoded(photo, "JPEG")[:2_000],
        "page.jpg": b"<!doctype html><html><body>Not found</body></html>",
        "drawing.svg": b'<svg xmlns="http://www.w3.org/2000/svg"><rect width="9"/></svg>',
        "notes.png": b"just some text, not a picture\n" * 20,
        "bomb.png": encoded(Image.new("1", (30_000, 30_000)), "PNG"),
        "over53mb.jpg": b"\xff\xd8\xff\xe0" + rng.bytes(53 * 1024 * 1024),
    }
    reasons = {
        "truncated.jpg": "corrupt",
        "page.jpg": "not_an_image",
        "drawing.svg": "not_an_image",
        "notes.png": "not_an_image",
        "bomb.png": "too_many_pixels",
        "over53mb.jpg": "too_large",
    }
    return files, reasons


class _Host(http.server.BaseHTTPRequestHandler):
    """/empty: 200 with no body; /stall: no answer for 4x the timeout; /drip: one byte a
    second; anything else: 404."""

    def do_GET(self) -> None:
        if self.path == "/empty":
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/stall":
            time.sleep(4 * DOWNLOAD_TIMEOUT)
            self.send_error(500)
        elif self.path == "/drip":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            with contextlib.suppress(OSError):
                for _ in range(4 * DOWNLOAD_TIMEOUT):
                    self.wfile.write(b"\xff")
                    self.wfile.flush()
                    time.sleep(1)
        else:
            self.send_error(404)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def image_host() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Host)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_the_bad_input_corpus_fails_each_bad_task_alone(tmp_path: Path) -> None:
    files, reasons = corpus()
    weights = convert_efficientnet_lite0(tmp_path / "efficientnet_lite0.pth")
    with (
        redis_server(tmp_path / "redis") as redis_url,
        label_studio_server(tmp_path / "ls") as ls,
        image_host() as host,
    ):
        env = backend_env(
            tmp_path, ls, redis_url, weights,
            LOOKALIKE_INDEX_BATCH="8", LOOKALIKE_DOWNLOAD_TIMEOUT=str(DOWNLOAD_TIMEOUT),
        )  # fmt: skip
        refused = f"http://127.0.0.1:{free_port()}/nobody-listens.jpg"
        urls = {
            f"{host}/missing.jpg": "http_error",
            f"{host}/empty": "empty",
            f"{host}/stall": "timeout",
            f"{host}/drip": "timeout",
            refused: "download_failed",
            "": "no_image",
        }
        with (
            serving(env, tmp_path / "serve.log") as url,
            lookalike_process(["worker"], env, tmp_path / "worker.log") as worker,
        ):
            project = create_project(ls, "bad inputs")
            upload(ls, project, files)
            import_urls(ls, project, list(urls))
            connect(ls, project, url, "lookalike")
            tasks = ls.request("GET", f"/api/tasks?project={project}&page_size=100").json()
            tasks = tasks["tasks"] if isinstance(tasks, dict) else tasks
            assert len(tasks) == len(files) + len(urls)
            state = ProjectState(redis.Redis.from_url(redis_url), project)

            def settled() -> bool:
                done = state.vectors.ids() | {f.task_id for f in state.failures.all()}
                return len(done) == len(tasks)

            wait_for(settled, 300, "every task indexed or failed")
            failures = {f.task_id: f for f in state.failures.all()}
            indexed = state.vectors.ids()
            table = []
            for task in tasks:
                source = task["data"]["image"]
                name = next((n for n in files if source.endswith(n)), source)
                expected = reasons.get(name) if name in files else urls[source]
                failure = failures.get(task["id"])
                got = failure.reason if failure else "indexed"
                table.append((name or '""', got))
                if expected is None:
                    assert task["id"] in indexed and failure is None, (name, got)
                else:
                    assert task["id"] not in indexed, name
                    assert got.startswith(f"{expected}: "), (name, got)
                    assert "task-files" not in got, got  # the task's URL, not a cache path
            assert worker.poll() is None, "the worker died"
            peak = peak_rss_mb(worker.pid)
    print(f"\nworker peak RSS {peak:.0f} MB")
    for name, got in table:
        print(f"  {name[:40]:40s} -> {got[:110]}")
    assert peak < 2_500, f"worker peak RSS {peak:.0f} MB"
