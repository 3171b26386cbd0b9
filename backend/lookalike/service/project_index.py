"""In-memory indexes of Label Studio projects, kept current from Redis.

A web process loads a project's index on first use: from its own snapshot file when it has one
(a trained index plus the change-log position it reflects, so a restart at 1M vectors takes
seconds, not a rebuild), else from the compact vectors in Redis. Before every search it applies
only the changes appended to the project's stream since it last looked: new vectors and newly
labeled tasks count within one search of being written, and a reader never sees half a batch
(each batch is one Redis transaction). When a project outgrows its index (exact search past the
limit, or 4x growth since training) a background thread re-trains it while searches go on.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import redis

from lookalike.core.store import Collection, StoreError
from lookalike.core.vector_index import IndexPlan
from lookalike.service.state import ChangeLogTrimmedError, ProjectState

log = logging.getLogger(__name__)

SNAPSHOT_EVERY = 0.1  # re-save a snapshot once changes reach this share of the project


@dataclass
class _Entry:
    collection: Collection
    last_change: str
    changes_since_snapshot: int = 0


class ProjectIndexes:
    def __init__(
        self,
        redis_client: redis.Redis,
        snapshot_dir: Path | None = None,
        plan: IndexPlan | None = None,
    ) -> None:
        self.redis = redis_client
        self.snapshot_dir = snapshot_dir
        self.plan = plan or IndexPlan()
        self._entries: dict[int, _Entry] = {}
        self._locks: dict[int, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._background: dict[int, threading.Thread] = {}

    def state(self, project: int) -> ProjectState:
        return ProjectState(self.redis, project)

    def _lock(self, project: int) -> threading.Lock:
        # One lock per project: building a large project's index never blocks the others.
        with self._locks_guard:
            return self._locks.setdefault(project, threading.Lock())

    def get(self, project: int) -> Collection:
        """The project's current index; raises StoreError if nothing is indexed yet.

        Its `excluded` ids are the project's labeled tasks, as of the same moment."""
        with self._lock(project):
            entry = self._entries.get(project)
            state = self.state(project)
            if entry is not None:
                try:
                    if self._apply_changes(state, entry):
                        self._maintain(project, entry)
                        return entry.collection
                except ChangeLogTrimmedError:
                    pass  # fell too far behind the change log: rebuild
            entry = self._load_snapshot(state) or self._build(state)
            self._entries[project] = entry
            self._maintain(project, entry)
            return entry.collection

    # ------------------------------------------------------------------ building
    def _build(self, state: ProjectState) -> _Entry:
        meta = state.meta.get()
        if "model" not in meta:
            raise StoreError(
                f"project {state.project} has no index yet: connect the backend to it or "
                f"POST /api/projects/{state.project}/sync, then wait for indexing"
            )
        # Read first: replaying a change twice is harmless, missing one is not.
        last_change = state.vectors.last_change_id()
        collection = Collection(self._path(state.project), meta["model"], int(meta["dim"]),
                                self.plan)
        _exclude_labeled(collection, state)
        expected = state.vectors.count()
        batches = state.vectors.iter_batches()
        if expected > self.plan.exact_limit:
            # Train on the first batches (the vectors of whole buckets), then load straight
            # into the compressed index: no float32 copy of a large project.
            wanted = self.plan.training_size(expected)
            head: list[tuple[np.ndarray, np.ndarray]] = []
            for batch in batches:
                head.append(batch)
                if sum(len(ids) for ids, _ in head) >= wanted:
                    break
            collection.train(np.concatenate([v for _, v in head]), expected)
            for ids, vectors in head:
                collection.upsert(ids, vectors)
        for ids, vectors in batches:
            collection.upsert(ids, vectors)
        entry = _Entry(collection, last_change, changes_since_snapshot=len(collection))
        self._apply_changes(state, entry)
        return entry

    def _apply_changes(self, state: ProjectState, entry: _Entry) -> bool:
        """Replay the change log; False if a reset means the index must be rebuilt."""
        collection = entry.collection
        while True:
            changes = state.vectors.changes_since(entry.last_change)
            if not changes:
                return True
            for change_id, op, ids in changes:
                id_array = np.asarray(ids, dtype=np.int64)
                if op == "reset":
                    return False
                if op == "remove":
                    collection.remove(ids)
                    collection.excluded.discard(id_array)
                elif op == "label":
                    collection.excluded.add(id_array)
                elif op == "labels":
                    collection.excluded.clear()
                    _exclude_labeled(collection, state)
                else:
                    found = state.vectors.get(ids)
                    collection.remove([i for i in ids if i not in found])
                    if found:
                        collection.upsert(list(found), np.stack(list(found.values())))
                entry.last_change = change_id
                entry.changes_since_snapshot += len(ids)

    # ------------------------------------------------------------------ snapshots
    def _path(self, project: int) -> Path:
        base = self.snapshot_dir or Path(".")
        return base / f"project-{int(project)}.lookalike"

    def _load_snapshot(self, state: ProjectState) -> _Entry | None:
        path = self._path(state.project)
        if self.snapshot_dir is None or not path.is_file():
            return None
        meta = state.meta.get()
        try:
            collection = Collection.load(path, self.plan)
            collection.check_model(meta.get("model", ""), int(meta.get("dim", 0)))
            entry = _Entry(collection, str(collection.meta["last_change"]))
            _exclude_labeled(collection, state)
            if self._apply_changes(state, entry):
                return entry
        except (StoreError, KeyError, ValueError, ChangeLogTrimmedError) as exc:
            log.info("project %s: snapshot not usable (%s); rebuilding", state.project, exc)
        path.unlink(missing_ok=True)
        return None

    def _save_snapshot(self, project: int, entry: _Entry) -> None:
        """Called with the project's lock held, so the index matches `last_change`."""
        if self.snapshot_dir is None:
            return
        entry.collection.meta["last_change"] = entry.last_change
        entry.collection.save()
        entry.changes_since_snapshot = 0

    # ------------------------------------------------------------------ upkeep
    def _maintain(self, project: int, entry: _Entry) -> None:
        """Start a background re-training or snapshot when one is due (never waits for it)."""
        collection = entry.collection
        due_snapshot = (
            self.snapshot_dir is not None
            and len(collection) >= self.plan.exact_limit // 10
            and entry.changes_since_snapshot > SNAPSHOT_EVERY * max(len(collection), 1)
        )
        if not (collection.needs_rebuild() or due_snapshot):
            return
        running = self._background.get(project)
        if running is not None and running.is_alive():
            return
        thread = threading.Thread(
            target=self._upkeep, args=(project, entry), name=f"index-upkeep-{project}",
            daemon=True,
        )
        self._background[project] = thread
        thread.start()

    def _upkeep(self, project: int, entry: _Entry) -> None:
        try:
            if entry.collection.needs_rebuild():
                entry.collection.rebuild()  # searches and change replays go on meanwhile
            with self._lock(project):
                if self._entries.get(project) is entry:
                    self._save_snapshot(project, entry)
        except Exception:
            log.exception("project %s: index upkeep failed", project)

    def wait_for_upkeep(self, timeout: float | None = None) -> None:
        """Tests and benchmarks: let the background work finish."""
        for thread in list(self._background.values()):
            thread.join(timeout)


def _exclude_labeled(collection: Collection, state: ProjectState) -> None:
    """Searches skip the project's labeled tasks (the whole set, as Redis has it now)."""
    collection.excluded.add(np.fromiter(state.labeled.ids(), dtype=np.int64))
