"""Faults with real processes: Label Studio 1.23, Redis, `lookalike serve` and `lookalike
worker` subprocesses. A worker SIGKILLed in the middle of a batch: its tasks are indexed by a
replacement worker within about two minutes, by themselves, exactly once.

A Redis restart (append-only file) in the middle of indexing: the worker and the web process
ride it out. (The Label Studio outage is exercised in process against the recorded fake, see
tests/test_web_label_studio.py.)
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import redis
import requests
from PIL import Image
from rq import Queue
from tests.services import (
    LabelStudioServer,
    backend_env,
    free_port,
    label_studio_server,
    lookalike_process,
    milvus_server,
    redis_server,
    serving,
)
from tests.test_e2e_backend import connect, create_project, upload, wait_for

from lookalike.core.weights import convert_efficientnet_lite0
from lookalike.service.state import ProjectState
from lookalike_dev.devstack import wait_http

pytestmark = [pytest.mark.e2e, pytest.mark.faults]
TASKS = 48


@dataclass
class Stack:
    ls: LabelStudioServer
    url: str
    redis_url: str
    env: dict[str, str]
    root: Path

    def status(self, project: int) -> dict:
        url = f"{self.url}/api/projects/{project}/index-status"
        return requests.get(url, timeout=10).json()


def generated_photos(count: int, seed: int) -> dict[str, bytes]:
    """Large, distinct PNGs (no draft decoding for PNG): each batch takes a few seconds."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(count):
        base = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((1600, 1200), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        out[f"gen_{seed}_{i:03d}.png"] = buffer.getvalue()
    return out


def index_batch_running(connection: redis.Redis) -> bool:
    queue = Queue("lookalike", connection=connection)
    for entry in queue.started_job_registry.get_job_ids():
        job = queue.fetch_job(entry.split(":")[0])
        if job is not None and job.func_name.endswith("index_tasks"):
            return True
    return False


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("faults")
    weights = convert_efficientnet_lite0(root / "efficientnet_lite0.pth")
    with redis_server(root / "redis") as redis_url, label_studio_server(root / "ls") as ls:
        env = backend_env(root, ls, redis_url, weights, LOOKALIKE_INDEX_BATCH="16")
        with serving(env, root / "serve.log") as url:
            yield Stack(ls, url, redis_url, env, root)


def test_a_worker_killed_mid_batch_loses_nothing(stack: Stack) -> None:
    project = create_project(stack.ls, "worker kill")
    upload(stack.ls, project, generated_photos(TASKS, seed=1))
    connection = redis.Redis.from_url(stack.redis_url)
    with lookalike_process(["worker"], stack.env, stack.root / "doomed.log") as doomed:
        connect(stack.ls, project, stack.url, "lookalike")
        # Kill it the moment it is inside an index batch (not the sync that queues them).
        wait_for(lambda: index_batch_running(connection), 120, "a running index batch")
        os.killpg(doomed.pid, signal.SIGKILL)
        killed_at = time.monotonic()
    before = stack.status(project)["indexed"]
    assert before < TASKS, "the batch finished before the kill: nothing was tested"
    with lookalike_process(["worker"], stack.env, stack.root / "replacement.log"):
        wait_for(lambda: stack.status(project)["indexed"] == TASKS or None, 180, "recovery")
        recovery = time.monotonic() - killed_at
        status = stack.status(project)
        assert (status["indexed"], status["failed"], status["pending"]) == (TASKS, 0, 0), status
        stored = ProjectState(connection, project).vectors
        assert stored.count() == len(stored.ids()) == TASKS  # exactly once

        # The dead worker no longer counts (its registration lapsed): only the replacement.
        def one_worker() -> bool:
            return requests.get(f"{stack.url}/api/jobs", timeout=10).json()["workers"] == 1

        wait_for(one_worker, 120, "the dead worker to leave")
    print(f"worker SIGKILL mid-batch: all {TASKS} tasks indexed {recovery:.0f} s after the kill")
    assert recovery < 150


class RestartableRedis:
    """redis-server with an append-only file on a fixed port and directory, so it can be shut
    down and started again as a real deployment's Redis would be."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        argv = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port),
                "--appendonly", "yes", "--save", "", "--dir", str(self.root)]  # fmt: skip
        log = open(self.root / "redis.log", "ab")  # noqa: SIM115 (the process owns it)
        self.proc = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)
        wait_for(lambda: self._ping(), 20, "redis-server")

    def stop(self) -> None:
        """SHUTDOWN: the append-only file is flushed, then the server exits."""
        with contextlib.suppress(redis.ConnectionError):  # it answers by hanging up
            redis.Redis.from_url(self.url).shutdown()
        assert self.proc is not None
        self.proc.wait(timeout=30)

    def _ping(self) -> bool:
        try:
            return bool(redis.Redis.from_url(self.url, socket_timeout=1).ping())
        except redis.RedisError:
            return False


def test_a_redis_restart_mid_indexing_needs_no_hand(stack: Stack, tmp_path: Path) -> None:
    """Redis shut down for 10 s while a worker indexes: the worker rides it out, the web
    process answers 503 meanwhile and recovers, every task ends up indexed exactly once."""
    store = RestartableRedis(tmp_path)
    store.start()
    env = {**stack.env, "REDIS_URL": store.url}
    admin = {"Authorization": f"Token {stack.ls.api_key}"}
    try:
        with (
            serving(env, tmp_path / "serve.log") as url,
            lookalike_process(["worker"], env, tmp_path / "worker.log") as worker,
        ):
            project = create_project(stack.ls, "redis restart")
            upload(stack.ls, project, generated_photos(TASKS, seed=2))
            connect(stack.ls, project, url, "lookalike")
            status_url = f"{url}/api/projects/{project}/index-status"
            connection = redis.Redis.from_url(store.url)
            wait_for(lambda: index_batch_running(connection), 120, "a running index batch")
            store.stop()
            down_at = time.monotonic()
            reply = requests.get(status_url, headers=admin, timeout=30)
            assert reply.status_code == 503 and "Redis" in reply.json()["error"]
            time.sleep(10)
            store.start()

            def indexed() -> bool:
                reply = requests.get(status_url, headers=admin, timeout=30)
                return reply.status_code == 200 and reply.json()["indexed"] == TASKS

            wait_for(indexed, 240, "indexing after the Redis restart")
            recovery = time.monotonic() - down_at
            assert worker.poll() is None, "the worker exited"
            status = requests.get(status_url, headers=admin, timeout=30).json()
            assert (status["failed"], status["pending"]) == (0, 0), status
            stored = ProjectState(connection, project).vectors
            assert stored.count() == len(stored.ids()) == TASKS
            print(f"Redis down 10 s mid-indexing: all {TASKS} tasks indexed {recovery:.0f} s later")
    finally:
        if store.proc is not None and store.proc.poll() is None:
            store.proc.terminate()
            store.proc.wait(timeout=30)


def all_indexed(url: str, project: int, expected: int) -> bool:
    try:
        reply = requests.get(f"{url}/api/projects/{project}/index-status", timeout=30)
    except requests.RequestException:
        return False
    return reply.status_code == 200 and reply.json()["indexed"] == expected


def test_label_studio_stopped_and_restarted_mid_indexing(tmp_path: Path) -> None:
    """Label Studio (a real process) stopped for 30 s while a worker downloads its images, then
    started again on the same port and database: downloads that got no answer are retried on
    the outage schedule, none becomes a final failure, every task is indexed exactly once."""
    weights = convert_efficientnet_lite0(tmp_path / "efficientnet_lite0.pth")
    port, token, password = free_port(), secrets.token_hex(20), secrets.token_urlsafe(16)

    def label_studio() -> contextlib.AbstractContextManager[LabelStudioServer]:
        return label_studio_server(tmp_path / "ls", port=port, token=token, password=password)

    with contextlib.ExitStack() as running, redis_server(tmp_path / "redis") as redis_url:
        ls_running = contextlib.ExitStack()
        running.callback(ls_running.close)
        ls = ls_running.enter_context(label_studio())
        env = backend_env(tmp_path, ls, redis_url, weights, LOOKALIKE_INDEX_BATCH="16")
        url = running.enter_context(serving(env, tmp_path / "serve.log"))
        worker = running.enter_context(
            lookalike_process(["worker"], env, tmp_path / "worker.log")
        )
        project = create_project(ls, "label studio outage")
        upload(ls, project, generated_photos(TASKS, seed=3))
        connect(ls, project, url, "lookalike")
        connection = redis.Redis.from_url(redis_url)
        wait_for(lambda: index_batch_running(connection), 120, "a running index batch")
        ls_running.close()  # stopped: its process group is gone, the port closed
        down_at = time.monotonic()
        time.sleep(30)
        ls_running.enter_context(label_studio())
        back_at = time.monotonic()
        wait_for(lambda: all_indexed(url, project, TASKS), 300, "indexing after the outage")
        recovery = time.monotonic() - back_at
        assert worker.poll() is None, "the worker exited"
        status = requests.get(f"{url}/api/projects/{project}/index-status", timeout=30).json()
        assert (status["failed"], status["pending"]) == (0, 0), status
        state = ProjectState(connection, project)
        assert state.vectors.count() == len(state.vectors.ids()) == TASKS  # exactly once
        assert not [f for f in state.failures.all() if f.final]
        print(
            f"Label Studio down {back_at - down_at:.0f} s mid-indexing: all {TASKS} tasks "
            f"indexed {recovery:.0f} s after it was back"
        )


def test_the_web_process_restarted_mid_indexing(stack: Stack, tmp_path: Path) -> None:
    """`lookalike serve` SIGKILLed while workers index and while Label Studio sends webhooks:
    a new one on the same port answers searches at once, indexing went on meanwhile, and a
    person's sync picks up the tasks whose webhooks nobody received."""
    port = free_port()
    env = {**stack.env, "LOOKALIKE_DATA_DIR": str(tmp_path / "data")}
    argv = ["serve", "--host", "127.0.0.1", "--port", str(port)]
    with lookalike_process(["worker"], env, tmp_path / "worker.log"):
        with lookalike_process(argv, env, tmp_path / "serve-1.log") as doomed:
            url = f"http://127.0.0.1:{port}"
            wait_http(f"{url}/health", 120, proc=doomed, log_path=tmp_path / "serve-1.log")
            project = create_project(stack.ls, "web restart")
            upload(stack.ls, project, generated_photos(TASKS, seed=4))
            connect(stack.ls, project, url, "lookalike")
            connection = redis.Redis.from_url(stack.redis_url)
            wait_for(lambda: index_batch_running(connection), 120, "a running index batch")
            os.killpg(doomed.pid, signal.SIGKILL)
        # While no web process runs: Label Studio's webhooks for these tasks go nowhere.
        upload(stack.ls, project, generated_photos(4, seed=5))
        with serving(env, tmp_path / "serve-2.log", port=port) as url:
            similar = f"{url}/api/projects/{project}/similar"
            known = ProjectState(connection, project).vectors.ids()
            reply = requests.post(similar, json={"task_id": min(known), "k": 5}, timeout=60)
            assert reply.status_code == 200, reply.text
            assert len(reply.json()["results"]) == 5
            wait_for(lambda: all_indexed(url, project, TASKS), 240, "the first 48 tasks")
            reply = requests.post(f"{url}/api/projects/{project}/sync", timeout=30)
            assert reply.status_code in (200, 202), reply.text
            wait_for(lambda: all_indexed(url, project, TASKS + 4), 240, "the synced tasks")
            state = ProjectState(connection, project)
            assert state.vectors.count() == len(state.vectors.ids()) == TASKS + 4
            status = requests.get(f"{url}/api/projects/{project}/index-status", timeout=30)
            assert (status.json()["failed"], status.json()["pending"]) == (0, 0)


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(stat.parent.name))
    return found


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_killed_worker_leaves_no_scheduler_behind(stack: Stack, tmp_path: Path) -> None:
    """RQ runs its scheduler in a child of the worker; the worker alone SIGKILLed (not its
    process group): the child goes too instead of living on as an orphan."""
    with redis_server(tmp_path / "redis") as redis_url:
        env = {**stack.env, "REDIS_URL": redis_url}
        with lookalike_process(["worker"], env, tmp_path / "worker.log") as worker:
            scheduler = wait_for(lambda: children_of(worker.pid), 60, "the scheduler process")
            os.kill(worker.pid, signal.SIGKILL)
            worker.wait(timeout=30)
            wait_for(lambda: not any(running(p) for p in scheduler), 30, "the scheduler to go")


def test_milvus_stopped_and_restarted_mid_indexing(stack: Stack, tmp_path: Path) -> None:
    """Milvus (a `milvus-lite server`) as the vector engine, stopped for 10 s while a worker
    indexes: index-status and searches say why instead of failing, index batches wait for it,
    and every task ends up indexed exactly once after it is back, with no hand on anything."""
    with milvus_server(tmp_path / "milvus") as milvus:
        env = {**stack.env, "LOOKALIKE_VECTOR_DB": milvus.uri,
               "LOOKALIKE_DATA_DIR": str(tmp_path / "data")}
        with (
            serving(env, tmp_path / "serve.log") as url,
            lookalike_process(["worker"], env, tmp_path / "worker.log") as worker,
        ):
            project = create_project(stack.ls, "milvus restart")
            upload(stack.ls, project, generated_photos(TASKS, seed=6))
            connect(stack.ls, project, url, "lookalike")
            connection = redis.Redis.from_url(stack.redis_url)
            status_url = f"{url}/api/projects/{project}/index-status"
            wait_for(lambda: index_batch_running(connection), 120, "a running index batch")
            milvus.stop()
            down_at = time.monotonic()
            reply = requests.get(status_url, timeout=30)
            assert reply.status_code == 200, reply.text
            assert reply.json()["indexed"] is None and "unreachable" in reply.json()["error"]
            reply = requests.post(f"{url}/api/projects/{project}/similar",
                                  json={"task_id": 1}, timeout=60)
            assert reply.status_code == 503 and "unreachable" in reply.json()["error"]
            time.sleep(10)
            milvus.start()
            wait_for(lambda: all_indexed(url, project, TASKS), 300, "indexing after Milvus")
            recovery = time.monotonic() - down_at
            assert worker.poll() is None, "the worker exited"
            status = requests.get(status_url, timeout=30).json()
            assert (status["failed"], status["pending"], status["error"]) == (0, 0, None), status
            vectors = ProjectState(connection, project, _engine(env)).vectors
            assert vectors.count() == len(vectors.ids()) == TASKS  # exactly once
            hits = requests.post(f"{url}/api/projects/{project}/similar",
                                 json={"task_id": min(vectors.ids()), "k": 5}, timeout=60)
            assert hits.status_code == 200 and len(hits.json()["results"]) == 5
    print(f"Milvus down 10 s mid-indexing: all {TASKS} tasks indexed {recovery:.0f} s later")


def _engine(env: dict[str, str]):
    from lookalike.config import Settings
    from lookalike.service.vector_db import VectorDB

    return VectorDB.from_settings(Settings.from_env(env))
