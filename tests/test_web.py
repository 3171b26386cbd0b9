"""The HTTP layer in process: Flask's test client, a real Redis, real FAISS, real RQ queues.

Label Studio is not needed for these routes (searching by a stored vector never calls it); the
routes that do call it are tested against the recorded fake in `test_web_label_studio.py`.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import redis
from flask.testing import FlaskClient
from tests.services import (
    drop_milvus_collections,
    free_port,
    redis_server,
)

from lookalike.config import Settings
from lookalike.service.runtime import Runtime
from lookalike.web.app import create_app

DIM = 8
PROJECT = 4


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(params=["embedded", "milvus"])
def rt(request: pytest.FixtureRequest, redis_url: str, tmp_path) -> Iterator[Runtime]:
    """Every test here runs with both vector engines: the same HTTP behaviour either way."""
    vector_db = request.getfixturevalue("milvus").uri if request.param == "milvus" else ""
    settings = Settings(redis_url=redis_url, data_dir=tmp_path, similar_k=3, vector_db=vector_db)
    runtime = Runtime(settings)
    runtime.redis.flushdb()
    yield runtime
    runtime.redis.flushdb()
    if vector_db:
        drop_milvus_collections(vector_db)


@pytest.fixture
def client(rt: Runtime) -> FlaskClient:
    return create_app(rt).test_client()


def unit(vectors: np.ndarray) -> np.ndarray:
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def indexed(rt: Runtime) -> np.ndarray:
    """Project 4: tasks 1-6 indexed with a 'fake/model' (vectors chosen by hand), 6 labeled."""
    data = unit(np.random.default_rng(0).standard_normal((6, DIM)))
    data[1] = unit((data[0] + 0.05 * data[1])[None])[0]  # task 2: a near copy of task 1
    state = rt.state(PROJECT)
    state.replace_tasks(range(1, 7), labeled=[6])
    state.meta.claim_model("fake/model", DIM)
    state.put_vectors(range(1, 7), data)
    return data


# ------------------------------------------------------------------ the ML-backend protocol
def test_health_and_versions(client: FlaskClient) -> None:
    health = client.get("/health")
    assert health.status_code == 200 and health.json["status"] == "UP"
    assert client.get("/versions").json == {"versions": ["lookalike"]}


def test_setup_starts_one_sync_per_project(client: FlaskClient, rt: Runtime) -> None:
    body = {"project": "12.1716200000", "schema": "<View/>", "hostname": "http://ls"}
    for _ in range(3):  # Label Studio calls /setup before every predict batch
        reply = client.post("/setup", json=body)
        assert reply.status_code == 200 and reply.json == {"model_version": "lookalike"}
    jobs = rt.jobs.queue.get_jobs()
    assert [(j.func_name.rsplit(".", 1)[-1], j.args) for j in jobs] == [
        ("sync_project", (12, False))
    ]


@pytest.mark.parametrize("body", [None, [], "text", {"project": "abc"}])
def test_setup_with_a_bad_body_is_a_400_json(client: FlaskClient, body) -> None:
    reply = client.post("/setup", json=body)
    assert reply.status_code == 400 and "error" in reply.json


def test_webhook_creates_index_jobs(client: FlaskClient, rt: Runtime) -> None:
    body = {
        "action": "TASKS_CREATED",
        "project": {"id": PROJECT},
        "tasks": [{"id": 1, "data": {"image": "x.jpg"}}],
    }
    reply = client.post("/webhook", json=body)
    assert reply.json == {"status": "ok", "action": "TASKS_CREATED", "enqueued": 1}
    assert rt.state(PROJECT).tasks.ids() == {1}


def test_predict_without_context_searches_nothing(client: FlaskClient, rt: Runtime) -> None:
    tasks = [{"id": 1, "data": {}}, {"id": 2, "data": {}}]
    reply = client.post("/predict", json={"tasks": tasks, "project": "4.1", "params": {}})
    assert reply.status_code == 200 and reply.json == {"results": [[], []]}
    assert rt.jobs.count == 0


def test_interactive_predict_explains_why_it_could_not_search(client: FlaskClient) -> None:
    region = {"type": "keypointlabels", "value": {"x": 1, "y": 1, "keypointlabels": ["x"]}}
    body = {
        "tasks": [{"id": 1, "data": {}}],
        "project": "77.1",
        "params": {"context": {"result": [region]}},
    }
    reply = client.post("/predict", json=body)
    assert reply.status_code == 200
    [result] = reply.json["results"]
    assert "not searchable yet" in result["message"]  # "no index yet" stays in the log
    assert result["result"] == []  # no label config sent: no status region


def test_interactive_predict_without_a_task_is_a_400(client: FlaskClient) -> None:
    body = {"tasks": [], "project": "4.1", "params": {"context": {"result": [{"type": "x"}]}}}
    reply = client.post("/predict", json=body)
    assert reply.status_code == 400 and "task" in reply.json["error"]


# ------------------------------------------------------------------ the REST API
def test_similar_by_task_finds_the_near_copy_and_skips_labeled_and_itself(
    client: FlaskClient, indexed: np.ndarray
) -> None:
    reply = client.post(f"/api/projects/{PROJECT}/similar", json={"task_id": 1, "k": 10})
    assert reply.status_code == 200
    results = reply.json["results"]
    ids = [r["task_id"] for r in results]
    assert ids[0] == 2 and 1 not in ids and 6 not in ids and sorted(ids) == [2, 3, 4, 5]
    expected = float(indexed[0] @ indexed[1])
    assert results[0]["score"] == pytest.approx(expected, abs=5e-3)  # vectors are stored in 8 bits
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)


def test_not_this_examples_move_the_query_and_are_never_results(
    client: FlaskClient, indexed: np.ndarray
) -> None:
    url = f"/api/projects/{PROJECT}/similar"
    plain = [r["task_id"] for r in client.post(url, json={"task_id": 1, "k": 10}).json["results"]]
    reply = client.post(url, json={"task_id": 1, "not_task_ids": [plain[0]], "k": 10}).json
    refined = [r["task_id"] for r in reply["results"]]
    assert plain[0] not in refined and 1 not in refined and set(refined) < set(plain)
    # "More like these": the mean of the examples is the query; the examples are excluded.
    both = client.post(url, json={"task_ids": [3, 4], "k": 10}).json["results"]
    expected = unit((indexed[2] + indexed[3])[None])[0]
    assert {r["task_id"] for r in both} == {1, 2, 5}
    best = max(both, key=lambda r: r["score"])
    assert best["score"] == pytest.approx(
        max(float(expected @ indexed[i - 1]) for i in (1, 2, 5)), abs=5e-3
    )


def test_similar_uses_the_default_k(client: FlaskClient, indexed: np.ndarray) -> None:
    reply = client.post(f"/api/projects/{PROJECT}/similar", json={"task_id": 1})
    assert len(reply.json["results"]) == 3  # LOOKALIKE_SIMILAR_K in this runtime


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({}, 400, "exactly one"),
        ({"task_id": 1, "k": 0}, 400, "k must be"),
        ({"task_id": 1, "k": True}, 400, "k must be"),
        ({"task_id": 1, "k": "5"}, 400, "k must be"),
        ({"url": "/etc/passwd"}, 400, "http(s)"),
        ({"image": "%%%"}, 400, "base64"),
        ({"task_id": 1, "task_ids": [2]}, 400, "exactly one"),
        ({"task_ids": "2"}, 400, "task_ids must be a list"),
        ({"task_id": 1, "not_task_ids": [True]}, 400, "not_task_ids must be a list"),
        ({"task_id": 1, "not_task_ids": [99]}, 400, "not indexed: [99]"),
    ],
)
def test_similar_refuses_bad_bodies_with_json(
    client: FlaskClient, indexed: np.ndarray, body: dict, status: int, fragment: str
) -> None:
    reply = client.post(f"/api/projects/{PROJECT}/similar", json=body)
    assert reply.status_code == status and fragment in reply.json["error"], reply.json


def test_a_project_lookalike_does_not_know_is_a_404(client: FlaskClient) -> None:
    for path, body in [("similar", {"task_id": 1}), ("queue", {}), ("reindex", {})]:
        reply = client.post(f"/api/projects/99/{path}", json=body)
        assert reply.status_code == 404 and "does not know project 99" in reply.json["error"]


def test_similar_in_a_known_project_with_no_index_yet_is_a_409(
    client: FlaskClient, rt: Runtime
) -> None:
    rt.state(98).replace_tasks([1, 2], labeled=[])  # connected, nothing indexed yet
    reply = client.post("/api/projects/98/similar", json={"task_id": 1})
    assert reply.status_code == 409 and "no index yet" in reply.json["error"]


def test_a_body_that_is_not_a_json_object_is_a_400(client: FlaskClient) -> None:
    reply = client.post(f"/api/projects/{PROJECT}/similar", data="task_id=1")
    assert reply.status_code == 400 and reply.json == {"error": "expected a JSON object body"}


def test_index_status_counts(client: FlaskClient, indexed: np.ndarray, rt: Runtime) -> None:
    rt.state(PROJECT).failures.record(5, "corrupt: broken", attempts=1, final=True)
    status = client.get(f"/api/projects/{PROJECT}/index-status").json
    assert (status["total"], status["indexed"], status["labeled"], status["failed"]) == (6, 6, 1, 1)
    assert status["model"] == "fake/model" and status["queued_jobs"] == 0
    assert status["failures"][0]["reason"] == "corrupt: broken"


def test_sync_and_reindex_enqueue_jobs(client: FlaskClient, rt: Runtime) -> None:
    sync = client.post(f"/api/projects/{PROJECT}/sync")  # also starts an unknown project
    rt.state(PROJECT).replace_tasks([1], labeled=[])  # known: it may be reindexed
    reindex = client.post(f"/api/projects/{PROJECT}/reindex")
    assert sync.status_code == reindex.status_code == 202
    jobs = {j.id: j for j in rt.jobs.queue.get_jobs()}
    assert jobs[sync.json["job_id"]].args == (PROJECT, True)  # a person asked: retry failures
    assert jobs[reindex.json["job_id"]].func_name.endswith(".reindex_project")


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"results": [{"task_id": 1, "score": 0.5}]}, "title"),
        ({"title": "t", "results": []}, "results must be"),
        ({"title": "t", "results": [{"task_id": "x", "score": 0.5}]}, "each result"),
        ({"title": "t", "results": [{"task_id": 1, "score": 7}]}, "not a similarity"),
        ({"title": "t", "results": [{"task_id": 99, "score": 0.5}]}, "not in project"),
    ],
)
def test_queue_refuses_bad_bodies_before_calling_label_studio(
    client: FlaskClient, indexed: np.ndarray, body: dict, fragment: str
) -> None:
    reply = client.post(f"/api/projects/{PROJECT}/queue", json=body)
    assert reply.status_code == 400 and fragment in reply.json["error"], reply.json


def test_thumbnail_size_is_checked(client: FlaskClient) -> None:
    reply = client.get(f"/api/projects/{PROJECT}/tasks/1/thumbnail?size=5000")
    assert reply.status_code == 400 and "size must be" in reply.json["error"]


def test_metrics_export_search_latency_and_project_sizes(
    client: FlaskClient, indexed: np.ndarray
) -> None:
    client.post(f"/api/projects/{PROJECT}/similar", json={"task_id": 1})
    text = client.get("/metrics").get_data(as_text=True)
    assert 'lookalike_search_seconds_count{source="api"} 1.0' in text
    assert f'lookalike_project_tasks{{project="{PROJECT}",state="indexed"}} 6.0' in text


# ------------------------------------------------------------------ errors, mapped once
def test_unknown_routes_and_methods_are_json(client: FlaskClient) -> None:
    missing = client.get("/nope")
    assert missing.status_code == 404 and "no such endpoint" in missing.json["error"]
    wrong = client.get("/setup")
    assert wrong.status_code == 405 and "not allowed" in wrong.json["error"]


def test_a_bug_is_a_500_without_details(rt: Runtime) -> None:
    app = create_app(rt)

    @app.get("/boom")
    def boom():
        raise KeyError("secret internals")

    reply = app.test_client().get("/boom")
    assert reply.status_code == 500 and "secret" not in reply.get_data(as_text=True)
    assert reply.json == {"error": "internal error; see the backend's log"}


def test_redis_down_is_a_503(tmp_path) -> None:
    settings = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", data_dir=tmp_path)
    client = create_app(Runtime(settings)).test_client()
    reply = client.get(f"/api/projects/{PROJECT}/index-status")
    assert reply.status_code == 503 and "Redis unavailable" in reply.json["error"]
    assert client.get("/health").status_code == 200  # Label Studio still sees us up


def test_the_runtime_is_the_only_source_of_settings(rt: Runtime, redis_url: str) -> None:
    """Nothing below the runtime reads the environment: a second app with other settings, in
    the same process, keeps to its own Redis database."""
    other = Runtime(Settings(redis_url=redis_url.rsplit("/", 1)[0] + "/3"))
    other.redis.flushdb()
    create_app(other).test_client().post(
        "/webhook", json={"action": "TASKS_CREATED", "project": {"id": 1}, "tasks": [{"id": 5}]}
    )
    assert other.state(1).tasks.ids() == {5} and rt.state(1).tasks.ids() == set()
    assert isinstance(other.redis, redis.Redis)


def test_searches_past_the_limit_are_turned_away_and_health_still_answers(
    rt: Runtime, indexed: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With every search slot taken, one more search gets 503 + Retry-After at once (it does
    not wait for a server thread), while /health, /setup and /webhook keep answering."""
    import threading

    from lookalike.errors import BusyError
    from lookalike.service.protocol import annotator_message
    from lookalike.service.similarity import SimilarityService

    rt.settings = Settings(**{**rt.settings.__dict__, "max_searches": 1})
    app = create_app(rt)
    inside, release = threading.Event(), threading.Event()
    real_find = SimilarityService._find

    def slow_find(self, *args, **kwargs):
        inside.set()
        release.wait(30)
        return real_find(self, *args, **kwargs)

    monkeypatch.setattr(SimilarityService, "_find", slow_find)
    url = f"/api/projects/{PROJECT}/similar"
    first: list = []
    worker = threading.Thread(
        target=lambda: first.append(app.test_client().post(url, json={"task_id": 1}))
    )
    worker.start()
    try:
        assert inside.wait(10)
        client = app.test_client()
        busy = client.post(url, json={"task_id": 1})
        assert busy.status_code == 503 and busy.headers["Retry-After"] == "2"
        assert "try again" in busy.json["error"]
        assert client.get("/health").status_code == 200
        # an annotator whose box query is turned away reads why, in plain words
        assert "busy" in annotator_message(BusyError("all slots taken"))
    finally:
        release.set()
        worker.join(30)
    assert first[0].status_code == 200
    assert app.test_client().post(url, json={"task_id": 1}).status_code == 200  # slot freed
