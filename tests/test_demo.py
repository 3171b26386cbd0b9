"""`lookalike demo` (the end of scripts/run.sh): the stack comes up; Ctrl-C stops it all."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from tests.services import free_port, label_studio_available, redis_available

pytestmark = pytest.mark.e2e


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.skipif(
    not (label_studio_available() and redis_available()) and not os.environ.get("CI"),
    reason="needs redis-server and Label Studio (scripts/test.sh installs both)",
)
def test_demo_brings_the_stack_up_and_ctrl_c_stops_it(tmp_path: Path) -> None:
    ls_port, backend_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOOKALIKE_", "LABEL_STUDIO_"))}
    env["PYTHONUNBUFFERED"] = "1"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lookalike.cli",
            "demo",
            "--dir",
            str(tmp_path / "demo"),
            "--ls-port",
            str(ls_port),
            "--port",
            str(backend_port),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    output: list[str] = []
    try:
        deadline = time.monotonic() + 400
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            if "Press Ctrl-C to stop everything" in line or time.monotonic() > deadline:
                break
        text = "".join(output)
        assert "Ready." in text, text
        assert "EfficientNet-Lite0" in text  # says which model it chose, and why

        project_url = re.search(r"Label Studio\s+(\S+)\s+login (\S+) / (\S+)", text)
        assert project_url, text
        url, username, password = project_url.groups()
        assert url.startswith(f"http://127.0.0.1:{ls_port}/projects/")
        project = int(url.split("/projects/")[1].split("/")[0])

        # The printed login works, and the project is indexed and searchable.
        session = requests.Session()
        session.get(f"http://127.0.0.1:{ls_port}/user/login/", timeout=30)
        response = session.post(
            f"http://127.0.0.1:{ls_port}/user/login/",
            data={
                "email": username,
                "password": password,
                "csrfmiddlewaretoken": session.cookies.get("csrftoken"),
            },
            headers={"Referer": f"http://127.0.0.1:{ls_port}/user/login/"},
            timeout=30,
        )
        assert response.ok
        tasks = session.get(f"http://127.0.0.1:{ls_port}/api/projects/{project}", timeout=30)
        assert tasks.json()["task_number"] >= 30

        # The demo is secured like a real install: the search page and the API need the
        # Label Studio token it prints.
        backend = f"http://127.0.0.1:{backend_port}"
        token = re.search(r"sign in with your Label Studio token: (\S+)", text)
        assert token, text
        me = {"Authorization": f"Token {token.group(1)}"}
        status_url = f"{backend}/api/projects/{project}/index-status"
        assert requests.get(status_url, timeout=10).status_code == 401
        status = requests.get(status_url, headers=me, timeout=10).json()
        assert status["indexed"] == status["total"] >= 30 and status["failed"] == 0
        page = requests.get(f"{backend}/", timeout=10)  # the sign-in form until one signs in
        assert page.status_code == 401 and 'name="token"' in page.text
        hits = requests.post(
            f"{backend}/api/projects/{project}/similar",
            json={"task_id": 1, "k": 2},
            headers=me,
            timeout=60,
        ).json()["results"]
        assert hits[0]["score"] > 0.8  # every demo photo has near duplicates

        process.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert process.wait(timeout=90) == 0
        time.sleep(1)
        assert not port_open(ls_port) and not port_open(backend_port)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
