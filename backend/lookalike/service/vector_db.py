"""The vector engine a deployment uses: embedded (vectors in Redis, a FAISS copy in each web
process) or an external Milvus (`LOOKALIKE_VECTOR_DB`), behind the interface `VectorLog` has.

With Milvus, workers upsert vectors keyed by task id into one collection per project, and web
processes query it: they hold no vectors. Redis keeps everything else (tasks, labeled set,
failures, queue order) and the change log, which still records every change. The labeled set
lives in Redis; Milvus carries a copy as a flag per vector so searches filter inside Milvus.
The copy is written after Redis, and a search that meets a labeled task anyway (a flag write
that failed or raced a worker's upsert) repairs the flags and searches again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from lookalike.config import Settings
from lookalike.core.milvus_collection import (
    MilvusCollection,
    MilvusTarget,
    VectorDBError,
    VectorDBUnavailableError,
    lazy_client,
)
from lookalike.core.store import Hit, StoreError
from lookalike.service.state.base import Pipeline, as_ids
from lookalike.service.state.meta import ProjectMeta
from lookalike.service.state.tasks import TaskSet
from lookalike.service.state.vectors import VectorLog

log = logging.getLogger(__name__)

COLLECTION_PREFIX = "lookalike_project_"
TIMEOUT = 10.0  # seconds per Milvus call


class MilvusVectors:
    """A project's vectors in Milvus; the same methods as `VectorLog` (the embedded store)."""

    engine = "milvus"

    def __init__(self, log_: VectorLog, collection: MilvusCollection, labeled: TaskSet,
                 meta: ProjectMeta) -> None:
        self._log = log_
        self.collection = collection
        self._labeled = labeled
        self._meta = meta

    # ------------------------------------------------------------------ writes
    def put(self, ids: list[int], vectors: np.ndarray, pipeline: Pipeline) -> None:
        """Upsert now (idempotent); the change entry goes into the caller's transaction."""
        meta = self._meta.get()
        if "model" not in meta:
            raise StoreError(f"project {self._meta.project}: no model claimed before writing")
        self.collection.create(meta["model"], int(meta["dim"]))
        self.collection.upsert(ids, vectors, self._labeled.contains_many(as_ids(ids)))
        self._log.note("upsert", ids, pipeline)

    def remove(self, ids: list[int], pipeline: Pipeline) -> None:
        self.collection.remove(ids)
        self._log.note("remove", ids, pipeline)

    def reset(self, pipeline: Pipeline) -> None:
        self.collection.drop()
        self._log.note("reset", [], pipeline)

    def delete(self, pipeline: Pipeline | None = None) -> None:
        self.collection.drop()
        self._log.delete(pipeline)

    def note(self, op: str, ids: list[int], pipeline: Pipeline) -> None:
        self._log.note(op, ids, pipeline)

    def labeled_changed(self, ids: list[int]) -> None:
        """After Redis committed `ids` as labeled: flag them in Milvus too (best effort)."""
        try:
            self.collection.set_labeled(ids, True)
        except VectorDBUnavailableError as exc:  # the next search that meets them repairs it
            log.warning("project %s: labeled flags not written: %s", self._meta.project, exc)

    def labels_replaced(self) -> None:
        """After a resync replaced the labeled set: bring Milvus's flags in line with it."""
        try:
            self.sync_labels()
        except VectorDBUnavailableError as exc:
            log.warning("project %s: labeled flags not synced: %s", self._meta.project, exc)

    def sync_labels(self) -> None:
        labeled = self._labeled.ids()
        flagged = self.collection.labeled_ids()
        self.collection.set_labeled(flagged - labeled, False)
        self.collection.set_labeled(labeled - flagged, True)

    # ------------------------------------------------------------------ reads
    def ping(self) -> None:
        self.collection.ping()

    def dim(self) -> int | None:
        return self.collection.dim or None

    def count(self, pipeline: Pipeline | None = None) -> int:
        return self.collection.count()

    def ids(self) -> set[int]:
        return self.collection.ids()

    def get(self, ids: Iterable[int]) -> dict[int, np.ndarray]:
        return self.collection.get_vectors(ids)

    def iter_batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return self.collection.iter_batches()

    def last_change_id(self) -> str:
        return self._log.last_change_id()


class MilvusProject:
    """What a search needs of a project (the `Collection` methods `SimilarityService` calls),
    answered by Milvus; labeled tasks are checked against Redis, the source of truth."""

    def __init__(self, collection: MilvusCollection, labeled: TaskSet) -> None:
        self._collection = collection
        self._labeled = labeled

    @property
    def dim(self) -> int:
        return self._collection.dim

    def check_model(self, model: str, dim: int | None = None) -> None:
        self._collection.check_model(model, dim)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._collection

    def get(self, item_id: int) -> np.ndarray:
        return self._collection.get(item_id)

    def get_many(self, ids: Sequence[int]) -> np.ndarray:
        return self._collection.get_many(ids)

    def search(self, vector: np.ndarray, k: int, exclude: Iterable[int] = ()) -> list[Hit]:
        hits = self._collection.search(vector, k, exclude)
        stale = [h.id for h, flag in
                 zip(hits, self._labeled.contains_many([h.id for h in hits]), strict=True)
                 if flag]
        if stale:  # labeled in Redis, not yet flagged in Milvus: repair, then ask again
            self._collection.set_labeled(stale, True)
            hits = self._collection.search(vector, k, set(exclude) | set(stale))
        return hits


class VectorDB:
    """The process's connection to Milvus (made on first use, shared by its threads)."""

    def __init__(self, target: MilvusTarget, timeout: float = TIMEOUT) -> None:
        self.target = target
        self.timeout = timeout
        self._connected = lazy_client(target, timeout)

    @classmethod
    def from_settings(cls, settings: Settings) -> VectorDB | None:
        """None for the embedded engine (LOOKALIKE_VECTOR_DB unset)."""
        if not settings.vector_db.strip():
            return None
        return cls(MilvusTarget.parse(settings.vector_db, settings.vector_db_token))

    def collection(self, project: int) -> MilvusCollection:
        return MilvusCollection(self._connected, self.target.shown,
                                f"{COLLECTION_PREFIX}{int(project)}", self.timeout)

    def vectors(self, connection: Any, project: int, labeled: TaskSet,
                meta: ProjectMeta) -> MilvusVectors:
        return MilvusVectors(VectorLog(connection, project), self.collection(project), labeled,
                             meta)


class MilvusIndexes:
    """The web's view of projects when Milvus holds the vectors (no copy kept here)."""

    def __init__(self, state_factory: Any) -> None:
        self._state = state_factory

    def get(self, project: int) -> MilvusProject:
        state = self._state(project)
        meta = state.meta.get()
        if "model" not in meta:
            raise StoreError(
                f"project {project} has no index yet: connect the backend to it or "
                f"POST /api/projects/{project}/sync, then wait for indexing"
            )
        return MilvusProject(state.vectors.collection, state.labeled)

    def wait_for_upkeep(self, timeout: float | None = None) -> None:
        pass  # nothing runs in the background


def copy_from_redis(state: Any, keep: bool = False) -> int:
    """Move a project's vectors from Redis (the embedded engine) into Milvus without embedding
    again; `state` is the project's state with Milvus as its engine. Idempotent (upserts by
    task id): an interrupted copy is simply run again. Returns the number of vectors copied."""
    if not isinstance(state.vectors, MilvusVectors):
        raise VectorDBError("set LOOKALIKE_VECTOR_DB to the Milvus to copy the vectors into")
    meta = state.meta.get()
    if "model" not in meta:
        return 0  # nothing indexed yet
    source = VectorLog(state.redis, state.project)
    collection = state.vectors.collection
    collection.create(meta["model"], int(meta["dim"]))
    copied = 0
    for ids, vectors in source.iter_batches():
        id_list = ids.tolist()
        collection.upsert(id_list, vectors, state.labeled.contains_many(id_list))
        copied += len(id_list)
    pipe = state.redis.pipeline(transaction=True)
    state.meta.update(vectors_in=MilvusVectors.engine, pipeline=pipe)
    if not keep:  # free Redis's copy (and tell embedded readers, if any remain, to drop theirs)
        source.reset(pipe)
    pipe.execute()
    return copied
