"""Real services for the end-to-end tests: see `lookalike_dev.devstack`, plus a static file server.

from tests.services import label_studio_server, lookalike_process, redis_server
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lookalike_dev.devstack import (
    LabelStudioServer,
    MilvusServer,
    ServiceError,
    free_port,
    label_studio_available,
    label_studio_server,
    log_tail,
    lookalike_process,
    ls_executable,
    ls_venv,
    milvus_server,
    redis_available,
    redis_server,
    stop_process_group,
    wait_http,
)

__all__ = [
    "LabelStudioServer",
    "MilvusServer",
    "ServiceError",
    "backend_env",
    "free_port",
    "label_studio_available",
    "label_studio_server",
    "local_http_server",
    "log_tail",
    "lookalike_process",
    "ls_executable",
    "ls_venv",
    "milvus_server",
    "redis_available",
    "redis_server",
    "serving",
    "start_local_http_server",
    "stop_process_group",
    "wait_http",
]


# --------------------------------------------------------------------------------------------
# static files over HTTP


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def start_local_http_server(directory: str | os.PathLike[str]) -> tuple[str, Callable[[], None]]:
    """Serve ``directory`` on 127.0.0.1 from a background thread.

    Returns ``(base_url, stop)``; ``base_url`` has no trailing slash, so a file is at
    ``f"{base_url}/{relative_path}"``. ``stop()`` is idempotent.
    """
    handler = functools.partial(_QuietHandler, directory=str(Path(directory).resolve()))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="static-http", daemon=True)
    thread.start()
    stopped = threading.Event()

    def stop() -> None:
        if stopped.is_set():
            return
        stopped.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)

    return f"http://127.0.0.1:{server.server_address[1]}", stop


@contextlib.contextmanager
def local_http_server(directory: str | os.PathLike[str]) -> Iterator[str]:
    """Context-manager form of :func:`start_local_http_server`; yields the base URL."""
    url, stop = start_local_http_server(directory)
    try:
        yield url
    finally:
        stop()


# --------------------------------------------------------------------------------------------
# the backend under test


def backend_env(
    root: Path,
    ls: LabelStudioServer,
    redis_url: str,
    weights: str | os.PathLike[str] | None = None,
    **extra: str,
) -> dict[str, str]:
    """The environment of `lookalike serve` / `worker` against these services; with `weights`,
    EfficientNet-Lite0 with those real ImageNet weights. `extra`: more settings."""
    env = {
        "REDIS_URL": redis_url,
        "LABEL_STUDIO_URL": ls.url,
        "LABEL_STUDIO_API_KEY": ls.api_key,
        "LOOKALIKE_DATA_DIR": str(root / "data"),
    }
    if weights is not None:
        env |= {"LOOKALIKE_MODEL": "timm:efficientnet_lite0", "LOOKALIKE_WEIGHTS": str(weights)}
    return env | extra


@contextlib.contextmanager
def serving(
    env: dict[str, str], log_path: Path, timeout: float = 120, port: int | None = None
) -> Iterator[str]:
    """`lookalike serve` on 127.0.0.1 (a free port unless given), healthy; yields its URL."""
    port = port or free_port()
    argv = ["serve", "--host", "127.0.0.1", "--port", str(port)]
    with lookalike_process(argv, env, log_path) as serve:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health", timeout, proc=serve, log_path=log_path)
        yield url


def drop_milvus_collections(uri: str) -> None:
    """Forget every collection on a test's Milvus server (tests reuse project ids)."""
    from pymilvus import MilvusClient

    client = MilvusClient(uri=uri.replace("milvus://", "http://"))
    try:
        for name in client.list_collections():
            client.drop_collection(name)
    finally:
        client.close()
