"""Project state in a real Redis, and the web process's FAISS indexes that follow it."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import redis
from tests.services import redis_server

from lookalike.core.store import StoreError
from lookalike.service.project_index import ProjectIndexes
from lookalike.service.state import ModelConflictError, ProjectState

DIM = 8


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_url)
    connection.flushdb()
    yield connection
    connection.flushdb()


def vectors(n: int, seed: int = 0) -> np.ndarray:
    array = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return array / np.linalg.norm(array, axis=1, keepdims=True)


def test_put_vectors_is_idempotent_per_task_id(client: redis.Redis) -> None:
    state = ProjectState(client, 7)
    state.meta.claim_model("m", DIM)
    state.put_vectors([1, 2, 3], vectors(3))
    state.put_vectors([2, 3], vectors(2, seed=1))  # a retried job, with new vectors
    assert state.vectors.ids() == {1, 2, 3}
    # stored in 8 bits: within rounding of the new vector, far from the old one
    np.testing.assert_allclose(state.vectors.get([2])[2], vectors(2, seed=1)[0], atol=5e-3)


def test_a_success_clears_the_tasks_failure(client: redis.Redis) -> None:
    state = ProjectState(client, 7)
    state.replace_tasks([1, 2], labeled=[])
    state.failures.record(1, "timeout: slow", attempts=1, final=False)
    state.failures.record(2, "not_an_image: junk", attempts=1, final=True)
    status = state.status()
    assert (status["failed"], status["retrying"], status["pending"]) == (1, 1, 1)
    state.meta.claim_model("m", DIM)
    state.put_vectors([1], vectors(1))
    status = state.status()
    assert (status["indexed"], status["failed"], status["pending"]) == (1, 1, 0)
    assert [f["task_id"] for f in status["failures"]] == [2]


def test_another_model_is_refused_with_a_way_out(client: redis.Redis) -> None:
    state = ProjectState(client, 7)
    state.meta.claim_model("open_clip:ViT-B-32/x", DIM)
    with pytest.raises(ModelConflictError, match="reindex"):
        state.meta.claim_model("timm:efficientnet_lite0", 1280)
    state.reset()  # what /reindex does
    state.meta.claim_model("timm:efficientnet_lite0", 1280)


def test_web_index_follows_upserts_and_removals(client: redis.Redis) -> None:
    state = ProjectState(client, 3)
    indexes = ProjectIndexes(client)
    with pytest.raises(StoreError, match="no index yet"):
        indexes.get(3)
    state.meta.claim_model("m", DIM)
    data = vectors(10)
    state.put_vectors(range(5), data[:5])
    collection = indexes.get(3)
    assert len(collection) == 5
    state.put_vectors(range(5, 10), data[5:])
    state.remove_tasks([0, 1])
    collection = indexes.get(3)
    assert set(collection.ids().tolist()) == set(range(2, 10))
    hit = collection.search(data[7], k=1)[0]
    assert hit.id == 7 and hit.score == pytest.approx(1.0, abs=1e-5)


def test_web_index_rebuilds_after_reset_and_after_a_trimmed_log(client: redis.Redis) -> None:
    state = ProjectState(client, 4)
    indexes = ProjectIndexes(client)
    state.meta.claim_model("m", DIM)
    state.put_vectors([1, 2], vectors(2))
    assert len(indexes.get(4)) == 2
    state.reset()
    state.meta.claim_model("m2", DIM)
    state.put_vectors([5], vectors(1, seed=3))
    collection = indexes.get(4)
    assert collection.model == "m2" and set(collection.ids().tolist()) == {5}
    # A reader that fell behind a trimmed change log rebuilds from the hash.
    state.put_vectors([6], vectors(1, seed=4))
    client.xtrim("lookalike:project:4:changes", maxlen=0)  # behind the backend's back
    state.put_vectors([7], vectors(1, seed=5))
    assert set(indexes.get(4).ids().tolist()) == {5, 6, 7}


def test_labeled_tasks_lose_their_priority(client: redis.Redis) -> None:
    state = ProjectState(client, 5)
    state.priorities.set(1, prediction_id=11, score=0.1)
    state.priorities.set(2, prediction_id=12, score=0.2)
    state.mark_labeled([1])
    assert state.labeled.ids() == {1}
    assert state.priorities.scores([1, 2]) == {2: 0.2}
    # The prediction stays in Label Studio, so its id is kept: a later match updates it.
    assert state.priorities.prediction_ids([1, 2]) == {1: 11, 2: 12}


def test_drop_forgets_the_project_and_web_indexes_follow(client: redis.Redis) -> None:
    state = ProjectState(client, 9)
    indexes = ProjectIndexes(client)
    state.replace_tasks([1], labeled=[])
    state.meta.claim_model("m", DIM)
    state.put_vectors([1], vectors(1))
    assert len(indexes.get(9)) == 1
    state.drop()
    # Only the change stream is left, and its "reset" makes readers let go of the index.
    assert client.keys("lookalike:project:9:*") == [b"lookalike:project:9:changes"]
    with pytest.raises(StoreError, match="no index yet"):
        indexes.get(9)


def test_vectors_of_tasks_deleted_meanwhile_are_not_written(client: redis.Redis) -> None:
    state = ProjectState(client, 8)
    state.meta.claim_model("m", DIM)
    state.tasks.add([1, 2, 3])
    state.remove_tasks([2])  # TASKS_DELETED arrived while the batch was being embedded
    state.put_vectors([1, 2, 3], vectors(3), only_known=True)
    assert state.vectors.ids() == {1, 3}


def test_queued_tasks_are_not_queued_again_until_presumed_lost(client: redis.Redis) -> None:
    state = ProjectState(client, 10)
    state.index_marks.mark([1, 2])
    assert state.index_marks.recent(3600) == {1, 2}
    state.index_marks.unmark([1])
    assert state.index_marks.recent(3600) == {2}
    assert state.index_marks.recent(max_age=-1) == set()  # older than the horizon: lost
    state.remove_tasks([2])
    assert state.index_marks.recent(3600) == set()


def test_drop_also_forgets_locks_and_the_first_sync_flag(client: redis.Redis) -> None:
    state = ProjectState(client, 11)
    assert state.locks.claim_first_sync()
    assert not state.locks.claim_first_sync()  # once per project
    state.views.set("Similar to #1", 5)
    state.labels.set(100, task_id=1, labels=["Car"])
    with state.locks.priority():
        pass
    state.drop()
    assert state.locks.claim_first_sync()  # a project connected again is synced again
    assert state.views.get("Similar to #1") is None and state.labels.counts() == {}


def test_remove_tasks_is_one_transaction_over_every_concern(client: redis.Redis) -> None:
    state = ProjectState(client, 12)
    state.replace_tasks([1, 2], labeled=[2])
    state.meta.claim_model("m", DIM)
    state.put_vectors([1, 2], vectors(2))
    state.failures.record(1, "timeout: slow", attempts=1, final=False)
    state.priorities.set(1, prediction_id=7, score=0.3)
    state.index_marks.mark([1])
    state.remove_tasks([1, 2])
    status = state.status()
    assert (status["total"], status["indexed"], status["labeled"], status["failures"]) == (
        0,
        0,
        0,
        [],
    )
    assert state.priorities.prediction_ids([1]) == {} and state.index_marks.recent(3600) == set()
    assert state.vectors.changes_since("0-0")[-1][1:] == ("remove", [1, 2])


def test_label_counts_count_an_annotation_once_per_label(client: redis.Redis) -> None:
    state = ProjectState(client, 13)
    state.labels.set(1, task_id=1, labels=["Car", "Car", "Police car"])
    state.labels.set(2, task_id=2, labels=["Car"])
    assert state.labels.counts() == {"Car": 2, "Police car": 1}
    state.labels.remove(1)
    assert state.labels.counts() == {"Car": 1}


# --------------------------------------------------------------------------- scale
def test_vectors_are_stored_compactly_in_redis(client: redis.Redis) -> None:
    """512-d vectors: about 520 bytes each in Redis (a float32 hash entry cost ~2.6 KB)."""
    state = ProjectState(client, 21)
    state.meta.claim_model("m", 512)
    rng = np.random.default_rng(0)
    data = rng.standard_normal((2000, 512)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    for start in range(0, 2000, 500):
        state.put_vectors(range(start + 1, start + 501), data[start : start + 500])
    keys = [k for k in client.keys("lookalike:project:21:vectors*")]
    stored = sum(int(client.memory_usage(k)) for k in keys)
    assert stored / 2000 < 600
    assert state.vectors.count() == 2000 and state.vectors.ids() == set(range(1, 2001))
    got = state.vectors.get([1, 1500, 5000])
    assert set(got) == {1, 1500}
    assert float(got[1500] @ data[1499]) > 0.9999  # 8-bit codes: cosine error ~1e-5 at 512-d
    batches = list(state.vectors.iter_batches())
    assert sum(len(ids) for ids, _ in batches) == 2000
    state.remove_tasks([1500])
    assert 1500 not in state.vectors.ids() and state.vectors.count() == 1999


def test_vectors_written_by_the_previous_version_are_still_read(client: redis.Redis) -> None:
    """The old layout (a hash of float32 vectors) is read, and rewritten entry by entry."""
    state = ProjectState(client, 22)
    state.meta.claim_model("m", DIM)
    old = vectors(3)
    client.hset("lookalike:project:22:vectors", mapping={str(i + 1): old[i].tobytes()
                                                           for i in range(3)})
    assert state.vectors.count() == 3 and state.vectors.ids() == {1, 2, 3}
    assert len(ProjectIndexes(client).get(22)) == 3
    state.put_vectors([2], vectors(1, seed=4))  # the new form replaces the old entry
    assert state.vectors.count() == 3
    np.testing.assert_allclose(state.vectors.get([1])[1], old[0])
    assert client.hlen("lookalike:project:22:vectors") == 2


def test_labeled_tasks_leave_searches_through_the_change_log(client: redis.Redis) -> None:
    state = ProjectState(client, 23)
    indexes = ProjectIndexes(client)
    state.meta.claim_model("m", DIM)
    data = vectors(6)
    state.put_vectors(range(6), data)
    assert indexes.get(23).search(data[2], k=1)[0].id == 2
    state.mark_labeled([2])
    assert all(h.id != 2 for h in indexes.get(23).search(data[2], k=6))
    state.replace_tasks(range(6), labeled=[3])  # a resync: 2 is no longer labeled, 3 is
    ids = [h.id for h in indexes.get(23).search(data[2], k=6)]
    assert ids[0] == 2 and 3 not in ids


def test_a_restarted_web_process_loads_its_snapshot(client: redis.Redis, tmp_path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the exact limit the index is re-trained in the background and snapshotted; a new
    process loads the snapshot and replays only the later changes from the log."""
    from lookalike.core.vector_index import IndexPlan
    from lookalike.service.state.vectors import VectorLog

    plan = IndexPlan(exact_limit=1000)
    state = ProjectState(client, 24)
    state.meta.claim_model("m", DIM)
    data = vectors(5000, seed=2)
    state.put_vectors(range(5000), data)
    first = ProjectIndexes(client, tmp_path, plan)
    collection = first.get(24)
    first.wait_for_upkeep(60)
    assert not first.get(24).needs_rebuild() and collection.index_kind.startswith("IVF")
    assert (tmp_path / "project-24.lookalike").is_file()
    state.put_vectors([9000], vectors(1, seed=3))
    state.remove_tasks([17])
    state.mark_labeled([18])

    def no_full_read(self):
        raise AssertionError("read every vector from Redis instead of the snapshot")

    monkeypatch.setattr(VectorLog, "iter_batches", no_full_read)
    second = ProjectIndexes(client, tmp_path, plan).get(24)
    assert second.index_kind == collection.index_kind
    assert 9000 in second and 17 not in second and len(second) == 5000
    assert all(h.id != 18 for h in second.search(data[18], k=20))
    assert second.search(data[40], k=1)[0].id == 40


def test_a_large_project_is_built_straight_into_the_compressed_index(client: redis.Redis) -> None:
    from lookalike.core.vector_index import IndexPlan

    state = ProjectState(client, 25)
    state.meta.claim_model("m", DIM)
    data = vectors(4000, seed=6)
    state.put_vectors(range(4000), data)
    indexes = ProjectIndexes(client, None, IndexPlan(exact_limit=1000))
    collection = indexes.get(25)
    assert collection.index_kind.startswith("IVF") and len(collection) == 4000
    assert not collection.needs_rebuild()
    assert collection.search(data[123], k=1)[0].id == 123


def test_queued_jobs_are_counted_per_project(client: redis.Redis) -> None:
    """index-status counts the project's own waiting jobs, not the whole queue."""
    from lookalike.config import Settings
    from lookalike.service.jobqueue import JobQueue

    jobs = JobQueue(client, Settings.from_env({"LOOKALIKE_INDEX_BATCH": "2"}))
    jobs.sync(1)
    jobs.index(2, [{"id": i} for i in range(5)])  # three batches
    jobs.index(12, [{"id": 1}])  # a project whose id starts like project 1's
    assert (jobs.queued_for(1), jobs.queued_for(2), jobs.queued_for(12)) == (1, 3, 1)
    assert jobs.count == 5
    jobs.queue.empty()
    assert jobs.queued_for(2) == 0
