"""Per-project locks and flags: one sync at a time, one priority writer, one first sync."""

from __future__ import annotations

import redis
from redis.lock import Lock

from lookalike.service.state.base import project_key
from lookalike.timeouts import (
    FIRST_SYNC_RETRY_SECONDS,
    PRIORITY_LOCK_SECONDS,
    PRIORITY_LOCK_WAIT,
    SYNC_TIMEOUT,
)


class ProjectLocks:
    def __init__(self, connection: redis.Redis, project: int) -> None:
        self._redis = connection
        self._sync = project_key(project, "sync-lock")
        self._priority = project_key(project, "priority-lock")
        self._first_sync = project_key(project, "first-sync")

    def sync(self) -> Lock:
        """Held by a sync or reindex for its whole run."""
        return self._redis.lock(self._sync, timeout=SYNC_TIMEOUT)

    def priority(self) -> Lock:
        """Held while writing priorities: two queries must not both create a task's prediction."""
        return self._redis.lock(
            self._priority, timeout=PRIORITY_LOCK_SECONDS, blocking_timeout=PRIORITY_LOCK_WAIT
        )

    def claim_first_sync(self) -> bool:
        """True once per project (until the flag expires, so a failed first sync is retried)."""
        return bool(self._redis.set(self._first_sync, "1", nx=True, ex=FIRST_SYNC_RETRY_SECONDS))

    def keys(self) -> list[str]:
        return [self._sync, self._priority, self._first_sync]
