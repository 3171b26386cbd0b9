"""Webhook events become jobs and cheap Redis writes (real Redis, real RQ queue; no worker)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from rq.job import Job
from tests.services import redis_server

from lookalike.config import Settings
from lookalike.service.events import handle_webhook
from lookalike.service.runtime import Runtime
from lookalike.timeouts import LABEL_STUDIO_OUTAGE_RETRY_DELAYS


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture
def rt(redis_url: str) -> Iterator[Runtime]:
    runtime = Runtime(Settings(redis_url=redis_url, index_batch_size=2))
    runtime.redis.flushdb()
    yield runtime
    runtime.redis.flushdb()


def queued(rt: Runtime) -> list[Job]:
    return rt.jobs.queue.get_jobs()


def event(action: str, project: int = 3, **extra) -> dict:
    return {"action": action, "project": {"id": project, "title": "p"}, **extra}


def test_created_tasks_are_known_at_once_and_queued_in_batches(rt: Runtime) -> None:
    tasks = [
        {"id": i, "data": {"image": f"/data/{i}.jpg"}, "total_annotations": int(i == 3)}
        for i in (1, 2, 3)
    ]
    reply = handle_webhook(rt, event("TASKS_CREATED", tasks=tasks))
    assert reply == {"status": "ok", "action": "TASKS_CREATED", "enqueued": 2}
    state = rt.state(3)
    assert state.tasks.ids() == {1, 2, 3} and state.labeled.ids() == {3}
    assert state.index_marks.recent(60) == {1, 2, 3}
    jobs = queued(rt)
    assert [j.func_name for j in jobs] == ["lookalike.service.jobs.index_tasks"] * 2
    assert [[t["id"] for t in j.args[1]] for j in jobs] == [[1, 2], [3]]
    assert jobs[0].args[1][0] == {"id": 1, "data": {"image": "/data/1.jpg"}}  # no extra fields
    assert jobs[0].retries_left == 3 and jobs[0].timeout == 1800


def test_deleted_tasks_are_removed_by_a_job(rt: Runtime) -> None:
    reply = handle_webhook(rt, event("TASKS_DELETED", tasks=[{"id": 5}, {"id": 6}]))
    assert reply["enqueued"] == 1
    [job] = queued(rt)
    assert job.func_name.endswith(".remove_tasks") and job.args == (3, [5, 6])
    assert handle_webhook(rt, event("TASKS_DELETED", tasks=[]))["enqueued"] == 0


def test_an_annotation_marks_its_task_labeled_at_once_and_queues_prioritization(
    rt: Runtime,
) -> None:
    state = rt.state(3)
    state.priorities.set(8, prediction_id=80, score=0.1)
    annotation = {
        "id": 40,
        "task": 8,
        "result": [{"value": {"choices": ["Car"]}}],
        "lead_time": 3.2,
    }
    reply = handle_webhook(rt, event("ANNOTATION_CREATED", annotation=annotation, task={"id": 8}))
    assert reply["enqueued"] == 1
    assert state.labeled.ids() == {8} and state.priorities.scores([8]) == {}
    [job] = queued(rt)
    assert job.func_name.endswith(".auto_prioritize")
    assert job.args == (3, 8, {"id": 40, "result": annotation["result"]})


def test_bulk_annotation_changes_resync_and_deleted_ones_leave_the_label_counts(
    rt: Runtime,
) -> None:
    rt.state(3).labels.set(40, task_id=8, labels=["Car"])
    handle_webhook(rt, event("ANNOTATIONS_DELETED", annotations=[{"id": 40}]))
    assert rt.state(3).labels.counts() == {}
    [job] = queued(rt)
    assert job.func_name.endswith(".sync_project") and job.args == (3, False)


def test_start_training_resyncs_and_retries_failures(rt: Runtime) -> None:
    handle_webhook(rt, event("START_TRAINING"))
    [job] = queued(rt)
    assert job.func_name.endswith(".sync_project") and job.args == (3, True)
    assert job.timeout == 3600


def test_project_deleted_drops_it(rt: Runtime) -> None:
    handle_webhook(rt, event("PROJECT_DELETED"))
    [job] = queued(rt)
    assert job.func_name.endswith(".drop_project") and job.args == (3,)
    # tried again on the outage schedule (the vector database may be away meanwhile)
    assert job.retries_left == len(LABEL_STUDIO_OUTAGE_RETRY_DELAYS)
    assert job.retry_intervals == list(LABEL_STUDIO_OUTAGE_RETRY_DELAYS)


@pytest.mark.parametrize("body", [{"action": "TASKS_CREATED"}, {"action": "X", "project": "3"}, {}])
def test_events_without_a_project_are_ignored(rt: Runtime, body: dict) -> None:
    assert handle_webhook(rt, body)["status"] == "ignored"
    assert queued(rt) == []


def test_unknown_actions_enqueue_nothing(rt: Runtime) -> None:
    assert handle_webhook(rt, event("PROJECT_UPDATED"))["enqueued"] == 0
    assert queued(rt) == []


def test_every_job_name_resolves_to_a_function() -> None:
    import importlib

    from lookalike.service import jobqueue

    for name in (
        jobqueue.SYNC,
        jobqueue.REINDEX,
        jobqueue.INDEX,
        jobqueue.REMOVE,
        jobqueue.PRIORITIZE,
        jobqueue.DROP,
    ):
        module, _, function = name.rpartition(".")
        assert callable(getattr(importlib.import_module(module), function)), name
