"""Milvus as the vector engine: a real `milvus-lite server` on 127.0.0.1 (the gRPC protocol
pymilvus speaks to a Milvus cluster), a real Redis, the same state and search code the web
process and the workers run. The end-to-end suites run once more against it
(`test_e2e_backend.py`)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from tests.services import MilvusServer, drop_milvus_collections, milvus_server, redis_server
from tests.test_e2e_backend import wait_for

from lookalike.config import Settings
from lookalike.core.milvus_collection import (
    MilvusTarget,
    VectorDBError,
    VectorDBUnavailableError,
)
from lookalike.core.store import ModelMismatchError, StoreError
from lookalike.errors import UnavailableError
from lookalike.service.indexing import index_batch
from lookalike.service.project_index import ProjectIndexes
from lookalike.service.protocol import annotator_message
from lookalike.service.runtime import Runtime
from lookalike.service.similarity import SimilarityService, SimilarQuery
from lookalike.service.state import ProjectState
from lookalike.service.vector_db import COLLECTION_PREFIX, MilvusIndexes, copy_from_redis
from lookalike.web.app import create_app

DIM = 16
PROJECT = 5


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture
def rt(redis_url: str, milvus: MilvusServer, tmp_path) -> Iterator[Runtime]:
    runtime = Runtime(Settings(redis_url=redis_url, data_dir=tmp_path, vector_db=milvus.uri))
    runtime.redis.flushdb()
    yield runtime
    runtime.redis.flushdb()
    drop_milvus_collections(milvus.uri)


def unit(n: int, seed: int = 0) -> np.ndarray:
    array = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return array / np.linalg.norm(array, axis=1, keepdims=True)


def indexed_project(rt: Runtime, n: int = 50, labeled: tuple[int, ...] = ()):
    state = rt.state(PROJECT)
    state.replace_tasks(range(1, n + 1), labeled=labeled)
    state.meta.claim_model("fake/model", DIM)
    data = unit(n)
    state.put_vectors(range(1, n + 1), data)
    return state, data


# ------------------------------------------------------------------ engine selection
def test_the_setting_selects_the_engine(redis_url: str, milvus: MilvusServer, tmp_path) -> None:
    embedded = Runtime(Settings(redis_url=redis_url, data_dir=tmp_path))
    assert embedded.vector_db is None
    assert isinstance(SimilarityService(embedded).indexes, ProjectIndexes)
    external = Runtime(Settings(redis_url=redis_url, data_dir=tmp_path, vector_db=milvus.uri))
    assert external.vector_db is not None
    assert isinstance(SimilarityService(external).indexes, MilvusIndexes)
    assert Settings.from_env({"LOOKALIKE_VECTOR_DB": milvus.uri}).vector_db == milvus.uri


@pytest.mark.parametrize(
    ("value", "uri", "db"),
    [
        ("milvus://db.example:19530", "http://db.example:19530", "default"),
        ("milvus://db.example", "http://db.example:19530", "default"),
        ("milvus+tls://db.example:443/team_a", "https://db.example:443", "team_a"),
        ("https://db.example:443", "https://db.example:443", "default"),
    ],
)
def test_uris_and_tls(value: str, uri: str, db: str) -> None:
    target = MilvusTarget.parse(value, "user:secret")
    assert (target.uri, target.db_name, target.token) == (uri, db, "user:secret")
    assert "secret" not in target.shown


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("redis://localhost:6379", "expected milvus://host:port"),
        ("localhost:19530", "expected milvus://host:port"),
        ("milvus://root:Milvus@db.example:19530", "LOOKALIKE_VECTOR_DB_TOKEN"),
        ("milvus://db.example:notaport", "LOOKALIKE_VECTOR_DB"),
    ],
)
def test_bad_uris_are_refused_with_what_to_write(value: str, message: str) -> None:
    with pytest.raises(VectorDBError, match=message):
        MilvusTarget.parse(value)


# ------------------------------------------------------------------ the store's guarantees
def test_upserts_by_task_id_never_duplicate_and_counts_agree(rt: Runtime) -> None:
    state, data = indexed_project(rt)
    collection = state.vectors.collection
    state.put_vectors(range(1, 11), data[:10])  # a retried batch
    assert collection.count() == 50 == state.status()["indexed"]
    assert state.status()["pending"] == 0
    moved = unit(1, seed=9)[0]
    state.put_vectors([3], moved[None])  # a new vector for the same task replaces the old
    assert collection.count() == 50
    np.testing.assert_allclose(state.vectors.get([3])[3], moved, atol=1e-6)
    assert state.vectors.ids() == set(range(1, 51))


def test_only_known_tasks_are_written(rt: Runtime) -> None:
    state, data = indexed_project(rt, n=10)
    state.remove_tasks([4])
    state.put_vectors([4, 5], data[3:5], only_known=True)  # 4 was deleted while embedding
    assert state.vectors.ids() == set(range(1, 11)) - {4}


def test_search_excludes_labeled_and_the_query_inside_milvus(rt: Runtime) -> None:
    state, data = indexed_project(rt, labeled=(2, 3))
    view = MilvusIndexes(rt.state).get(PROJECT)
    exact = np.argsort(-(data @ data[0])) + 1  # task ids by similarity to task 1
    expected = [int(t) for t in exact if t not in (1, 2, 3)][:10]
    hits = view.search(data[0], 10, exclude={1})
    assert [h.id for h in hits] == expected
    assert hits[0].score == pytest.approx(float(data[0] @ data[expected[0] - 1]), abs=1e-5)
    # Labeling after indexing: flagged in Milvus as Redis commits it.
    state.mark_labeled([expected[0]])
    assert state.vectors.collection.labeled_ids() == {2, 3, expected[0]}
    assert expected[0] not in [h.id for h in view.search(data[0], 10, exclude={1})]
    # A resync's labeled set replaces the flags: 2 and 3 are unlabeled again.
    state.replace_tasks(range(1, 51), labeled=[expected[0]])
    assert state.vectors.collection.labeled_ids() == {expected[0]}
    assert {2, 3} & {h.id for h in view.search(data[0], 49, exclude={1})} == {2, 3}


def test_a_stale_labeled_flag_is_repaired_by_the_search_that_meets_it(rt: Runtime) -> None:
    state, data = indexed_project(rt)
    view = MilvusIndexes(rt.state).get(PROJECT)
    best = view.search(data[0], 1, exclude={1})[0].id
    state.labeled.add([best])  # labeled in Redis; the Milvus flag write was lost
    assert state.vectors.collection.labeled_ids() == set()
    hits = view.search(data[0], 5, exclude={1})
    assert best not in [h.id for h in hits] and len(hits) == 5
    assert state.vectors.collection.labeled_ids() == {best}


def test_deleted_tasks_leave_and_a_reset_starts_clean(rt: Runtime) -> None:
    state, data = indexed_project(rt)
    state.remove_tasks([1, 2])
    assert state.vectors.collection.count() == 48
    view = MilvusIndexes(rt.state).get(PROJECT)
    assert {1, 2}.isdisjoint(h.id for h in view.search(data[0], 48))
    assert 1 not in view and 3 in view
    state.reset()  # what /reindex does
    assert state.status()["indexed"] == 0 and state.vectors.collection.shape() is None
    with pytest.raises(StoreError, match="no index yet"):
        MilvusIndexes(rt.state).get(PROJECT)
    state.meta.claim_model("other/model", DIM * 2)
    state.put_vectors([1], unit(1)[:, :DIM].repeat(2, axis=1) / np.sqrt(2))
    assert state.vectors.collection.shape() == ("other/model", DIM * 2)


def test_a_collection_of_another_model_is_refused_for_queries(rt: Runtime) -> None:
    indexed_project(rt)
    view = MilvusIndexes(rt.state).get(PROJECT)
    view.check_model("fake/model", DIM)
    with pytest.raises(ModelMismatchError, match="reindex"):
        view.check_model("open_clip:ViT-B-32", 512)


def test_the_web_keeps_no_vectors(rt: Runtime) -> None:
    indexed_project(rt)
    service = SimilarityService(rt)

    hits = service.find(PROJECT, SimilarQuery(task_id=1), k=5)
    assert len(hits) == 5 and 1 not in [h.id for h in hits]
    assert not hasattr(service.indexes, "_entries")  # no per-project copy in this process
    assert not rt.settings.snapshots_dir.exists()  # and no snapshot files


# ------------------------------------------------------------------ Milvus down
def test_milvus_down_is_a_clear_error_and_indexing_resumes(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory, tmp_path, lite0_embedder
) -> None:
    with milvus_server(tmp_path_factory.mktemp("milvus-outage")) as server:
        rt = Runtime(Settings(redis_url=redis_url, data_dir=tmp_path, vector_db=server.uri))
        rt.redis.flushdb()
        state, data = indexed_project(rt, n=10)
        server.stop()
        status = state.status()
        assert status["indexed"] is None and status["pending"] is None
        assert server.uri.split("//")[1] in status["error"]
        assert "unreachable" in status["error"] and "resume" in status["error"]
        with pytest.raises(VectorDBUnavailableError, match="unreachable"):
            state.put_vectors([11], unit(1))
        with pytest.raises(UnavailableError):  # the web answers 503 with this message
            MilvusIndexes(rt.state).get(PROJECT).search(data[0], 3)
        web = create_app(rt).test_client()
        reply = web.post(f"/api/projects/{PROJECT}/similar", json={"task_id": 1})
        assert reply.status_code == 503 and "unreachable" in reply.json["error"]
        assert "Traceback" not in reply.get_data(as_text=True)
        status = web.get(f"/api/projects/{PROJECT}/index-status")
        assert status.status_code == 200 and "unreachable" in status.json["error"]
        assert "vector database" in annotator_message(VectorDBUnavailableError("x"))
        # An index batch meanwhile embeds nothing, records why its tasks wait (index-status
        # shows it) and schedules them again on the outage schedule.
        worker_rt = Runtime(rt.settings, embedder=lite0_embedder)
        worker_rt.state(6).replace_tasks([11, 12], labeled=[])
        result = index_batch(worker_rt, 6, [{"id": 11, "data": {}}, {"id": 12, "data": {}}])
        assert result == {"indexed": 0, "failed": 2, "retrying": 2}
        failures = worker_rt.state(6).failures.all()
        assert {f.task_id for f in failures} == {11, 12}
        assert all(not f.final and "unreachable" in f.reason for f in failures)
        assert rt.jobs.queue.scheduled_job_registry.count == 1
        labeled_while_down = 4
        state.mark_labeled([labeled_while_down])  # Redis commits; the flag waits
        # Dropping a project meanwhile fails whole (its job is retried) and loses nothing.
        dropped = rt.state(6)
        with pytest.raises(UnavailableError):
            dropped.drop()
        assert dropped.tasks.ids() == {11, 12}
        server.start()
        # (gRPC reconnects on the next call after the server is back: allow a few seconds)
        wait_for(lambda: state.status()["indexed"] == 10 or None, 20, "Milvus to be back")
        assert state.status()["error"] is None
        hits = MilvusIndexes(rt.state).get(PROJECT).search(data[labeled_while_down - 1], 3)
        assert labeled_while_down not in [h.id for h in hits]
        dropped.drop()  # the retry, once Milvus is back
        assert dropped.tasks.ids() == set()
        rt.redis.flushdb()


def test_redis_is_left_alone_when_milvus_holds_the_vectors(rt: Runtime) -> None:
    indexed_project(rt)
    keys = {k.decode() for k in rt.redis.keys(f"lookalike:project:{PROJECT}:vectors*")}
    assert keys == set()  # no vector bytes in Redis: only the change log
    assert rt.redis.xlen(f"lookalike:project:{PROJECT}:changes") >= 1


def test_raw_client_errors_never_escape(redis_url: str, tmp_path) -> None:
    rt = Runtime(Settings(redis_url=redis_url, data_dir=tmp_path,
                          vector_db="milvus://127.0.0.1:1"))
    with pytest.raises(VectorDBUnavailableError, match=r"127\.0\.0\.1:1/"):
        rt.state(PROJECT).vectors.ping()


def test_copy_vectors_moves_a_project_from_redis_without_embedding(rt: Runtime) -> None:
    embedded = ProjectState(rt.redis, PROJECT)  # the embedded engine: vectors in Redis
    embedded.replace_tasks(range(1, 31), labeled=[2])
    embedded.meta.claim_model("fake/model", DIM)
    data = unit(30)
    embedded.put_vectors(range(1, 31), data)
    state = rt.state(PROJECT)  # the same project, Milvus as its engine
    assert state.status()["indexed"] == 0
    assert copy_from_redis(state) == 30
    assert copy_from_redis(state, keep=True) == 0  # Redis's copy was freed
    assert state.status()["indexed"] == 30 and embedded.vectors.count() == 0
    assert state.vectors.collection.labeled_ids() == {2}
    # A process without the setting now says where the vectors went instead of showing 0.
    assert "LOOKALIKE_VECTOR_DB" in embedded.status()["error"]
    assert state.status()["error"] is None
    hits = MilvusIndexes(rt.state).get(PROJECT).search(data[0], 5, exclude={1})
    expected = [int(t) + 1 for t in np.argsort(-(data @ data[0])) if t + 1 not in (1, 2)][:5]
    assert [h.id for h in hits] == expected  # 8-bit round trip keeps the order here


@pytest.mark.parametrize("name", ["photos", "my.photos-v2_a", "a__b", "x_", "_y", "a-.-b"])
def test_cli_collection_names_map_onto_milvus_names_and_back(name: str) -> None:
    from lookalike.core.milvus_store import PREFIX, _decode, _encode

    encoded = _encode(name)
    assert encoded.startswith(PREFIX) and encoded.replace("_", "").isalnum()
    assert _decode(encoded) == name
    assert not encoded.startswith(COLLECTION_PREFIX)  # never a project's collection
