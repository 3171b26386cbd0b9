"""Self-test of tests/services.py: real Redis, real Label Studio, static HTTP server."""

from __future__ import annotations

import os
import time
import urllib.request

import pytest
from PIL import Image
from tests.services import (
    label_studio_available,
    label_studio_server,
    local_http_server,
    lookalike_process,
    redis_available,
    redis_server,
    start_local_http_server,
    wait_http,
)

LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<Choices name="c" toName="image"><Choice value="a"/></Choices></View>'
)


def _require(available: bool, what: str) -> None:
    """Skip on a dev machine without the service; fail in CI, where scripts/test.sh installs it."""
    if not available:
        if os.environ.get("CI"):
            pytest.fail(f"{what} is missing; scripts/test.sh should have installed it")
        pytest.skip(f"{what} is not installed (run scripts/test.sh)")


def _write_images(directory, count=2):
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        name = f"img{i}.png"
        Image.new("RGB", (8, 8), (40 * i, 100, 200)).save(directory / name)
        names.append(name)
    return names


def test_local_http_server_serves_files(tmp_path):
    names = _write_images(tmp_path / "imgs")
    url, stop = start_local_http_server(tmp_path / "imgs")
    try:
        with urllib.request.urlopen(f"{url}/{names[0]}", timeout=5) as response:
            assert response.status == 200
            assert response.read() == (tmp_path / "imgs" / names[0]).read_bytes()
    finally:
        stop()
    stop()  # idempotent
    with local_http_server(tmp_path / "imgs") as url2:
        assert wait_http(f"{url2}/{names[1]}", 5) == 200


def test_redis_server_roundtrip(tmp_path):
    _require(redis_available(), "redis-server")
    import redis

    with redis_server(tmp_path / "redis") as url:
        assert url.startswith("redis://127.0.0.1:") and url.endswith("/0")
        conn = redis.Redis.from_url(url)
        conn.set("lookalike:test", b"value")
        assert conn.get("lookalike:test") == b"value"
        conn.close()
    # stopped afterwards
    with pytest.raises(redis.exceptions.ConnectionError):
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()


def test_lookalike_process_is_stopped(tmp_path):
    log = tmp_path / "cli.log"
    with lookalike_process(["--help"], {"LOOKALIKE_TEST_MARKER": "1"}, log) as proc:
        proc.wait(timeout=60)
    assert proc.returncode == 0, log.read_text()
    assert "lookalike" in log.read_text()


@pytest.mark.e2e
def test_label_studio_server(tmp_path):
    _require(label_studio_available(), "Label Studio (LOOKALIKE_LS_VENV)")
    names = _write_images(tmp_path / "imgs")
    started = time.monotonic()
    with (
        local_http_server(tmp_path / "imgs") as images_url,
        label_studio_server(tmp_path / "ls", document_root=tmp_path / "imgs") as ls,
    ):
        print(f"Label Studio ready in {time.monotonic() - started:.1f} s at {ls.url}")
        assert len(ls.api_key) == 40
        int(ls.api_key, 16)

        # raw API with the legacy token
        response = ls.request("GET", "/api/projects/")
        assert response.status_code == 200, response.text
        assert (
            ls.request("GET", "/api/projects/", headers={"Authorization": "Token x"}).status_code
            == 401
        )

        # SDK
        client = ls.client()
        project = client.projects.create(title="services self-test", label_config=LABEL_CONFIG)
        client.projects.import_tasks(
            id=project.id,
            request=[{"data": {"image": f"{images_url}/{name}"}} for name in names],
        )
        tasks = list(client.tasks.list(project=project.id))
        assert sorted(task.data["image"] for task in tasks) == sorted(
            f"{images_url}/{name}" for name in names
        )
        # a raw listing agrees
        listed = ls.request("GET", f"/api/tasks/?project={project.id}").json()
        assert listed["total"] == 2
    # stopped afterwards
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{ls.url}/health", timeout=2)
