"""One project's state in Redis, composed of one small structure per concern.

Redis is the only thing workers and web processes share (besides Label Studio), so workers can
run on other machines with no shared volume. The operations here are the ones that span several
structures and must happen in one transaction (storing a batch, removing tasks, a reset).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import numpy as np
import redis

from lookalike.errors import UnavailableError
from lookalike.service.state.base import KEY_PREFIX, as_ids, project_of_key
from lookalike.service.state.failures import Failures
from lookalike.service.state.locks import ProjectLocks
from lookalike.service.state.meta import ProjectMeta
from lookalike.service.state.queueing import (
    CoverageState,
    DuplicateReport,
    LabelStats,
    Priorities,
    Views,
)
from lookalike.service.state.replies import LatestMatches, Replies
from lookalike.service.state.tasks import IndexMarks, TaskSet
from lookalike.service.state.vectors import VectorLog


class VectorEngine(Protocol):
    """Where vectors live when not in Redis (`service.vector_db.VectorDB`: Milvus)."""

    def vectors(self, connection: redis.Redis, project: int, labeled: TaskSet,
                meta: ProjectMeta) -> Any: ...


class ProjectState:
    def __init__(
        self, connection: redis.Redis, project: int, vector_engine: VectorEngine | None = None
    ) -> None:
        self.redis = connection
        self.project = int(project)
        self.meta = ProjectMeta(connection, project)
        self.tasks = TaskSet(connection, project, "tasks")  # every task Label Studio has
        self.labeled = TaskSet(connection, project, "labeled")  # tasks with annotations
        # Vectors: in Redis (embedded engine) or in Milvus, with the same methods either way.
        self.vectors = (
            VectorLog(connection, project) if vector_engine is None
            else vector_engine.vectors(connection, project, self.labeled, self.meta)
        )
        self.failures = Failures(connection, project)
        self.index_marks = IndexMarks(connection, project)
        self.priorities = Priorities(connection, project)
        self.views = Views(connection, project)
        self.labels = LabelStats(connection, project)
        self.locks = ProjectLocks(connection, project)
        self.replies = Replies(connection, project)
        self.latest_matches = LatestMatches(connection, project)
        self.mislabeled = TaskSet(connection, project, "mislabeled")  # flagged, with a tab
        self.duplicates = DuplicateReport(connection, project)
        self.coverage = CoverageState(connection, project)

    # ------------------------------------------------------------------ tasks
    def replace_tasks(self, task_ids: Iterable[int], labeled: Iterable[int]) -> None:
        """Replace the known task sets with a fresh listing (a resync)."""
        pipe = self.redis.pipeline()
        self.tasks.replace(task_ids, pipe)
        self.labeled.replace(labeled, pipe)
        self.vectors.note("labels", [], pipe)  # web processes reload the labeled set
        pipe.execute()
        self.vectors.labels_replaced()

    def mark_labeled(self, task_ids: Iterable[int]) -> None:
        """Labeled tasks leave every search, and their priority goes with them."""
        ids = as_ids(task_ids)
        if ids:
            pipe = self.redis.pipeline(transaction=True)
            self.labeled.add(ids, pipe)
            self.vectors.note("label", ids, pipe)  # searches exclude them from now on
            self.priorities.forget_scores(ids, pipe)
            pipe.execute()
            self.vectors.labeled_changed(ids)

    # ------------------------------------------------------------------ vectors
    def put_vectors(
        self, ids: Iterable[int], vectors: np.ndarray, only_known: bool = False
    ) -> None:
        """Store vectors by task id (overwriting), in one transaction with a change entry.

        `only_known` drops ids no longer in the task set (deleted while being embedded)."""
        ids = as_ids(ids)
        if only_known and ids:
            keep = [n for n, present in enumerate(self.tasks.contains_many(ids)) if present]
            ids, vectors = [ids[n] for n in keep], np.asarray(vectors)[keep]
        if not ids:
            return
        pipe = self.redis.pipeline(transaction=True)
        self.vectors.put(ids, vectors, pipe)
        self.failures.clear(ids, pipe)
        self.meta.update(vectors_in=self.vectors.engine, pipeline=pipe)
        pipe.execute()

    def remove_tasks(self, task_ids: Iterable[int]) -> None:
        """Tasks deleted in Label Studio: their vectors, failures and priorities go too."""
        ids = as_ids(task_ids)
        if not ids:
            return
        pipe = self.redis.pipeline(transaction=True)
        self.vectors.remove(ids, pipe)
        self.failures.clear(ids, pipe)
        self.priorities.remove(ids, pipe)
        self.tasks.remove(ids, pipe)
        self.labeled.remove(ids, pipe)
        self.index_marks.unmark(ids, pipe)
        pipe.execute()

    def reset(self) -> None:
        """Forget every vector and the model (a reindex): readers start over."""
        pipe = self.redis.pipeline(transaction=True)
        self.vectors.reset(pipe)
        self.failures.delete(pipe)
        self.meta.forget_model(pipeline=pipe)
        pipe.execute()

    def drop(self) -> None:
        """The project was deleted in Label Studio: forget all of it."""
        pipe = self.redis.pipeline(transaction=True)
        for structure in (
            self.meta,
            self.tasks,
            self.labeled,
            self.failures,
            self.index_marks,
            self.priorities,
            self.views,
            self.labels,
            self.replies,
            self.latest_matches,
            self.mislabeled,
            self.duplicates,
            self.coverage,
        ):
            structure.delete(pipe)
        pipe.delete(*self.locks.keys())
        self.vectors.delete(pipe)  # leaves a `reset`: web processes drop their copy
        pipe.execute()

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        """Counts for index-status. If the vector database cannot be reached, `indexed` and
        `pending` are None and `error` says why."""
        pipe = self.redis.pipeline()
        self.tasks.count(pipe)
        self.labeled.count(pipe)
        total, labeled = (int(n) for n in pipe.execute())
        meta = self.meta.get()
        error = meta.get("error")
        indexed: int | None
        try:
            indexed = int(self.vectors.count())
        except UnavailableError as exc:  # Milvus down: say so instead of failing the page
            indexed, error = None, str(exc)
        where = meta.get("vectors_in")
        if where and where != self.vectors.engine and not error:
            error = (
                f"this project's vectors are in {where}, but this process looks in "
                f"{self.vectors.engine}: give it the same LOOKALIKE_VECTOR_DB as the workers"
            )
        failures = self.failures.all()
        final = [f for f in failures if f.final]
        return {
            "project": self.project,
            "total": total,
            "indexed": indexed,
            "failed": len(final),
            "pending": None if indexed is None else max(0, total - indexed - len(final)),
            "retrying": len(failures) - len(final),
            "labeled": labeled,
            "model": meta.get("model"),
            "error": error,
            "last_sync": float(meta["last_sync"]) if "last_sync" in meta else None,
            "failures": [
                {"task_id": f.task_id, "reason": f.reason, "attempts": f.attempts, "final": f.final}
                for f in failures
            ],
        }

    def is_known(self) -> bool:
        """Whether Lookalike has seen this project (it was connected, or a sync listed it)."""
        return self.tasks.exists() or self.meta.exists()


def known_projects(connection: redis.Redis) -> list[int]:
    keys = connection.scan_iter(match=f"{KEY_PREFIX}:*:tasks", count=1000)
    return sorted({project_of_key(key) for key in keys})
