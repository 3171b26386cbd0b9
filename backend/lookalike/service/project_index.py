"""In-memory FAISS indexes of Label Studio projects, kept current from Redis.

The web process builds a project's index from the vectors hash on first use, then before every
search applies only the changes appended to the project's stream since it last looked: new
vectors are searchable within one search of being written, and a reader never sees half a batch
(each batch is one Redis transaction).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import redis

from lookalike.core.store import Collection, StoreError
from lookalike.service.state import ChangeLogTrimmedError, ProjectState

REBUILD_BATCH = 5000


@dataclass
class _Entry:
    collection: Collection
    last_change: str


class ProjectIndexes:
    def __init__(self, redis_client: redis.Redis) -> None:
        self.redis = redis_client
        self._entries: dict[int, _Entry] = {}
        self._locks: dict[int, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def state(self, project: int) -> ProjectState:
        return ProjectState(self.redis, project)

    def get(self, project: int) -> Collection:
        """The project's current index; raises StoreError if nothing is indexed yet."""
        # One lock per project: building a large project's index never blocks the others.
        with self._locks_guard:
            lock = self._locks.setdefault(project, threading.Lock())
        with lock:
            entry = self._entries.get(project)
            state = self.state(project)
            if entry is not None:
                try:
                    if self._apply_changes(state, entry):
                        return entry.collection
                except ChangeLogTrimmedError:
                    pass  # fell too far behind the change log: rebuild
            entry = self._build(state)
            self._entries[project] = entry
            return entry.collection

    def _build(self, state: ProjectState) -> _Entry:
        meta = state.meta.get()
        if "model" not in meta:
            raise StoreError(
                f"project {state.project} has no index yet: connect the backend to it or "
                f"POST /api/projects/{state.project}/sync, then wait for indexing"
            )
        # Read first: replaying a change twice is harmless, missing one is not.
        last_change = state.vectors.last_change_id()
        collection = Collection(Path(f"project-{state.project}"), meta["model"], int(meta["dim"]))
        ids: list[int] = []
        vectors: list[np.ndarray] = []
        for task_id, vector in state.vectors.iter_all():
            ids.append(task_id)
            vectors.append(vector)
            if len(ids) >= REBUILD_BATCH:
                collection.upsert(ids, np.stack(vectors))
                ids, vectors = [], []
        if ids:
            collection.upsert(ids, np.stack(vectors))
        entry = _Entry(collection, last_change)
        self._apply_changes(state, entry)
        return entry

    def _apply_changes(self, state: ProjectState, entry: _Entry) -> bool:
        """Replay the change log; False if a reset means the index must be rebuilt."""
        while True:
            changes = state.vectors.changes_since(entry.last_change)
            if not changes:
                return True
            for change_id, op, ids in changes:
                if op == "reset":
                    return False
                if op == "remove":
                    entry.collection.remove(ids)
                else:
                    found = state.vectors.get(ids)
                    entry.collection.remove([i for i in ids if i not in found])
                    if found:
                        entry.collection.upsert(list(found), np.stack(list(found.values())))
                entry.last_change = change_id
